"""Data types, validation and the streaming driver shared by every tool-call format.

Each format only supplies a :class:`Scanner`: given the not-yet-consumed text it says
which leading pieces are already decided (content or a complete call) and how far it
consumed. Everything else (whitespace trimming around calls, call indices, streaming
events, ``parse``) lives here, so the formats cannot disagree on those rules, and
``parse`` is literally "stream the whole text at once", so streaming and non-streaming
results cannot drift apart.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object (OpenAI sends it as a string)


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class StreamEvent:
    """Either content text (``content`` set) or a tool-call delta (``index`` set).

    ``name`` is set only on the first delta of a call; ``arguments`` is a fragment of
    the call's JSON arguments (the fragments of one index concatenate to the whole).
    """

    content: str | None = None
    index: int | None = None
    name: str | None = None
    arguments: str = ""

    @property
    def is_tool_call(self) -> bool:
        return self.index is not None


# What a scanner reports: content text, or a complete, validated call.
Segment = str | ToolCall


class Scanner(ABC):
    """Incremental splitter of one output into content and calls (one per output).

    ``scan(buf, final)`` gets the text not consumed so far and returns the decided
    segments plus how many characters of ``buf`` they cover. A decision made with
    ``final=False`` must not depend on text that may still arrive (that is what makes
    every split of the output give the same result); text that might still turn into
    a call is left unconsumed. With ``final=True`` everything must be consumed.
    A scanner may keep state between calls (e.g. "still at the start of the output").
    """

    @abstractmethod
    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]: ...


@dataclass(frozen=True)
class CallBuilder:
    """Turns a (name, arguments) pair the model wrote into a ToolCall, or None if invalid."""

    known_names: frozenset[str] | None = None  # None: any name is accepted

    def build(self, name: object, arguments: object) -> ToolCall | None:
        if not isinstance(name, str) or not name:
            return None
        if self.known_names is not None and name not in self.known_names:
            return None  # a hallucinated function: the client could not execute it
        if arguments is None:
            arguments = {}  # models often omit the arguments of a no-argument function
        if not isinstance(arguments, dict):
            return None
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))

    def from_object(self, obj: object, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
        """A call written as a JSON object ``{"name": ..., "arguments": {...}}``."""
        if not isinstance(obj, dict):
            return None
        arguments = next((obj[k] for k in argument_keys if k in obj), None)
        return self.build(obj.get("name"), arguments)


def tool_names(tools: list[dict] | None) -> frozenset[str] | None:
    """Function names declared in OpenAI-shaped ``tools`` (None when no tools were given)."""
    if tools is None:
        return None
    names = set()
    for tool in tools:
        if hasattr(tool, "model_dump"):  # a pydantic request model instead of a dict
            tool = tool.model_dump()
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def loads_json(text: str) -> Any | None:
    """json.loads, but None on any error and on NaN/Infinity (they would not round-trip
    as JSON in the ``arguments`` string we hand to the client)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``:
    the trailing characters that may still become the marker once more text arrives."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def bracket_span_end(text: str, start: int, quotes: str = '"') -> int | None:
    """End (exclusive) of the bracketed span opening at ``text[start]``, or None if it
    does not close within ``text``. Brackets inside quoted strings do not count; any
    mismatch of bracket kinds is left for the real parser to reject."""
    depth = 0
    quote: str | None = None
    i = start
    while i < len(text):
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in quotes:
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def content_until_marker(buf: str, pos: int, marker: str, final: bool) -> int:
    """Where content starting at ``pos`` (containing no whole ``marker``) may be cut now:
    the end, less any tail that could still grow into the marker."""
    if final:
        return len(buf)
    return len(buf) - partial_marker_len(buf[pos:], marker)


class ToolCallStream:
    """Stateful streaming parser for one output: ``feed`` deltas, then ``finish`` once."""

    def __init__(self, scanner: Scanner) -> None:
        self._scanner = scanner
        self._buf = ""  # text the scanner has not consumed yet
        self._held_ws = ""  # trailing content whitespace: dropped if a call follows
        self._after_call = False  # drop leading whitespace of the content after a call
        self._next_index = 0
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        events = self._run(final=True)
        if self._held_ws:  # whitespace at the very end of the output is ordinary content
            self._emit_text(self._held_ws, events)
            self._held_ws = ""
        self._finished = True
        return events

    def _run(self, final: bool) -> list[StreamEvent]:
        segments, consumed = self._scanner.scan(self._buf, final)
        assert consumed == len(self._buf) or not final, "a final scan must consume everything"
        self._buf = self._buf[consumed:]
        events: list[StreamEvent] = []
        for segment in segments:
            if isinstance(segment, ToolCall):
                self._held_ws = ""
                self._after_call = True
                events.append(StreamEvent(index=self._next_index, name=segment.name, arguments=segment.arguments))
                self._next_index += 1
            elif segment:
                self._content(segment, events)
        return events

    def _content(self, text: str, events: list[StreamEvent]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        self._emit_text(body, events)

    @staticmethod
    def _emit_text(text: str, events: list[StreamEvent]) -> None:
        if not text:
            return
        if events and events[-1].content is not None:
            events[-1].content += text  # one content event per feed is enough
        else:
            events.append(StreamEvent(content=text))


def collect_events(events: list[StreamEvent]) -> ParsedOutput:
    """Fold streaming events into the non-streaming result (what a client would rebuild)."""
    content: list[str] = []
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if event.index is None:
            content.append(event.content or "")
            continue
        if event.name is not None and event.index not in names:
            names[event.index] = event.name
        arguments.setdefault(event.index, []).append(event.arguments)
    calls = [ToolCall(names.get(i, ""), "".join(arguments[i])) for i in sorted(arguments)]
    return ParsedOutput("".join(content), calls)


class ToolCallParser(ABC):
    """One model family's tool-call syntax. Stateless: use ``stream()`` per output."""

    def __init__(self, tools: list[dict] | None = None) -> None:
        self._builder = CallBuilder(tool_names(tools))

    @abstractmethod
    def _new_scanner(self) -> Scanner: ...

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self._new_scanner())

    def parse(self, text: str) -> ParsedOutput:
        stream = self.stream()
        return collect_events(stream.feed(text) + stream.finish())
