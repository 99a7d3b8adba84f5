"""Incremental detokenization, in its own process.

For every request it keeps the output ids and two offsets into them, and
emits only text that is final: never half of a multi-byte character (the
tokenizer shows those as U+FFFD until the rest arrives) and, for requests
with stop strings, never the last few characters that could still turn
out to begin a stop string. When a stop string ends the request, the text
is cut right before it.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import zmq

from managers.io_struct import BatchStrOut, BatchTokenIDOut
from managers.liveness import exit_with_parent

if TYPE_CHECKING:
    from managers.process_config import DetokenizerProcessConfig

logger = logging.getLogger(__name__)


@dataclass
class _DecodeState:
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] is context for the next decode
    read_offset: int = 0  # ids before this are already in `text`
    text: str = ""  # decoded so far (possibly not all sent)
    sent: int = 0  # characters of `text` already sent


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _DecodeState] = {}

    def handle(self, batch: BatchTokenIDOut) -> BatchStrOut:
        out = BatchStrOut()
        for i, rid in enumerate(batch.rids):
            state = self.states.setdefault(rid, _DecodeState())
            finish = batch.finished_reasons[i]
            state.ids.extend(batch.new_token_ids[i])
            self._decode(state, batch.skip_special_tokens[i], final=finish is not None)
            text = state.text
            stops = batch.stop_strings[i]
            if finish is not None and isinstance(finish.matched, str):
                cut = text.find(finish.matched)
                if cut >= 0:
                    text = text[:cut]
            elif finish is None and stops:
                # Hold back what might be the start of a stop string.
                text = text[: max(state.sent, len(text) - (max(len(s) for s in stops) - 1))]
            out.rids.append(rid)
            out.new_texts.append(text[state.sent :])
            state.sent = max(state.sent, len(text))
            out.new_token_ids.append(batch.new_token_ids[i])
            out.finished_reasons.append(finish)
            out.prompt_tokens.append(batch.prompt_tokens[i])
            out.completion_tokens.append(batch.completion_tokens[i])
            out.cached_tokens.append(batch.cached_tokens[i])
            out.spec_verify_ct.append(batch.spec_verify_ct[i])
            out.spec_accepted_tokens.append(batch.spec_accepted_tokens[i])
            out.new_token_logprobs.append(batch.new_token_logprobs[i])
            out.new_top_logprobs.append(batch.new_top_logprobs[i])
            if finish is not None:
                del self.states[rid]
        return out

    def _decode(self, state: _DecodeState, skip_special: bool, final: bool) -> None:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip_special)  # noqa: E731
        context = decode(state.ids[state.prefix_offset : state.read_offset])
        full = decode(state.ids[state.prefix_offset :])
        if len(full) > len(context) and (final or not full.endswith("\ufffd")):
            state.text += full[len(context) :]
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.ids)


def run_detokenizer_process(config: DetokenizerProcessConfig, port_args, ready: Connection) -> None:
    from managers.scheduler_process import _configure_child_logging

    _configure_child_logging(config.log_level, "detokenizer")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(port_args.socket_dir, "detokenizer")
    parent = os.getppid()
    try:
        from managers.tokenizer_loading import load_tokenizer

        detokenizer = IncrementalDetokenizer(load_tokenizer(config.tokenizer))
        context = zmq.Context(1)
        context.setsockopt(zmq.LINGER, 0)  # never wait at exit for a reader that is gone
        recv = context.socket(zmq.PULL)
        recv.bind(port_args.detokenizer_input)
        send = context.socket(zmq.PUSH)
        send.connect(port_args.tokenizer_input)
        ready.send("ready")
    except BaseException as err:
        logger.exception("detokenizer failed to start")
        ready.send(err if isinstance(err, Exception) else RuntimeError(str(err)))
        raise SystemExit(1)
    while True:
        if not recv.poll(1000):
            if os.getppid() != parent:
                return
            continue
        send.send_pyobj(detokenizer.handle(recv.recv_pyobj()))
