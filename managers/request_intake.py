"""Requests in: a `TokenizedGenerateReq` becomes one `Req` (or, for `n` > 1,
n of them behind one hidden prefill of the shared prompt), refused outright
when it can never run, and aborts are recorded until the next step applies
them. A request with a grammar waits, outside the admission queue, until
its grammar compiled on the compile threads (sampling/grammar.py)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from managers.io_struct import AbortReq, FinishReason, TokenizedGenerateReq
from managers.request_checks import refusal
from managers.result_processing import RequestQueues
from managers.sampling_params import SamplingParams
from managers.schedule_batch import Req
from sampling.grammar import GrammarCompilers, GrammarProcessor, grammar_spec_of
from sampling.logits_processors import logits_processors_for


@dataclass(frozen=True)
class IntakeLimits:
    vocab_size: int
    context_len: int
    capacity: int  # KV tokens
    max_queued_requests: int | None
    grammar_compile_timeout_s: float = 30.0


class RequestIntake:
    def __init__(self, queues: RequestQueues, limits: IntakeLimits, eos_token_ids: frozenset[int],
                 report: Callable[[Req], None], grammars: GrammarCompilers | None = None,
                 wait_for_grammars: bool = False) -> None:
        """`grammars`: None when constrained decoding is off. `wait_for_grammars`:
        block on each compile (TP ranks must schedule alike, and compile
        times differ between processes)."""
        self.queues = queues
        self.grammars = grammars
        self.wait_for_grammars = wait_for_grammars
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.report = report
        # Reported requests not yet finished, by rid (for aborts). Hidden
        # requests are never in it: nothing outside can name them.
        self.requests: dict[str, Req] = {}
        # Aborts not applied yet: a step costs O(aborts), not O(requests ever seen).
        self.pending_aborts: list[Req] = []

    def add(self, msg: TokenizedGenerateReq) -> None:
        """Queue a request; `n` > 1 becomes n requests `{rid}-{i}` that wait for
        one hidden prefill of the shared prompt, so they all hit the cache."""
        params = msg.sampling_params
        queue_full = self._queue_full()  # decided once: all of a request's samples or none
        if params.n > 1:
            first = None
            if not queue_full:
                warm = replace(params, max_new_tokens=0, min_new_tokens=0, n=1)
                first = self._add(f"{msg.rid}-prompt", msg.input_ids, warm, hidden=True)
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                child = self._add(f"{msg.rid}-{i}", msg.input_ids, replace(params, n=1, seed=seed),
                                  return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                                  queue_full=queue_full)
                child.waits_for = None if first is None or first.finished() else first
            return
        self._add(msg.rid, msg.input_ids, params, return_logprob=msg.return_logprob,
                  top_logprobs_num=msg.top_logprobs_num, queue_full=queue_full)

    def abort(self, msg: AbortReq) -> None:
        req = self.requests.get(msg.rid)
        if req is not None and not req.finished() and not req.to_abort:
            req.to_abort = True
            self.pending_aborts.append(req)

    def take_aborts(self) -> list[Req]:
        aborts, self.pending_aborts = self.pending_aborts, []
        return [r for r in aborts if not r.finished()]

    def forget(self, req: Req) -> None:
        """A finished request can no longer be aborted."""
        self.requests.pop(req.rid, None)

    def _queue_full(self) -> bool:
        limit = self.limits.max_queued_requests
        return limit is not None and sum(not (r.hidden or r.to_abort) for r in self.queues.waiting) >= limit

    def _add(self, rid: str, input_ids: list[int], params: SamplingParams, hidden: bool = False,
             return_logprob: bool = False, top_logprobs_num: int = 0, queue_full: bool = False) -> Req:
        req = Req(rid, list(input_ids), params, eos_token_ids=self.eos_token_ids, hidden=hidden,
                  return_logprob=return_logprob, top_logprobs_num=top_logprobs_num)
        if not hidden:
            self.requests[req.rid] = req
        limits = self.limits
        refused = refusal(req.origin_input_ids, params, vocab_size=limits.vocab_size,
                          context_len=limits.context_len, capacity=limits.capacity,
                          max_queued=limits.max_queued_requests if queue_full else None)
        if refused is not None:
            req.finished_reason = refused
            self.report(req)
            return req
        req.logits_processors = logits_processors_for(params, req.origin_input_ids)
        spec = None if hidden else grammar_spec_of(params)  # n > 1's shared prefill samples nothing
        if spec is not None:
            if self.grammars is None:
                req.finished_reason = FinishReason("abort", status_code=400, message=(
                    "constrained decoding is off on this server (--grammar-backend none, or no tokenizer)"))
                self.report(req)
                return req
            req.grammar = self.grammars.compile(spec)
            req.grammar_deadline = time.monotonic() + self.limits.grammar_compile_timeout_s
            self.queues.grammar_waiting.append(req)
            return req
        req.init_next_round_input()
        self.queues.waiting.append(req)
        return req

    def poll_grammars(self, wait_s: float = 0.0) -> None:
        """Queue the requests whose grammar is ready, refuse those whose
        grammar failed or timed out; `wait_s`: wait that long for one."""
        pending = self.queues.grammar_waiting
        if not pending:
            return
        if self.wait_for_grammars:
            concurrent.futures.wait([r.grammar for r in pending], timeout=self.limits.grammar_compile_timeout_s)
        elif wait_s > 0:
            concurrent.futures.wait([r.grammar for r in pending], timeout=wait_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        still = []
        now = time.monotonic()
        for req in pending:
            if req.finished():
                continue  # aborted while compiling
            if req.grammar.done():
                error = req.grammar.exception()
                if error is None:
                    req.logits_processors.append(GrammarProcessor(req.grammar.result()))
                    req.init_next_round_input()
                    self.queues.waiting.append(req)
                else:
                    self._refuse(req, str(error))
            elif now > req.grammar_deadline:
                self._refuse(req, f"the grammar did not compile within {self.limits.grammar_compile_timeout_s:g} s")
            else:
                still.append(req)
        self.queues.grammar_waiting = still

    def _refuse(self, req: Req, message: str) -> None:
        req.finished_reason = FinishReason("abort", status_code=400, message=message)
        self.report(req)
