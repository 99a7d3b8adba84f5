"""The scheduler: turns a stream of requests into batches, one iteration at a time.

Each iteration (`step`):
1. aborts take effect (their KV returns to the pool / cache);
2. the next batch is chosen: a prefill of newly admitted requests (or the
   next chunk of a chunked prompt), else a plain decode of the running
   requests (evicting cache leaves, then retracting requests, if KV slots
   are short). With `enable_mixed_chunk` every running decode rides along
   in the prefill as a 1-token extend (a MIXED batch), so decodes never
   stall behind a stream of prompts; without it a prefill runs alone, so
   it finishes sooner (better TTFT) while the decodes wait a step (worse
   TPOT). See `SchedulerConfig.enable_mixed_chunk` for the measured default;
3. the batch runs; its sampled tokens are appended, stop conditions checked,
   finished requests leave (their KV is handed to the radix cache).

With overlap (the default), step 3 for batch N happens after batch N+1 was
launched: batch N+1 refers to N's not-yet-known tokens by placeholder ids
(see `tp_worker.OverlapTpWorker`), so the CPU plans while the model runs.
Request state is therefore one step behind; a request that turns out to
have finished in batch N has already run one extra token in batch N+1,
which is discarded and its KV released with the rest.

Parts: `request_intake.py` turns messages into queued requests (and
records aborts), `prefill_admission.py` picks and allocates prefills (with
the policy's order and budgets, schedule_policy.py), `decode_room.py` builds
decode batches (room, retraction, drafted guesses), `cache_manager.py` owns
every request's KV bookkeeping (rows, slots, prefix locks, release),
`sampling/planner.py` what each batch samples with, `result_processing.py`
applies a step to its requests, `output_report.py` gathers what a step
reports; this module is the loop and aborts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from managers.cache_manager import CacheManager
from managers.decode_room import DecodeRoom
from managers.drafts import DraftProposer, drafts_shared_from_rank_zero, make_drafter
from managers.io_struct import AbortReq, BatchTokenIDOut, FinishReason, TokenizedGenerateReq
from managers.iteration_timings import IterationTimings
from managers.output_report import OutputReport
from managers.prefill_admission import PrefillAdmission
from managers.request_intake import IntakeLimits, RequestIntake
from managers.result_processing import RequestQueues, ResultProcessor
from managers.schedule_batch import Req, ScheduleBatch
from managers.schedule_policy import SchedulePolicy
from managers.scheduler_config import SchedulerConfig
from managers.step_result import StepResult
from managers.tp_worker import OverlapTpWorker, SyncExecutor, TpModelWorker
from mem_cache.radix_cache import NoSharingCache, RadixCache
from model_executor.distributed import TPGroup
from model_executor.model_config import ModelRunnerConfig
from sampling.grammar import GrammarCompilers
from sampling.plan import SamplingPlan
from sampling.planner import SamplingPlanner

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    batch: ScheduleBatch
    placeholders: torch.Tensor | None
    sampling: SamplingPlan


class Scheduler:
    def __init__(
        self,
        runner_config: ModelRunnerConfig,
        config: SchedulerConfig,
        tokenizer: Any | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        tp_group: TPGroup | None = None,
        drafter: DraftProposer | None = None,
    ) -> None:
        self.config = config
        self.worker = TpModelWorker(runner_config, tp_group)
        runner = self.worker.model_runner
        self.device = runner.device
        self.vocab_size = runner.model_config.vocab_size
        self.context_len = runner.model_config.context_len
        self.page_size = runner_config.page_size
        self.max_running_requests = runner_config.max_running_requests
        self.req_to_token_pool = runner.req_to_token_pool
        self.allocator = runner.token_to_kv_pool_allocator
        self.capacity = runner.max_total_num_tokens
        cache_cls = NoSharingCache if config.disable_radix_cache else RadixCache
        self.tree_cache = cache_cls(self.req_to_token_pool, self.allocator, self.page_size)
        self.kv = CacheManager(self.req_to_token_pool, self.allocator, self.tree_cache, self.page_size)
        self.queues = RequestQueues()
        self.output = OutputReport()
        self.grammars = None
        if config.grammar_backend == "xgrammar" and tokenizer is not None:
            self.grammars = GrammarCompilers(tokenizer, self.vocab_size, sorted(eos_token_ids),
                                             any_whitespace=not config.constrained_json_disable_any_whitespace)
        self.intake = RequestIntake(
            self.queues, IntakeLimits(self.vocab_size, self.context_len, self.capacity, config.max_queued_requests,
                                      config.grammar_compile_timeout_s),
            eos_token_ids, self._report, self.grammars, wait_for_grammars=tp_group is not None and tp_group.size > 1)
        self.admission = PrefillAdmission(config, self.kv, SchedulePolicy(config.schedule_policy, self.tree_cache),
                                          self.max_running_requests, self._new_batch)
        rank = tp_group.rank if tp_group is not None else 0
        drafter = drafter or make_drafter(config.speculative, runner_config, self.capacity, rank)
        share = None
        if tp_group is not None and tp_group.size > 1 and drafts_shared_from_rank_zero(config.speculative):
            share = tp_group.broadcast_object
        if (drafter is not None or share is not None) and config.enable_overlap and rank == 0:
            logger.info("speculative decoding with overlap scheduling: a step drafts from the previous "
                        "step's tokens, so it waits for them (no overlap on decode steps that draft)")
        if hasattr(drafter, "release"):  # a draft model's KV goes with the request's
            self.kv.release_hooks.append(drafter.release)
        self.decode = DecodeRoom(self.kv, self.queues, self._new_batch, drafter, share)
        self.sampling = SamplingPlanner(self.vocab_size)
        # Whatever is kept per request lets go of it with its KV.
        self.kv.release_hooks += [self.sampling.leave, self.admission.drop_claim]
        self.executor = (
            OverlapTpWorker(self.worker, self.max_running_requests)
            if config.enable_overlap
            else SyncExecutor(self.worker)
        )
        self.results = ResultProcessor(self.queues, self.kv, self.admission, tokenizer, config.enable_overlap,
                                       self._report)
        self.spec = self.results.spec
        # An EAGLE head drafts from the target's hidden states: every rank
        # captures them (same batches everywhere), rank 0's drafter reads them.
        self.capture_hidden = config.speculative is not None and config.speculative.algorithm == "EAGLE"
        if hasattr(drafter, "observe"):
            self.results.feature_sink = drafter.observe
        self.inflight: _InFlight | None = None
        self.timings = IterationTimings()

    # The queues live in one object that result processing shares.
    waiting = property(lambda self: self.queues.waiting, lambda self, v: setattr(self.queues, "waiting", v))
    running = property(lambda self: self.queues.running, lambda self, v: setattr(self.queues, "running", v))
    chunked_req = property(lambda self: self.queues.chunked_req,
                           lambda self, v: setattr(self.queues, "chunked_req", v))

    # -- requests in -------------------------------------------------------------

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        self.intake.add(msg)

    def abort_request(self, msg: AbortReq) -> None:
        self.intake.abort(msg)

    # Reported, unfinished requests by rid, and aborts not applied yet.
    requests = property(lambda self: self.intake.requests)
    pending_aborts = property(lambda self: self.intake.pending_aborts)
    num_retractions = property(lambda self: self.decode.num_retractions)

    def flush_cache(self) -> bool:
        """Drop the radix cache; only when nothing is queued or running."""
        if not self.is_idle():
            return False
        self.tree_cache.reset()
        return True

    def stats(self) -> dict[str, Any]:
        """Load and cache figures (for logs, /get_server_info and /metrics);
        MoE models add the tokens routed to each expert lately."""
        cache = self.tree_cache
        expert_load = self.worker.model_runner.expert_load
        return {
            **({"expert_load": expert_load.snapshot()} if expert_load is not None else {}),
            "spec_verify_steps": self.spec.verify_steps,
            "spec_accepted_tokens": self.spec.accepted_tokens,
            "spec_drafted_tokens": self.spec.drafted_tokens,
            "avg_spec_accept_length": self.spec.accept_length(),
            "running_requests": len(self.running),
            # Includes requests finishing in the batch still in flight (overlap).
            "requests_holding_kv": self.req_to_token_pool.size - self.req_to_token_pool.available_size(),
            "waiting_requests": len(self.waiting) + (self.chunked_req is not None) + len(self.queues.grammar_waiting),
            "kv_used_tokens": self.capacity - self.allocator.available_size(),
            "kv_capacity_tokens": self.capacity,
            "kv_free_tokens": self.allocator.available_size(),
            "cache_size_tokens": cache.total_size(),
            "cache_evictable_tokens": cache.evictable_size(),
            "cache_protected_tokens": cache.protected_size(),
            "cache_hit_rate": cache.hit_rate(),
            "retractions": self.num_retractions,
            **self.timings.summary(),
        }

    def is_idle(self) -> bool:
        return not (self.waiting or self.running or self.chunked_req or self.inflight or self.queues.grammar_waiting)

    # -- the loop ----------------------------------------------------------------

    def step(self) -> BatchTokenIDOut:
        """One iteration; returns what it produced for the detokenizer."""
        clock = self.timings
        with clock.phase("process"):
            self._apply_aborts()
            # Nothing else to do: wait a little for a grammar rather than spin.
            idle = not (self.waiting or self.running or self.chunked_req or self.inflight)
            self.intake.poll_grammars(wait_s=0.005 if idle else 0.0)
            if self.inflight is not None and self.decode.drafting:
                # Guesses follow each request's newest token: read it first.
                self._process_result(self.inflight, self._wait_result(), None)
                self.inflight = None
        with clock.phase("schedule"):
            batch = self._next_batch()
        launched = None
        if batch is not None:
            with clock.phase("prepare"):
                sampling = self.sampling.plan(batch, defer_output_readers=self.inflight is not None)
                forward_batch = batch.forward_batch(sampling, capture_hidden=self.capture_hidden)
            with clock.phase("forward"):
                placeholders = self.executor.launch(forward_batch, batch.top_logprobs_num())
            self.results.on_launch(batch, placeholders)
            launched = _InFlight(batch, placeholders, sampling)
        done = self.inflight if self.config.enable_overlap else launched
        if done is not None:
            result = self._wait_result()
            with clock.phase("process"):
                self._process_result(done, result, launched if self.config.enable_overlap else None)
        pending = launched.sampling.adjustments if launched is not None else None
        if pending is not None and not pending.ready:
            # Its processors read the tokens just accepted; its forward is running.
            with clock.phase("process"):
                self.sampling.fill(pending, launched.batch.reqs)
        if self.config.enable_overlap:
            self.inflight = launched
        if batch is not None:
            clock.iterations += 1
            if clock.iterations % 200 == 0 and logger.isEnabledFor(logging.DEBUG):
                logger.debug("iteration timings: %s", clock.summary())
        return self.output.take()

    def _process_result(self, done: _InFlight, result: StepResult, next_batch: _InFlight | None) -> None:
        self.results.process(done.batch, done.placeholders, result,
                             next_batch.batch if next_batch is not None else None)

    def _wait_result(self) -> StepResult:
        """Forward + sampling as the scheduler sees it: under overlap only the
        part not hidden behind its own CPU work."""
        with self.timings.phase("forward"):
            return self.executor.result()

    def run_until_idle(self, max_steps: int = 100_000) -> list[BatchTokenIDOut]:
        outputs = []
        for _ in range(max_steps):
            outputs.append(self.step())
            if self.is_idle():
                outputs.append(self.step())  # flush anything reported last
                return outputs
        raise RuntimeError(f"scheduler not idle after {max_steps} steps")

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self.grammars is not None:
            self.grammars.shutdown()

    # -- choosing the batch ------------------------------------------------------

    def _next_batch(self) -> ScheduleBatch | None:
        decodes = [r for r in self.running if not r.finished()]
        riders = decodes if self.config.enable_mixed_chunk else []
        prefill = self._admit_prefill(decodes, riders)
        if prefill is not None:
            return prefill
        if not decodes:
            return None
        return self.decode.batch(decodes)

    def _admit_prefill(self, decodes: list[Req], riders: list[Req]) -> ScheduleBatch | None:
        admission = self.admission.admit(self.waiting, self.chunked_req, decodes, riders)
        if admission is None:
            return None
        self.chunked_req = admission.chunked_req
        admitted = set(map(id, admission.admitted))
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        return admission.batch

    def _new_batch(self, reqs: list[Req]) -> ScheduleBatch:
        return ScheduleBatch(reqs, self.kv, self.device)

    # -- results -----------------------------------------------------------------

    def _apply_aborts(self) -> None:
        inflight = set(map(id, self.inflight.batch.reqs)) if self.inflight is not None else set()
        for req in self.intake.take_aborts():
            req.finished_reason = FinishReason("abort", message="aborted by the client")
            self.queues.remove(req)
            if self.chunked_req is req:
                self.chunked_req = None
            if id(req) not in inflight:
                self.kv.release(req)
            self._report(req)

    def _report(self, req: Req) -> None:
        if req.finished():
            self.intake.forget(req)
        self.output.add(req)
