"""Chat completion output, response side: a choice's text split into
reasoning (`--reasoning-parser`), content and tool calls
(`--tool-call-parser`), whole (`message`) or as OpenAI stream deltas. The
deltas of a choice concatenate to its whole message."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from runtime.reasoning import ReasoningStream, make_reasoning_parser
from runtime.tool_calls import make_tool_call_parser
from runtime.tool_calls.base import ToolCallStream


@dataclass(frozen=True)
class ChatOutputRules:
    """What to split off a chat choice's text (None: nothing of that kind)."""

    tool_parser: str | None = None
    tools: list[dict] | None = None
    reasoning_parser: str | None = None
    max_calls: int | None = None  # parallel_tool_calls false: the first call only

    @property
    def plain(self) -> bool:
        return self.tool_parser is None and self.reasoning_parser is None


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ChatChoiceStream:
    """One choice's text deltas in, OpenAI `delta` objects out."""

    rules: ChatOutputRules
    reasoning: ReasoningStream | None = None
    tools: ToolCallStream | None = None
    call_ids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rules.reasoning_parser is not None:
            self.reasoning = make_reasoning_parser(self.rules.reasoning_parser).stream()
        if self.rules.tool_parser is not None:
            self.tools = make_tool_call_parser(self.rules.tool_parser, self.rules.tools).stream()

    @property
    def made_calls(self) -> bool:
        return bool(self.call_ids)

    def feed(self, text: str) -> list[dict]:
        return self._split(self.reasoning.feed(text) if self.reasoning else [("content", text)], final=False)

    def finish(self) -> list[dict]:
        events = self.reasoning.finish() if self.reasoning else []
        return self._split(events, final=True)

    def _split(self, events: list[tuple[str, str]], final: bool) -> list[dict]:
        deltas: list[dict] = []
        for kind, text in events:
            if kind == "reasoning":
                deltas.append({"reasoning_content": text})
            elif self.tools is None:
                deltas.append({"content": text})
            else:
                deltas += self._tool_deltas(self.tools.feed(text))
        if final and self.tools is not None:
            deltas += self._tool_deltas(self.tools.finish())
        return [d for d in deltas if any(v for v in d.values())]

    def _tool_deltas(self, events) -> list[dict]:
        deltas = []
        for event in events:
            if not event.is_tool_call:
                deltas.append({"content": event.content})
                continue
            if self.rules.max_calls is not None and event.index >= self.rules.max_calls:
                continue
            call: dict = {"index": event.index}
            if event.index not in self.call_ids:
                self.call_ids[event.index] = _call_id()
                call.update(id=self.call_ids[event.index], type="function",
                            function={"name": event.name, "arguments": event.arguments})
            else:
                call["function"] = {"arguments": event.arguments}
            deltas.append({"tool_calls": [call]})
        return deltas


def chat_message(rules: ChatOutputRules, text: str) -> dict:
    """The whole `message` of a choice (the stream's deltas, folded)."""
    if rules.plain:
        return {"role": "assistant", "content": text}
    stream = ChatChoiceStream(rules)
    deltas = stream.feed(text) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    message: dict = {"role": "assistant", "content": content if content or not stream.made_calls else None}
    if rules.reasoning_parser is not None:
        message["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas) or None
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                     "function": {"name": None, "arguments": ""}})
            entry["function"]["name"] = call["function"].get("name") or entry["function"]["name"]
            entry["function"]["arguments"] += call["function"].get("arguments", "")
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
