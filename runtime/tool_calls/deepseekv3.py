"""DeepSeek-V3 calls, written with the tokenizer's special tokens (full-width bars, ``▁``)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {...}
    ```<｜tool▁call▁end｜><｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Each inner call is decided on its own as soon as its end token arrives, so a truncated
last call does not take the complete calls before it down with it.
"""

from __future__ import annotations

from runtime.tool_calls.base import (
    CallBuilder,
    Scanner,
    Segment,
    ToolCall,
    ToolCallParser,
    content_until_marker,
    loads_json,
    skip_ws,
)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

# Outcomes of reading one call at a position, besides (call or None, end).
_MORE = "more"  # incomplete: may still become a call
_NOT_A_CALL = "not-a-call"  # no call begins here


class _DeepSeekV3Scanner(Scanner):
    def __init__(self, builder: CallBuilder) -> None:
        self._builder = builder
        self._in_block = False  # between CALLS_BEGIN and CALLS_END
        # Whether the current block produced a call: only then are its tokens markup;
        # a block of nothing but invalid calls comes back verbatim.
        self._block_has_call = False

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        pos = 0
        while True:
            if not self._in_block:
                start = buf.find(CALLS_BEGIN, pos)
                if start < 0:
                    cut = content_until_marker(buf, pos, CALLS_BEGIN, final)
                    out.append(buf[pos:cut])
                    return out, cut
                out.append(buf[pos:start])
                # CALLS_BEGIN is consumed together with the first call, so that an output
                # cut inside that call comes back verbatim, opening token included.
                result = self._call_at(buf, skip_ws(buf, start + len(CALLS_BEGIN)), final)
                if result == _MORE:
                    if final:
                        out.append(buf[start:])
                        return out, len(buf)
                    return out, start
                if result == _NOT_A_CALL:
                    pos = start + len(CALLS_BEGIN)
                    out.append(buf[start:pos])
                    continue
                call, end = result  # type: ignore[misc]
                out.append(call if call is not None else buf[start:end])
                self._in_block = True
                self._block_has_call = call is not None
                pos = end
            else:
                at = skip_ws(buf, pos)
                rest = buf[at:]
                if rest.startswith(CALLS_END):
                    self._in_block = False
                    if not self._block_has_call:
                        out.append(buf[pos : at + len(CALLS_END)])
                    pos = at + len(CALLS_END)
                    continue
                result = self._call_at(buf, at, final)
                if result == _MORE:
                    if final:
                        out.append(buf[pos:])
                        return out, len(buf)
                    return out, pos
                if result == _NOT_A_CALL:
                    if not final and CALLS_END.startswith(rest):
                        return out, pos
                    self._in_block = False  # stray text: the block is over, scan it as text
                    continue
                call, end = result  # type: ignore[misc]
                if call is None:
                    out.append(buf[pos:end])
                else:
                    out.append(call)  # the whitespace before it is markup
                    self._block_has_call = True
                pos = end

    def _call_at(self, buf: str, at: int, final: bool) -> str | tuple[ToolCall | None, int]:
        if not buf.startswith(CALL_BEGIN, at):
            rest = buf[at:]
            return _MORE if not final and CALL_BEGIN.startswith(rest) else _NOT_A_CALL
        stop = buf.find(CALL_END, at + len(CALL_BEGIN))
        if stop < 0:
            return _MORE
        call = self._parse_call(buf[at + len(CALL_BEGIN) : stop])
        return call, stop + len(CALL_END)

    def _parse_call(self, body: str) -> ToolCall | None:
        kind, sep, rest = body.partition(SEP)
        if not sep or kind.strip() != "function":
            return None
        name, _, arguments = rest.partition("\n")
        arguments = arguments.strip()
        if arguments.startswith("```"):  # the arguments sit in a ```json fence
            if len(arguments) < 6 or not arguments.endswith("```"):
                return None
            arguments = arguments[3:-3]
            if arguments.startswith("json"):
                arguments = arguments[4:]
        value = loads_json(arguments)
        if not isinstance(value, dict):  # also bad JSON: build() would read None as "no arguments"
            return None
        return self._builder.build(name.strip(), value)


class DeepSeekV3ToolCallParser(ToolCallParser):
    def _new_scanner(self) -> Scanner:
        return _DeepSeekV3Scanner(self._builder)
