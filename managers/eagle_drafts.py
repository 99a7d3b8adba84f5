"""EAGLE speculative decoding: a one-layer draft head reads the target's
final hidden states (model_executor/models/llama_eagle.py) and chains greedy
guesses from its own.

The head's input at target position p is (the target's hidden state at p,
the token at p + 1); its output there predicts the token at p + 2 and is the
next chained step's hidden input. So per request the head keeps, in its own
KV pool (`Req.draft_state`), one entry per target position whose hidden
state it has consumed, from the first position the target computed for it
(a radix-cache hit computes no states for the cached prefix: the head then
starts after it; attention in the head is relative, rotary, so only the
missing context costs). The target's states reach it through `observe`, for
the positions each step kept (result processing), and are consumed at the
next proposal; the chained guesses' entries are cut off again then.

Under TP only rank 0 runs the head; its drafts are broadcast. Only a chain
(top-k 1) is drafted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from managers.drafts import GuessBudget
from managers.model_drafts import PooledDrafter

if TYPE_CHECKING:
    from managers.schedule_batch import Req


@dataclass
class EagleState:
    first_position: int  # target position of the head's first entry
    seq_id: int | None = None  # the head's sequence, once it has one
    consumed: int = 0  # head entries built from target states (positions first .. first + consumed - 1)
    pending: list[torch.Tensor] = field(default_factory=list)  # target states observed, not consumed yet
    budget: GuessBudget = field(default_factory=GuessBudget)

    @property
    def next_position(self) -> int:
        return self.first_position + self.consumed + sum(len(t) for t in self.pending)


class EagleProposer(PooledDrafter):
    kind = "EAGLE head"
    state_type = EagleState

    def observe(self, req: Req, position: int, hidden: torch.Tensor) -> None:
        """The target's hidden states at positions position .. position + n - 1 of `req`."""
        state = req.draft_state
        if not isinstance(state, EagleState) or position != state.next_position:
            # New, or not contiguous with what the head has (a retraction's
            # re-prefill, rejected positions): start over from here.
            self.release(req)
            state = req.draft_state = EagleState(position)
        state.pending.append(hidden)

    def _draft(self, reqs: list[Req], rooms: list[int], guesses: list[list[int]]) -> None:
        active, wanted, feeds, states, hidden = [], {}, [], [], []
        for i, (req, room) in enumerate(zip(reqs, rooms)):
            state = req.draft_state
            if not room or not isinstance(state, EagleState) or not state.pending:
                continue
            tokens_needed = state.next_position + 1  # the token after the last observed position
            if len(req.origin_input_ids) + len(req.output_ids) < tokens_needed:
                continue
            want = min(room, state.budget.next(req, self.max_guesses))
            if not want:  # sitting out: the pending states wait for the next round that guesses
                continue
            if state.seq_id is None:
                state.seq_id = self._new_sequence(req)
            self.batch.truncate(state.seq_id, state.consumed)  # the last round's chained guesses go
            start = state.first_position + state.consumed + 1
            feeds.append(req.tokens_between(start, tokens_needed))
            hidden.append(torch.cat(state.pending))
            state.consumed += len(feeds[-1])
            state.pending = []
            wanted[i] = state.budget.proposed = want
            active.append(i)
            states.append(state)
        while active:
            out, _ = self.batch.extend([s.seq_id for s in states], feeds, spec_hidden=torch.cat(hidden))
            ends = torch.cumsum(torch.tensor([len(f) for f in feeds]), 0) - 1
            picks = out.next_token_logits.argmax(dim=-1).tolist()
            last_hidden = out.hidden_states[ends.to(out.hidden_states.device)]
            for i, pick in zip(active, picks):
                guesses[i].append(pick)
            going = [k for k, i in enumerate(active) if len(guesses[i]) < wanted[i]]
            active = [active[k] for k in going]
            states = [states[k] for k in going]
            feeds = [[guesses[i][-1]] for i in active]
            hidden = [last_hidden[going]] if going else []
