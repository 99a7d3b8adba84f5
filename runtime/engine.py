"""The offline Engine: the whole server minus HTTP, called from Python.

    from runtime import Engine
    with Engine(model_path="...") as engine:
        out = engine.generate("Hello", {"max_new_tokens": 16, "temperature": 0})

The tokenizer manager runs on an event loop in a background thread, so the
synchronous methods work from plain scripts and `async_generate` works from
any caller's event loop.

No `if __name__ == "__main__":` guard is needed (the child processes never
import the caller's script: runtime/child_process.py), and an Engine left
open when the script ends is shut down at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import logging
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from managers.io_struct import GenerateReqInput
from managers.tokenizer_manager import TokenizerManager
from runtime.launch import launch_children
from runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Batches at least this large show a progress bar unless told otherwise.
PROGRESS_BAR_MIN_PROMPTS = 8


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", "error")
        self.server_args = ServerArgs(**kwargs)
        if self.server_args.node_rank != 0:
            raise ValueError(
                "an Engine runs on node 0; start the other nodes with "
                "`python -m runtime.launch_server --node-rank N ...`"
            )
        self.children = launch_children(self.server_args)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()
        ready = self.children.ready
        self.tokenizer_manager = TokenizerManager(self.server_args, self.children.port_args, ready)
        self._run(self._start())
        self.children.watch(
            lambda reason: self.loop.call_soon_threadsafe(self.tokenizer_manager.fail_all, reason),
            has_pending_work=self.tokenizer_manager.is_busy,
            watchdog_timeout=self.server_args.watchdog_timeout,
        )
        self._closed = False
        # At exit, while the loop thread still runs (by the time __del__ runs
        # during interpreter teardown, it may be frozen). A weak reference:
        # the hook must not keep an unused Engine alive.
        self._atexit = functools.partial(_shutdown_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    async def _start(self) -> None:
        self.tokenizer_manager.start()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # -- generation --------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        show_progress: bool | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """One dict per output ({"text", "output_ids", "meta_info"}); a list
        for batches or n > 1. With stream=True, an iterator of chunks."""
        obj = GenerateReqInput(prompt, input_ids, sampling_params, stream=stream,
                               return_logprob=return_logprob, top_logprobs_num=top_logprobs_num)
        if stream:
            return self._stream(obj)
        results = self._run(self._collect(obj, show_progress))
        return results[0] if _single_output(obj) else results

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        obj = GenerateReqInput(prompt, input_ids, sampling_params, stream=stream,
                               return_logprob=return_logprob, top_logprobs_num=top_logprobs_num)
        if stream:
            return self._astream(obj)
        future = asyncio.run_coroutine_threadsafe(self._collect(obj, False), self.loop)
        results = await asyncio.wrap_future(future)
        return results[0] if _single_output(obj) else results

    async def _collect(self, obj: GenerateReqInput, show_progress: bool | None) -> list[dict]:
        results: dict[int, dict] = {}
        bar = None
        count = len(obj.text) if isinstance(obj.text, list) else 1
        if show_progress or (show_progress is None and count >= PROGRESS_BAR_MIN_PROMPTS):
            from tqdm import tqdm

            bar = tqdm(total=count, desc="generate", unit="req")
        try:
            async for result in self.tokenizer_manager.generate_request(obj):
                results[result.pop("index")] = result
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in sorted(results)]

    def _stream(self, obj: GenerateReqInput) -> Iterator[dict]:
        stream = self.tokenizer_manager.generate_request(obj)
        try:
            while True:
                try:
                    chunk = self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            self._run(stream.aclose())

    async def _astream(self, obj: GenerateReqInput) -> AsyncIterator[dict]:
        stream = self.tokenizer_manager.generate_request(obj)
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(stream.__anext__(), self.loop)
                try:
                    chunk = await asyncio.wrap_future(future)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stream.aclose(), self.loop))

    # -- control -----------------------------------------------------------------

    def flush_cache(self) -> bool:
        return self._run(self.tokenizer_manager.flush_cache())

    def get_server_info(self) -> dict:
        info = dataclasses.asdict(self.server_args)
        info["internal_states"] = self._run(self.tokenizer_manager.get_internal_states())
        info["max_total_num_tokens"] = self.children.ready.max_total_num_tokens
        info["cpu"] = self.children.ready.cpu
        return info

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        atexit.unregister(self._atexit)
        self._run(self.tokenizer_manager.close())
        self.children.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            if sys.is_finalizing():
                # The loop thread may be frozen: waiting on it would hang the
                # exit. The children are what must not outlive us.
                self.children.shutdown()
            else:
                self.shutdown()
        except Exception:
            pass


def _shutdown_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _single_output(obj: GenerateReqInput) -> bool:
    params = obj.sampling_params
    n = params.get("n", 1) if isinstance(params, dict) else 1
    if n != 1:
        return False
    if obj.text is not None:
        return isinstance(obj.text, str)
    return bool(obj.input_ids) and isinstance(obj.input_ids[0], int)
