"""A generate request's life on the front end (TokenizerManager): its state
until it finishes (and the result dict it becomes), how often a stream
yields (--stream-interval), the watch on its HTTP client, and the errors a
caller sees. Torch-free, like the tokenizer manager."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from managers.io_struct import FinishReason

DISCONNECT_POLL_S = 0.5


@dataclass
class ReqState:
    rid: str
    index: int
    prompt_tokens: int
    queue: asyncio.Queue
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0
    finish: FinishReason | None = None
    # [logprob, token id, token text] per output token, when asked for.
    token_logprobs: list[list] | None = None
    top_logprobs: list[list[list]] | None = None

    def result(self) -> dict:
        out = {
            "index": self.index,
            "text": self.text,
            "output_ids": list(self.output_ids),
            "meta_info": {
                "id": self.rid,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
                # Speculative decoding: steps that verified guesses, and guesses accepted.
                "spec_verify_ct": self.spec_verify_ct,
                "spec_accepted_tokens": self.spec_accepted_tokens,
                "finish_reason": None if self.finish is None else self.finish.to_json(),
                "e2e_latency": time.monotonic() - self.created,
            },
        }
        if self.token_logprobs is not None:
            out["meta_info"]["output_token_logprobs"] = [list(x) for x in self.token_logprobs]
            out["meta_info"]["output_top_logprobs"] = [[list(a) for a in alts] for alts in self.top_logprobs]
        return out


class ServerDeadError(RuntimeError):
    """A child process died (or the watchdog gave up on it): a 500."""


class ServiceUnavailableError(RuntimeError):
    """The server is overloaded or shutting down: a 503 the client may retry."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerShuttingDownError(ServiceUnavailableError, ServerDeadError):
    """Open requests when the shutdown grace period ran out."""


class ClientDisconnected(Exception):
    """The HTTP client went away; its requests were aborted. Nobody to answer."""


class DisconnectWatch:
    """Asks the HTTP request whether its client left, at most every DISCONNECT_POLL_S."""

    def __init__(self, request: Any | None) -> None:
        self.request = request
        self.next_check = time.monotonic() + DISCONNECT_POLL_S

    async def gone(self) -> bool:
        if self.request is None or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + DISCONNECT_POLL_S
        return await self.request.is_disconnected()


def raise_if_refused(state: ReqState) -> None:
    """The scheduler refused the request before running it: an error for the
    caller (400 for bad input, 503 with a retry hint when overloaded)."""
    finish = state.finish
    if finish is None or finish.kind != "abort" or finish.status_code is None:
        return
    message = finish.message or "the request was refused"
    if finish.status_code == 503:
        raise ServiceUnavailableError(message)
    raise ValueError(message)


class StreamPacer:
    """--stream-interval N: a streamed request yields a chunk once N more
    tokens arrived since its last one. The first token goes out at once (time
    to first token is what streaming is for) and the final chunk always (the
    caller yields it on finish). Every chunk carries the cumulative text and
    ids, so a skipped update loses nothing: the next chunk includes it.

    Here rather than in the scheduler (SGLang's place) because only this side
    knows which requests stream, and one place covers /generate, the OpenAI
    routes and Engine alike."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.sent: dict[str, int] = {}  # rid -> output tokens in its last chunk

    def due(self, state: ReqState) -> bool:
        n = len(state.output_ids)
        last = self.sent.get(state.rid)
        if (last is None and n > 0) or (last is not None and n - last >= self.interval):
            self.sent[state.rid] = n
            return True
        return False
