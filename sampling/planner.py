"""The scheduler's half of sampling: what each batch samples with.

A request joins its row of `SamplingRows` (row_state.py) the first time a
batch holds it since it got that row, and leaves when the row is freed
(finish, abort, retraction); joining writes its parameters and, with
penalties, its history once. Each batch then names its rows, says which of
its tokens the requests keep (not a partial prompt chunk's) and carries its
requests' logits processors' output: filled right away, or, under overlap
when a processor reads the output, after the previous step's tokens were
accepted (`fill`), while this batch's forward already runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sampling.batch_info import SamplingFlags, effective_top_k, flat_index, is_greedy, uses_counts
from sampling.logits_processors import LogitAdjustments
from sampling.plan import PendingAdjustments, RowJoins, SamplingPlan

if TYPE_CHECKING:
    from managers.schedule_batch import Req, ScheduleBatch


class SamplingPlanner:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.occupants: dict[int, Req] = {}  # row -> the request whose state it holds

    def plan(self, batch: ScheduleBatch, defer_output_readers: bool) -> SamplingPlan:
        """`defer_output_readers`: the previous batch's tokens are not known
        yet, so processors that read the output are filled later (`fill`)."""
        reqs = batch.reqs
        params = [r.sampling_params for r in reqs]
        joining = [r for r in reqs if self.occupants.get(r.req_pool_idx) is not r]
        for r in joining:
            self.occupants[r.req_pool_idx] = r
        kept = [i for i, (r, partial) in enumerate(zip(reqs, batch.partial_chunk))
                if not partial and r.sampling_params.max_new_tokens > 0]
        drafts = batch.draft_lens or [0] * len(reqs)
        plan = SamplingPlan(
            rows=torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64),
            flags=SamplingFlags.of(params, self.vocab_size),
            seeds=[p.seed for p in params],
            # Under overlap a request's newest token may still be in flight;
            # the seeded sampler must count it (same draws as the plain loop).
            # A drafted row's next token comes after its guesses (plan.py).
            output_lens=[len(r.output_ids) + (r.pending_placeholder is not None) + d for r, d in zip(reqs, drafts)],
            joins=self._joins(joining) if joining else None,
            counted=torch.tensor(kept, dtype=torch.int64),
            draft_lens=list(drafts) if any(drafts) else None,
        )
        if any(r.logits_processors for r in reqs):
            plan.adjustments = PendingAdjustments()
            reads_output = any(p.reads_output for r in reqs for p in r.logits_processors)
            if not (defer_output_readers and reads_output):
                self.fill(plan.adjustments, reqs)
        return plan

    def fill(self, pending: PendingAdjustments, reqs: list[Req]) -> None:
        """The batch's processors' output, from each request's state now."""
        try:
            adjustments = LogitAdjustments(len(reqs), self.vocab_size)
            for row, req in enumerate(reqs):
                if not req.finished():  # a finished request's spare step is discarded
                    for processor in req.logits_processors:
                        processor.fill(adjustments, row)
        except BaseException as err:
            pending.set(err)  # the worker must not wait forever
            raise
        pending.set(adjustments)

    def leave(self, req: Req) -> None:
        """`req` gives its row back: whoever gets it next joins afresh."""
        if req.req_pool_idx is not None and self.occupants.get(req.req_pool_idx) is req:
            del self.occupants[req.req_pool_idx]

    def _joins(self, reqs: list[Req]) -> RowJoins:
        params = [r.sampling_params for r in reqs]
        rows = [r.req_pool_idx for r in reqs]
        penalised = [r for r in reqs if uses_counts(r.sampling_params)]
        penalised_rows = [r.req_pool_idx for r in penalised]
        return RowJoins(
            rows=torch.tensor(rows, dtype=torch.int64),
            params=torch.tensor(
                [[1.0 if is_greedy(p) else float(p.temperature), float(p.top_p), float(p.min_p),
                  float(p.frequency_penalty), float(p.presence_penalty), float(p.repetition_penalty)]
                 for p in params],
                dtype=torch.float32,
            ),
            top_ks=torch.tensor([effective_top_k(p, self.vocab_size) for p in params], dtype=torch.int64),
            greedy=torch.tensor([is_greedy(p) for p in params], dtype=torch.bool),
            penalised_rows=torch.tensor(penalised_rows, dtype=torch.int64),
            output_index=flat_index([r.output_ids for r in penalised], penalised_rows),
            seen_index=flat_index([r.origin_input_ids + r.output_ids for r in penalised], penalised_rows),
        )
