"""TokenizerManager: the front half of the server, in the HTTP / Engine process.

Validates and tokenizes generate calls, gives every request an id and an
asyncio state, sends `TokenizedGenerateReq` to the scheduler, and turns the
detokenizer's `BatchStrOut` updates into result dicts for the caller.

It never imports torch or the model: it talks to them only through ZMQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    TokenizedGenerateReq,
)
from managers.request_checks import (
    MAX_TOP_LOGPROBS,
    check_request_types,
    check_unique_rids,
    first_out_of_vocab,
    parse_sampling_params,
    request_rids,
)
from managers.request_state import (
    DISCONNECT_POLL_S,
    ClientDisconnected,
    DisconnectWatch,
    ReqState,
    ServerDeadError,
    StreamPacer,
    raise_if_refused,
)
from managers.sampling_params import SamplingParams
from managers.tokenizer_loading import load_tokenizer
from sampling.grammar import check_grammar, grammar_spec_of

logger = logging.getLogger(__name__)

# Tokenization and chat templates run here, off the event loop, so a huge
# prompt does not stall other routes (the fast tokenizer releases the GIL).
TOKENIZER_THREADS = 4


class TokenizerManager:
    def __init__(self, server_args: Any, port_args: Any, ready: Any) -> None:
        """`ready` is the scheduler's `SchedulerReady` report (limits of the model and pool)."""
        self.server_args = server_args
        self.served_model_name = server_args.served_model_name
        self.tool_call_parser = server_args.tool_call_parser
        self.reasoning_parser = server_args.reasoning_parser
        self.context_len = ready.context_len
        self.kv_capacity = ready.max_total_num_tokens
        self.vocab_size = ready.vocab_size
        self.tokenizer = None
        if not server_args.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(server_args.tokenizer_config())
        self.zmq_context = zmq.asyncio.Context(1)
        # Never block an exit on undelivered messages: the peers may be dead.
        self.zmq_context.setsockopt(zmq.LINGER, 0)
        self.tokenize_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self.to_scheduler = self.zmq_context.socket(zmq.PUSH)
        self.to_scheduler.connect(port_args.scheduler_input)
        self.port_args = port_args
        self.states: dict[str, ReqState] = {}
        self.control_waiters: dict[type, list[asyncio.Future]] = {}
        self.dead_reason: str | None = None
        self.recv_task: asyncio.Task | None = None
        self.last_finished_at: float | None = None  # monotonic; a request completed normally
        # Called with (result dict, time to first token) when a request finishes (metrics).
        self.finish_listeners: list[Callable[[dict, float | None], None]] = []

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the receive loop; call from inside the event loop that will serve."""
        if self.recv_task is None:
            recv = self.zmq_context.socket(zmq.PULL)
            recv.bind(self.port_args.tokenizer_input)
            self.recv_task = asyncio.get_running_loop().create_task(self._recv_loop(recv))

    async def close(self) -> None:
        if self.recv_task is not None:
            self.recv_task.cancel()
            try:
                await self.recv_task
            except asyncio.CancelledError:
                pass
            self.recv_task = None
        self.zmq_context.destroy(linger=0)
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Callable, *args: Any) -> Any:
        """Run CPU-heavy request preparation (tokenizing, chat templates) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    def fail_all(self, reason: str, error: type[ServerDeadError] = ServerDeadError) -> None:
        """A child process died (or the server is going away): every waiting
        caller gets `error(reason)` now, and new requests are refused."""
        self.dead_reason = reason
        for state in list(self.states.values()):
            state.queue.put_nowait(error(reason))
        for waiters in self.control_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ServerDeadError(reason))

    # -- generate ----------------------------------------------------------------

    async def generate_request(self, obj: GenerateReqInput, request: Any | None = None) -> AsyncIterator[dict]:
        """Yield result dicts (see `ReqState.result`); one final dict per
        output when not streaming, every update when streaming. Raises
        ValueError for input the caller must fix."""
        if self.dead_reason is not None:
            raise ServerDeadError(self.dead_reason)
        reqs = await self.run_blocking(self._tokenize_and_validate, obj)
        if self.dead_reason is not None:  # died (or began shutting down) while we tokenized
            raise ServerDeadError(self.dead_reason)
        check_unique_rids(reqs, self.states)
        queue: asyncio.Queue = asyncio.Queue()
        states: list[ReqState] = []
        for prompt_index, msg in enumerate(reqs):
            n = msg.sampling_params.n
            for j, rid in enumerate(request_rids(msg.rid, n)):
                state = ReqState(rid, prompt_index * n + j, len(msg.input_ids), queue)
                self.states[rid] = state
                states.append(state)
        for msg in reqs:
            self.to_scheduler.send_pyobj(msg)
        unfinished = {s.rid for s in states}
        watch = DisconnectWatch(request)
        pacer = StreamPacer(self.server_args.stream_interval) if obj.stream else None
        try:
            while unfinished:
                item = await self._next_update(queue, watch, states)
                if isinstance(item, BaseException):
                    raise item
                state = item
                if state.rid not in unfinished:
                    continue  # a queued duplicate of an update already yielded as final
                if state.finish is not None:
                    unfinished.discard(state.rid)
                    raise_if_refused(state)
                if state.finish is not None or (pacer is not None and pacer.due(state)):
                    yield state.result()
        finally:
            if unfinished:  # caller went away or failed: stop the work
                for rid in unfinished:
                    self.abort_request(rid)
            for state in states:
                self.states.pop(state.rid, None)

    def is_busy(self) -> bool:
        """Requests are waiting for results (for the watchdog and the shutdown drain)."""
        return bool(self.states)

    async def _next_update(self, queue: asyncio.Queue, watch: DisconnectWatch, states: list[ReqState]):
        while True:
            # Checked on a clock, not only when no update came: a non-streamed
            # request gets an update every step, and its client once went
            # unnoticed for the whole generation.
            if await watch.gone():
                logger.info("client disconnected; aborting %s", ", ".join(s.rid for s in states))
                raise ClientDisconnected
            try:
                return await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    def abort_request(self, rid: str) -> None:
        self.to_scheduler.send_pyobj(AbortReq(rid))

    def _tokenize_and_validate(self, obj: GenerateReqInput) -> list[TokenizedGenerateReq]:
        if (obj.text is None) == (obj.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        check_request_types(obj)
        if obj.text is not None:
            texts = [obj.text] if isinstance(obj.text, str) else list(obj.text)
            if self.tokenizer is None:
                raise ValueError("this server was started with --skip-tokenizer-init; send input_ids")
            prompts = [self.tokenizer.encode(t) for t in texts]
        else:
            ids = obj.input_ids
            prompts = [list(ids)] if ids and isinstance(ids[0], int) else [list(p) for p in ids]
            if not ids:
                prompts = [[]]
        if not prompts:
            raise ValueError("the batch is empty")
        top = obj.top_logprobs_num
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be an integer in 0..{MAX_TOP_LOGPROBS}, got {top!r}")
        params = obj.sampling_params or {}
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
        rids = obj.rid if isinstance(obj.rid, list) else [obj.rid] * len(prompts)
        if len(prompts) > 1 and not isinstance(obj.rid, list):
            rids = [None] * len(prompts)
        out = []
        for prompt, p, rid in zip(prompts, params_list, rids):
            sampling = parse_sampling_params(p)
            if not prompt:
                raise ValueError("the prompt is empty")
            if sampling.max_new_tokens is None:
                room = min(self.context_len, self.kv_capacity) - len(prompt)
                sampling.max_new_tokens = max(sampling.min_new_tokens, room)  # too long: _check_length says so
            self._check_ids(prompt)
            self._check_logit_bias(sampling)
            if (spec := grammar_spec_of(sampling)) is not None:
                check_grammar(spec)  # a 400 with the compiler's message, before anything is queued
            self._check_length(prompt, sampling)
            out.append(
                TokenizedGenerateReq(
                    rid or uuid.uuid4().hex,
                    prompt,
                    sampling,
                    stream=obj.stream,
                    return_logprob=obj.return_logprob,
                    top_logprobs_num=obj.top_logprobs_num,
                )
            )
        return out

    def _check_ids(self, prompt: list[int]) -> None:
        bad = first_out_of_vocab(prompt, self.vocab_size)
        if bad is not None:
            pos, token = bad
            raise ValueError(
                f"token id {token} at position {pos} is outside the vocabulary [0, {self.vocab_size})"
            )

    def _check_logit_bias(self, params: SamplingParams) -> None:
        bad = first_out_of_vocab(params.logit_bias_ids() or [0], self.vocab_size)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad[1]} is outside the vocabulary [0, {self.vocab_size})")

    def _check_length(self, prompt: list[int], params: SamplingParams) -> None:
        total = len(prompt) + params.max_new_tokens
        if total > self.context_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}: "
                f"{total} exceeds the context length of {self.context_len} tokens"
            )
        if total > self.kv_capacity:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}: "
                f"{total} exceeds the KV cache capacity of {self.kv_capacity} tokens"
            )

    # -- control -----------------------------------------------------------------

    async def flush_cache(self) -> bool:
        return (await self._control(FlushCacheReq(), FlushCacheReqOutput)).success

    async def get_internal_states(self) -> list[dict]:
        return [(await self._control(GetInternalStateReq(), GetInternalStateReqOutput)).state]

    async def _control(self, msg: Any, reply_type: type) -> Any:
        if self.dead_reason is not None:
            raise ServerDeadError(self.dead_reason)
        fut = asyncio.get_running_loop().create_future()
        self.control_waiters.setdefault(reply_type, []).append(fut)
        self.to_scheduler.send_pyobj(msg)
        return await asyncio.wait_for(fut, timeout=30)

    # -- receive loop ------------------------------------------------------------

    async def _recv_loop(self, recv: zmq.asyncio.Socket) -> None:
        while True:
            msg = await recv.recv_pyobj()
            if isinstance(msg, BatchStrOut):
                self._apply(msg)
            else:
                waiters = self.control_waiters.get(type(msg))
                if waiters:
                    fut = waiters.pop(0)
                    if not fut.done():
                        fut.set_result(msg)

    def _token_text(self, token_id: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _add_logprobs(self, state: ReqState, tokens: list, tops: list) -> None:
        if state.token_logprobs is None:
            state.token_logprobs, state.top_logprobs = [], []
        for (lp, tid), alts in zip(tokens, tops):
            state.token_logprobs.append([lp, tid, self._token_text(tid)])
            state.top_logprobs.append([[a_lp, a_id, self._token_text(a_id)] for a_lp, a_id in alts])

    def _apply(self, out: BatchStrOut) -> None:
        for i, rid in enumerate(out.rids):
            state = self.states.get(rid)
            if state is None:
                continue  # aborted and forgotten
            state.text += out.new_texts[i]
            state.output_ids.extend(out.new_token_ids[i])
            state.completion_tokens = out.completion_tokens[i]
            state.cached_tokens = out.cached_tokens[i]
            state.spec_verify_ct = out.spec_verify_ct[i]
            state.spec_accepted_tokens = out.spec_accepted_tokens[i]
            state.finish = out.finished_reasons[i]
            if out.new_token_logprobs[i] is not None:
                self._add_logprobs(state, out.new_token_logprobs[i], out.new_top_logprobs[i])
            if state.first_token_at is None and state.output_ids:
                state.first_token_at = time.monotonic()
            if state.finish is not None and state.finish.kind != "abort":
                self.last_finished_at = time.monotonic()
            if state.finish is not None and self.finish_listeners:
                result = state.result()
                ttft = None if state.first_token_at is None else state.first_token_at - state.created
                for listener in self.finish_listeners:
                    listener(result, ttft)
            state.queue.put_nowait(state)
