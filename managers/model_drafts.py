"""STANDALONE speculative decoding: a small draft model with its own KV pool
guesses each request's next tokens greedily; the target verifies them
(sampling/verify.py).

Per request the draft model keeps a sequence in its own pool
(`Req.draft_state`): the tokens whose draft KV it holds. Each round it cuts
that back to what still agrees with the request's tokens (rejected guesses
go, at once), feeds what is new, and decodes its guesses; all requests
drafting that round share each draft forward. The draft model's state is
rebuilt from the request's tokens whenever it is gone: after a retraction,
or after the draft pool ran out (then every draft sequence is dropped and
that round drafts nothing).

How many guesses a request gets adapts to how its last ones fared
(`GuessBudget`): each costs a draft forward. A guess is the draft's argmax, a proposal made with certainty, so a sampled
request verifies it by sampling at the guess position (exact rejection
sampling for such a draft): lossless for greedy and sampled requests alike.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from managers.drafts import GuessBudget
from model_executor.batch_runner import BatchRunner
from model_executor.model_runner import ModelRunner

if TYPE_CHECKING:
    from managers.schedule_batch import Req

logger = logging.getLogger(__name__)


@dataclass
class DraftSequence:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # whose KV the draft pool holds
    verified: int = 0  # how many of them are the request's own (the rest: last round's guesses)
    budget: GuessBudget = field(default_factory=GuessBudget)  # guesses per round, adapted


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PooledDrafter:
    """What a draft source with its own model and KV pool shares (a draft
    model, an EAGLE head): a `BatchRunner` over its runner, one sequence per
    drafting request (its id in the request's `draft_state`, a `state_type`),
    all drafting together in `_draft`. Running out of pool or request rows
    drops every sequence, and that round drafts nothing."""

    kind = "draft model"  # for messages
    state_type: type = DraftSequence

    def __init__(self, runner: ModelRunner, num_draft_tokens: int) -> None:
        if runner.config.page_size != 1:
            raise ValueError(f"the {self.kind}'s KV pool needs page size 1 (its guesses are cut one by one)")
        self.runner = runner
        self.batch = BatchRunner(runner)
        self.max_guesses = num_draft_tokens - 1
        self.owners: dict[int, Req] = {}  # draft sequence id -> its request

    def propose(self, req: Req, max_tokens: int) -> list[int]:
        return self.propose_many([req], [max_tokens])[0]

    def propose_many(self, reqs: list[Req], rooms: list[int]) -> list[list[int]]:
        guesses: list[list[int]] = [[] for _ in reqs]
        try:
            self._draft(reqs, rooms, guesses)
        except RuntimeError as err:  # the pool or its request rows ran out
            logger.info("%s out of room (%s): dropping its sequences, no guesses this step", self.kind, err)
            self.release_all()
            return [[] for _ in reqs]
        return guesses

    def _draft(self, reqs: list[Req], rooms: list[int], guesses: list[list[int]]) -> None:
        """Append up to rooms[i] guesses for reqs[i] to guesses[i]."""
        raise NotImplementedError

    def _new_sequence(self, req: Req) -> int:
        seq_id = self.batch.add_sequence()
        self.owners[seq_id] = req
        return seq_id

    def release(self, req: Req) -> None:
        """The request gave back its KV (finished, aborted, retracted): so does its draft."""
        state = req.draft_state
        if isinstance(state, self.state_type):
            if state.seq_id is not None and self.owners.pop(state.seq_id, None) is not None:
                self.batch.release(state.seq_id)
            req.draft_state = None

    def release_all(self) -> None:
        for req in list(self.owners.values()):
            self.release(req)


class DraftModelProposer(PooledDrafter):
    def _draft(self, reqs: list[Req], rooms: list[int], guesses: list[list[int]]) -> None:
        wanted = [min(room, self._sequence(req).budget.next(req, self.max_guesses)) if room else 0
                  for req, room in zip(reqs, rooms)]
        for req, n in zip(reqs, wanted):
            if n:
                req.draft_state.budget.proposed = n
        active = [i for i, n in enumerate(wanted) if n > 0]
        if not active:
            return
        sequences, feeds = [], []
        for i in active:
            req = reqs[i]
            length = len(req.origin_input_ids) + len(req.output_ids)
            sequence = self._sequence(req)
            # Keep the KV that still agrees (a request's tokens only grow, so
            # only last round's guesses need checking); always re-feed at
            # least the last token, whose logits give the first guess.
            done = sequence.verified
            agree = _common_prefix(sequence.tokens[done:], req.tokens_between(done, length))
            keep = min(done + agree, length - 1)
            self.batch.truncate(sequence.seq_id, keep)
            del sequence.tokens[keep:]
            sequences.append(sequence)
            feeds.append(req.tokens_between(keep, length))
            sequence.verified = length
        while True:
            out, _ = self.batch.extend([s.seq_id for s in sequences], feeds)
            picks = out.next_token_logits.argmax(dim=-1).tolist()
            for sequence, feed, i, pick in zip(sequences, feeds, active, picks):
                sequence.tokens += feed
                guesses[i].append(pick)
            going = [k for k, i in enumerate(active) if len(guesses[i]) < wanted[i]]
            if not going:
                return
            sequences = [sequences[k] for k in going]
            active = [active[k] for k in going]
            feeds = [[guesses[i][-1]] for i in active]

    def _sequence(self, req: Req) -> DraftSequence:
        if not isinstance(req.draft_state, DraftSequence):
            req.draft_state = DraftSequence(self._new_sequence(req))
        return req.draft_state


def check_draft_compatible(target_path: str, draft_path: str) -> None:
    """A draft model's guesses are token ids: it must share the target's
    vocabulary (size, and the tokenizer's token -> id map where both ship one)."""
    sizes = []
    for path in (target_path, draft_path):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        sizes.append(config.get("text_config", config).get("vocab_size"))
    if sizes[0] != sizes[1]:
        raise ValueError(f"the draft model's vocabulary ({sizes[1]} tokens, {draft_path}) differs from the "
                         f"target's ({sizes[0]} tokens, {target_path})")
    files = [os.path.join(path, "tokenizer.json") for path in (target_path, draft_path)]
    if all(os.path.exists(f) for f in files):
        from tokenizers import Tokenizer

        vocabs = [Tokenizer.from_file(f).get_vocab() for f in files]
        if vocabs[0] != vocabs[1]:
            raise ValueError(f"the draft model's tokenizer ({draft_path}) maps tokens to other ids than the "
                             f"target's ({target_path})")
