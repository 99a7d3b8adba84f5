"""Stopping the HTTP server without cutting a response in half.

On SIGTERM the server stops taking new generate calls (503), gives the ones
in flight up to `--shutdown-grace` seconds to finish, then fails whatever is
left through the tokenizer manager: an open stream ends with an error event
and `[DONE]`, a waiting non-streamed call gets a 503 body. Only then is
uvicorn told to exit, so every response it closes is already complete.
SIGINT does the same with no grace; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from managers.request_state import ServerShuttingDownError

logger = logging.getLogger(__name__)

# After failing the stragglers, time for their handlers to write the error out.
FLUSH_S = 0.3
POLL_S = 0.05


@dataclass
class DrainState:
    """What routes read: True once a shutdown has begun."""

    draining: bool = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_state: DrainState, get_tm: Callable[[], Any],
                 grace_s: float) -> None:
        super().__init__(config)
        self.drain_state = drain_state
        self.get_tm = get_tm
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes of the event loop.
        if self.drain_state.draining or self.loop is None:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        self.drain_state.draining = True
        grace = self.grace_s if sig == signal.SIGTERM else 0.0
        logger.info("received %s: draining (grace %.0f s)", signal.Signals(sig).name, grace)
        self.loop.call_soon_threadsafe(self._start_drain, grace)

    def _start_drain(self, grace_s: float) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(grace_s))

    async def _drain(self, grace_s: float) -> None:
        tm = self.get_tm()
        deadline = time.monotonic() + grace_s
        while tm is not None and tm.is_busy() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if tm is not None and tm.is_busy():
            left = len(tm.states)
            logger.warning("shutdown grace over: ending %d unfinished request(s) with an error", left)
            tm.fail_all("the server is shutting down", ServerShuttingDownError)
            await asyncio.sleep(FLUSH_S)
        elif tm is not None:
            tm.dead_reason = "the server is shutting down"
        self.should_exit = True
