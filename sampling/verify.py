"""Greedy verification of drafted tokens: the rows of a batch that carried
drafts (their last token followed by `d` guesses at what comes next) keep the
longest run of guesses the model agrees with, plus the model's own next
token, so a step can return several tokens for one request.

A drafted row's logits are scored at each of its `d + 1` input positions:
position j predicts the token after input j. Guess j+1 is accepted while every
earlier guess was and it equals the model's argmax at position j; the first
disagreement is replaced by the model's choice, and if every guess held, the
model's choice after the last one is a bonus token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accept_drafts(verify_logits: Tensor, input_ids: Tensor, extend_lens: list[int], draft_lens: list[int],
                  next_ids: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """(tokens of every row, flattened in batch order; tokens per row; for
    each token, the row of `cat([next-token logits, verify_logits])` that
    chose it, for its logprob).

    `verify_logits` [sum(draft_lens), V]: logits at each drafted row's last
    token and all but its last draft (batch order); `next_ids` [B]: the token
    sampled at each row's last position (the bonus when all drafts hold).
    One host read of the agreement pattern: the counts decide the shapes."""
    starts, offset = [], 0
    for n in extend_lens:
        starts.append(offset)
        offset += n
    guess_index = [s + 1 + j for s, d in zip(starts, draft_lens) for j in range(d)]
    guesses = input_ids[torch.tensor(guess_index, dtype=torch.int64, device=input_ids.device)]
    choices = verify_logits.argmax(dim=-1)
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
