"""Applying a step to its requests: at launch (state moves as if the batch had
run, so overlap can plan the next one) and when its sampled tokens arrive
(append, check stop conditions, share prefilled prompts, release finished
requests, report)."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import accumulate
from dataclasses import dataclass, field
from typing import Any

import torch

from managers.cache_manager import CacheManager
from managers.drafts import AcceptanceStats
from managers.io_struct import FinishReason
from managers.prefill_admission import PrefillAdmission
from managers.schedule_batch import Req, ScheduleBatch
from managers.step_result import StepResult


@dataclass
class RequestQueues:
    """The scheduler's request state that result processing moves requests between."""

    waiting: list[Req] = field(default_factory=list)
    running: list[Req] = field(default_factory=list)
    chunked_req: Req | None = None  # mid-prompt: its next chunk goes first
    grammar_waiting: list[Req] = field(default_factory=list)  # until their grammar compiled

    def remove(self, req: Req) -> None:
        self.grammar_waiting = [r for r in self.grammar_waiting if r is not req]
        self.running = [r for r in self.running if r is not req]
        self.waiting = [r for r in self.waiting if r is not req]


class ResultProcessor:
    def __init__(self, queues: RequestQueues, kv: CacheManager, admission: PrefillAdmission, tokenizer: Any,
                 overlap: bool, report: Callable[[Req], None]) -> None:
        self.queues = queues
        self.kv = kv
        self.admission = admission
        self.tokenizer = tokenizer  # for stop strings only
        self.overlap = overlap
        self.report = report
        self.spec = AcceptanceStats()
        # An EAGLE drafter takes the target's hidden states of the tokens kept
        # (req, position of the first, [n, hidden]); set by the scheduler.
        self.feature_sink: Callable[[Req, int, torch.Tensor], None] | None = None

    def on_launch(self, batch: ScheduleBatch, placeholders: torch.Tensor | None) -> None:
        """State moves as if the batch had already run (overlap plans ahead)."""
        queues = self.queues
        for i, (req, decoding, partial) in enumerate(zip(batch.reqs, batch.decoding, batch.partial_chunk)):
            if partial:
                queues.chunked_req = req
                continue
            if placeholders is not None:
                req.pending_placeholder = int(placeholders[i])
            prefill_only = req.sampling_params.max_new_tokens == 0
            if not decoding and not prefill_only and req not in queues.running:
                queues.running.append(req)

    def process(self, batch: ScheduleBatch, placeholders: torch.Tensor | None, result: StepResult,
                next_batch: ScheduleBatch | None) -> None:
        """`next_batch`: the batch already launched after this one (overlap),
        whose requests keep their KV until it is processed too."""
        tokens = result.rows()
        logprobs = result.per_row_logprobs()
        slots = placeholders.tolist() if placeholders is not None else [None] * len(tokens)
        drafted = batch.draft_lens or [0] * len(tokens)
        in_next = set(map(id, next_batch.reqs)) if next_batch is not None else set()
        features = result.hidden_states if self.feature_sink is not None else None
        starts = list(accumulate(batch.extend_lens, initial=0))
        rows = zip(batch.reqs, batch.decoding, batch.partial_chunk, tokens, slots, logprobs, drafted)
        for i, (req, decoding, partial, row_tokens, placeholder, row_logprobs, guesses) in enumerate(rows):
            if req.finished():
                # Finished in the previous batch; this one ran a spare token.
                if id(req) not in in_next:
                    self.kv.release(req)
                continue
            if features is not None:
                # The hidden states of the positions kept: a chunk's or prompt's
                # all, a verified row's last token and accepted guesses.
                kept = len(row_tokens) if guesses else batch.extend_lens[i]
                self.feature_sink(req, batch.prefix_lens[i], features[starts[i] : starts[i] + kept])
            if partial:
                if not self.overlap:
                    self.kv.cache_prefill(req)
                continue
            if req.sampling_params.max_new_tokens == 0:
                req.finished_reason = FinishReason("length", 0)  # prefill only
            else:
                for j, token in enumerate(row_tokens):
                    self._append(req, token, placeholder, row_logprobs[j] if row_logprobs else None)
                    if req.finished():
                        break  # tokens past a stop are dropped
            if guesses:
                # KV stays for the tokens kept (all but the newest, as always).
                self.kv.trim(req, len(req.origin_input_ids) + len(req.output_ids) - 1)
                self.spec.record(req, accepted=len(row_tokens) - 1, drafted=guesses)
            if not decoding:
                self.admission.drop_claim(req)
            if req.finished():
                self.queues.remove(req)
                if id(req) not in in_next:
                    self.kv.release(req)
            elif not decoding and req.req_pool_idx is not None:
                # Prefill done: share the prompt now, not when the request ends.
                self.kv.cache_prefill(req)
            self.report(req)

    def _append(self, req: Req, token: int, placeholder: int | None, logprob) -> None:
        req.output_ids.append(token)
        for processor in req.logits_processors:
            processor.accept(token)
        if req.return_logprob and logprob is not None:
            req.output_token_logprobs.append((logprob[0], token))
            req.output_top_logprobs.append(logprob[1][: req.top_logprobs_num])
        if req.pending_placeholder == placeholder:  # else a later batch's is pending
            req.pending_placeholder = None
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.check_finished(self.tokenizer)
        if not req.finished() and any(p.terminated() for p in req.logits_processors):
            req.finished_reason = FinishReason("stop", token)  # e.g. its grammar is complete
        if req in self.queues.waiting:
            # Retracted while this batch ran: the token stands, and the
            # re-prefill must include it.
            req.init_next_round_input()
