"""A chat choice split into reasoning, content and tool calls: whole and as
stream deltas, which fold back into the whole message for any split."""

from __future__ import annotations

import json

import pytest

from runtime.chat_output import ChatChoiceStream, ChatOutputRules, chat_message

TEXT = ('<think>\nThe user wants weather.\n</think>\n\nLet me check. <tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]
RULES = ChatOutputRules(tool_parser="qwen25", tools=TOOLS, reasoning_parser="qwen3")


def fold(deltas: list[dict]) -> dict:
    """What a client does with stream deltas (OpenAI's accumulation rules)."""
    message: dict = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for d in deltas:
        message["content"] += d.get("content", "")
        message["reasoning_content"] += d.get("reasoning_content", "")
        for call in d.get("tool_calls", ()):
            entry = message["tool_calls"].setdefault(call["index"], {"name": None, "arguments": "", "id": None})
            entry["id"] = entry["id"] or call.get("id")
            entry["name"] = entry["name"] or call["function"].get("name")
            entry["arguments"] += call["function"].get("arguments", "")
    return message


def test_reasoning_then_a_call_inside_the_answer():
    message = chat_message(RULES, TEXT)
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Let me check."
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Zürich"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_stream_deltas_fold_into_the_message(size):
    stream = ChatChoiceStream(RULES)
    deltas = []
    for i in range(0, len(TEXT), size):
        deltas += stream.feed(TEXT[i : i + size])
    deltas += stream.finish()
    folded = fold(deltas)
    whole = chat_message(RULES, TEXT)
    assert folded["content"] == whole["content"] and folded["reasoning_content"] == whole["reasoning_content"]
    got = [(c["name"], c["arguments"]) for _, c in sorted(folded["tool_calls"].items())]
    assert got == [(c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"]]
    first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert first["id"] and first["function"]["name"] == "get_weather"  # id and name come first


def test_parallel_calls_off_keeps_the_first_and_plain_rules_pass_text_through():
    one = chat_message(ChatOutputRules(tool_parser="qwen25", tools=TOOLS, max_calls=1), TEXT)
    assert [c["function"]["name"] for c in one["tool_calls"]] == ["get_weather"]
    assert chat_message(ChatOutputRules(), TEXT) == {"role": "assistant", "content": TEXT}
