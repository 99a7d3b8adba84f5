"""Reasoning ("thinking") sections in model output: ``<think>...</think>`` split off the answer.

Parsers by SGLang's ``--reasoning-parser`` names (``REASONING_PARSERS``):

* ``qwen3``: reasoning only if the output opens (after optional whitespace) with
  ``<think>``; otherwise everything is content (Qwen3 with thinking disabled).
* ``deepseek-r1``: the chat template already opened ``<think>``, so the output is
  reasoning from its first character (a repeated leading ``<think>`` is dropped) up to
  ``</think>``; without ``</think>`` all of it is reasoning.

Newlines right after ``<think>``, right before ``</think>`` and right after
``</think>`` are layout, not text, and are dropped. ``parse`` is "stream it all at
once", so streaming and non-streaming agree for every split of the output.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from runtime.tool_calls.base import partial_marker_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_NEWLINES = "\r\n"

ReasoningKind = Literal["reasoning", "content"]
ReasoningEvent = tuple[ReasoningKind, str]


class ReasoningStream:
    """Per-output streaming splitter: ``feed`` deltas, then ``finish`` once."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        # start -> (opened -> reasoning -> closed ->) content; "opened"/"closed" drop
        # the newlines that follow a tag.
        self._state = "start"
        self._buf = ""  # text received but not yet emitted (held back or undecided)
        self.has_reasoning = starts_in_reasoning  # False: parse reports reasoning None
        self._finished = False

    def feed(self, delta: str) -> list[ReasoningEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._run(final=False)

    def finish(self) -> list[ReasoningEvent]:
        if self._finished:
            return []
        self._finished = True
        return self._run(final=True)

    def _run(self, final: bool) -> list[ReasoningEvent]:
        events: list[ReasoningEvent] = []
        while self._step(final, events):
            pass
        return events

    def _step(self, final: bool, events: list[ReasoningEvent]) -> bool:
        """Advance by one state; False when waiting for more text (or all is emitted)."""
        buf = self._buf
        if self._state == "start":
            rest = buf.lstrip()
            if rest.startswith(THINK_OPEN):
                self._buf = rest[len(THINK_OPEN) :]
                self._state = "opened"
                self.has_reasoning = True
                return True
            if not final and THINK_OPEN.startswith(rest):  # only whitespace / "<thi" so far
                return False
            self._state = "opened" if self._starts_in_reasoning else "content"
            return True
        if self._state in ("opened", "closed"):
            rest = buf.lstrip(_NEWLINES)
            self._buf = rest
            if not rest and not final:
                return False
            self._state = "reasoning" if self._state == "opened" else "content"
            return True
        if self._state == "reasoning":
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                self._emit("reasoning", buf[:end].rstrip(_NEWLINES), events)
                self._buf = buf[end + len(THINK_CLOSE) :]
                self._state = "closed"
                return True
            if final:  # never closed (e.g. max_tokens): all of it was reasoning
                self._emit("reasoning", buf, events)
                self._buf = ""
                return False
            # Hold back what may be the start of "</think>" and the newlines before it.
            body = buf[: len(buf) - partial_marker_len(buf, THINK_CLOSE)].rstrip(_NEWLINES)
            self._emit("reasoning", body, events)
            self._buf = buf[len(body) :]
            return False
        # content
        self._emit("content", buf, events)
        self._buf = ""
        return False

    @staticmethod
    def _emit(kind: ReasoningKind, text: str, events: list[ReasoningEvent]) -> None:
        if not text:
            return
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + text)
        else:
            events.append((kind, text))


class ReasoningParser:
    """Stateless; use ``stream()`` once per output."""

    starts_in_reasoning: ClassVar[bool] = False

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.starts_in_reasoning)

    def parse(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content); reasoning is None when the output has no reasoning section."""
        stream = self.stream()
        events = stream.feed(text) + stream.finish()
        reasoning = "".join(t for kind, t in events if kind == "reasoning")
        content = "".join(t for kind, t in events if kind == "content")
        return (reasoning if stream.has_reasoning else None), content


class Qwen3ReasoningParser(ReasoningParser):
    starts_in_reasoning = False


class DeepSeekR1ReasoningParser(ReasoningParser):
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": Qwen3ReasoningParser,
    "deepseek-r1": DeepSeekR1ReasoningParser,
}


def make_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        choices = ", ".join(REASONING_PARSERS)
        raise ValueError(f"unknown reasoning parser {name!r}; valid choices: {choices}") from None
