"""Mistral calls: ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` objects."""

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

MARKER = "[TOOL_CALLS]"


class _MistralScanner(Scanner):
    def __init__(self, builder: CallBuilder) -> None:
        self._builder = builder

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        pos = 0
        while True:
            start = buf.find(MARKER, pos)
            if start < 0:
                cut = content_until_marker(buf, pos, MARKER, final)
                out.append(buf[pos:cut])
                return out, cut
            out.append(buf[pos:start])
            body = skip_ws(buf, start + len(MARKER))
            if body == len(buf) and not final:
                return out, start
            if body == len(buf) or buf[body] not in "[{":
                # No JSON after the marker: keep the marker as text and scan on.
                out.append(buf[start:body])
                pos = body
                continue
            end = bracket_span_end(buf, body)
            if end is None:
                if final:
                    out.append(buf[start:])
                    return out, len(buf)
                return out, start
            calls = self._calls(buf[body:end])
            if calls is None:
                out.append(buf[start:end])
            else:
                out.extend(calls)
            pos = end

    def _calls(self, text: str) -> list[ToolCall] | None:
        """All calls of the array, or None if any of them is invalid (then all is text)."""
        value = loads_json(text)
        items = [value] if isinstance(value, dict) else value
        if not isinstance(items, list) or not items:
            return None
        calls = [self._builder.from_object(item) for item in items]
        if any(call is None for call in calls):
            return None
        return calls  # type: ignore[return-value]


class MistralToolCallParser(ToolCallParser):
    def _new_scanner(self) -> Scanner:
        return _MistralScanner(self._builder)
