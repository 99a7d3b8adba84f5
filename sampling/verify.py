"""Verification of drafted tokens: the rows of a batch that carried drafts
(their last token followed by `d` guesses at what comes next) keep the
longest run of guesses the model agrees with, plus the model's own next
token, so a step can return several tokens for one request.

A drafted row's logits are scored at each of its `d + 1` input positions:
position j predicts the token after input j. At each position the request
picks its token as a plain decode step would there (greedy: the argmax;
sampled: a draw from its distribution, with that position's seed). Guess
j+1 is accepted while every earlier guess was and it equals the token picked
at position j; the first disagreement is replaced by the picked token, and
if every guess held, the token picked after the last one is a bonus.

For a sampled request that is exactly rejection sampling with a draft that
proposes its guess with certainty (NGRAM's): the guess is accepted with the
target probability p(guess), and when it is not, the picked token is a draw
from p given "not the guess", which is the residual distribution (p - q)+
normalised. So the output has the target's distribution, token for token;
with a seed, the very tokens of the run without drafts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accept_drafts(choices: Tensor, input_ids: Tensor, extend_lens: list[int], draft_lens: list[int],
                  next_ids: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """(tokens of every row, flattened in batch order; tokens per row; for
    each token, the row of `cat([next-token logits, verify_logits])` that
    chose it, for its logprob).

    `choices` [sum(draft_lens)]: the token picked at each drafted row's last
    token and all but its last draft (batch order; `verify_logits` rows);
    `next_ids` [B]: the token picked at each row's last position (the bonus
    when all drafts hold).
    One host read of the agreement pattern: the counts decide the shapes."""
    starts, offset = [], 0
    for n in extend_lens:
        starts.append(offset)
        offset += n
    guess_index = [s + 1 + j for s, d in zip(starts, draft_lens) for j in range(d)]
    guesses = input_ids[torch.tensor(guess_index, dtype=torch.int64, device=input_ids.device)]
    agree = (choices == guesses).tolist()
    pieces, counts, sources, k = [], [], [], 0
    batch = len(draft_lens)
    for row, d in enumerate(draft_lens):
        held = 0
        while held < d and agree[k + held]:
            held += 1
        if held == d:  # every guess held: the model's next token comes on top
            pieces += [choices[k : k + d], next_ids[row : row + 1]]
            sources += [batch + k + j for j in range(d)] + [row]
        else:  # the guesses that held, then the model's correction
            pieces.append(choices[k : k + held + 1])
            sources += [batch + k + j for j in range(held + 1)]
        counts.append(held + 1)
        k += d
    return torch.cat(pieces), counts, sources
