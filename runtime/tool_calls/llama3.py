"""Llama-3.1/3.2 JSON calls: ``<|python_tag|>{"name": ..., "parameters": {...}}; {...}``.

The model either opens its output with the JSON object (the python tag is optional)
or switches to a call later with an explicit ``<|python_tag|>``. A bare ``{`` in the
middle of prose is never a call, and neither is a leading JSON object that is not
shaped like a call (JSON-mode answers), which stays content.
"""

from __future__ import annotations

from runtime.tool_calls.base import (
    CallBuilder,
    Scanner,
    Segment,
    ToolCall,
    ToolCallParser,
    bracket_span_end,
    content_until_marker,
    loads_json,
    skip_ws,
)

TAG = "<|python_tag|>"

# Outcomes of reading a call at a position, besides (call or None, end).
_MORE = "more"
_NO_CALL = "no-call"


class _Llama3Scanner(Scanner):
    def __init__(self, builder: CallBuilder) -> None:
        self._builder = builder
        # "start": nothing but whitespace so far; "after_call": right after a call (a
        # ";" may chain another); "text": in prose, only an explicit tag starts a call.
        self._state = "start"

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        pos = 0
        while True:
            if self._state == "text":
                start = buf.find(TAG, pos)
                if start < 0:
                    cut = content_until_marker(buf, pos, TAG, final)
                    out.append(buf[pos:cut])
                    return out, cut
                out.append(buf[pos:start])
                pos = start
            result = self._call_at(
                buf,
                pos,
                final,
                separator_ok=self._state == "after_call",
                bare_ok=self._state != "text",
            )
            if result == _MORE:
                if final:  # truncated call
                    out.append(buf[pos:])
                    return out, len(buf)
                return out, pos
            if result == _NO_CALL:
                if self._state == "text":  # a tag not followed by JSON: keep it as text
                    out.append(TAG)
                    pos += len(TAG)
                self._state = "text"
                continue
            call, end = result  # type: ignore[misc]
            if call is None:
                out.append(buf[pos:end])
                self._state = "text"
            else:
                out.append(call)
                self._state = "after_call"
            pos = end

    def _call_at(
        self, buf: str, at: int, final: bool, *, separator_ok: bool, bare_ok: bool
    ) -> str | tuple[ToolCall | None, int]:
        """Read ``[;] [<|python_tag|>] {json}`` (with whitespace between) at ``at``."""
        i = skip_ws(buf, at)
        if separator_ok and buf.startswith(";", i):
            i = skip_ws(buf, i + 1)
        if buf.startswith(TAG, i):
            i = skip_ws(buf, i + len(TAG))
        elif not bare_ok:
            return _NO_CALL
        elif not final and i < len(buf) and TAG.startswith(buf[i:]):
            return _MORE
        if i == len(buf):
            return _NO_CALL if final else _MORE
        if buf[i] != "{":
            return _NO_CALL
        end = bracket_span_end(buf, i)
        if end is None:
            return _MORE
        return self._builder.from_object(loads_json(buf[i:end])), end


class Llama3ToolCallParser(ToolCallParser):
    def _new_scanner(self) -> Scanner:
        return _Llama3Scanner(self._builder)
