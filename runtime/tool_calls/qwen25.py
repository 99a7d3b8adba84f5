"""Hermes-style calls (Qwen2.5, Qwen3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

from runtime.tool_calls.base import (
    CallBuilder,
    Scanner,
    Segment,
    ToolCallParser,
    content_until_marker,
    loads_json,
)

START = "<tool_call>"
END = "</tool_call>"


class _HermesScanner(Scanner):
    def __init__(self, builder: CallBuilder) -> None:
        self._builder = builder

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        pos = 0
        while True:
            start = buf.find(START, pos)
            if start < 0:
                cut = content_until_marker(buf, pos, START, final)
                out.append(buf[pos:cut])
                return out, cut
            out.append(buf[pos:start])
            stop = buf.find(END, start + len(START))
            if stop < 0:
                if final:  # truncated call (e.g. max_tokens): the client gets the raw text
                    out.append(buf[start:])
                    return out, len(buf)
                return out, start
            call = self._builder.from_object(loads_json(buf[start + len(START) : stop]))
            stop += len(END)
            out.append(call if call is not None else buf[start:stop])
            pos = stop


class Qwen25ToolCallParser(ToolCallParser):
    def _new_scanner(self) -> Scanner:
        return _HermesScanner(self._builder)
