"""Tool calls and reasoning on /v1/chat/completions, with the official
`openai` client against a real server (--tool-call-parser qwen25,
--reasoning-parser qwen3): forced calls are valid for their declared
parameters, streamed calls concatenate to the non-streamed ones, a tool
history is accepted, bad tool schemas are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_helpers import start_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
                       "additionalProperties": False},
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# Qwen3's non-thinking mode: with the reasoning parser on, a grammar would
# otherwise let the model think first, and a random model may never stop.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def client(tiny_qwen3, tmp_path_factory):
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"), "--dtype", "float32",
                       "--tool-call-parser", "qwen25", "--reasoning-parser", "qwen3",
                       "--constrained-json-disable-any-whitespace")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    srv.stop()


def _check_call(call, tool) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_calls_are_valid_and_stream_alike(client, choice):
    tools = [WEATHER, TIME]
    out = client.chat.completions.create(model="default", messages=MESSAGES, tools=tools, tool_choice=choice,
                                         max_tokens=60, temperature=0, extra_body=NO_THINKING)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    tool = TIME if isinstance(choice, dict) else next(t for t in tools if t["function"]["name"] == call.function.name)
    _check_call(call, tool)
    assert not message.content

    chunks = list(client.chat.completions.create(model="default", messages=MESSAGES, tools=tools, tool_choice=choice,
                                                 max_tokens=60, temperature=0, stream=True, extra_body=NO_THINKING))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == call.function.name and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_history_is_accepted_and_auto_may_answer_in_text(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    out = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], max_tokens=8,
                                         temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.usage.completion_tokens == 8


def test_bad_tools_are_400s(client):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=MESSAGES, tools=[bad], max_tokens=4)
    assert "tools[0].function.parameters (f) is not a usable JSON schema" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="default", messages=MESSAGES, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "missing"}})
    assert "'missing', which is not in tools" in err.value.body["message"]
    assert client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2


def test_reasoning_is_split_off_the_answer(client):
    """A grammar makes the random model think first; the parser splits it off.
    (With thinking on, the server would free the reasoning from the grammar:
    test_grammar.py checks that grammar.)"""
    ebnf = 'root ::= "<think>" [a-z]{3,6} "</think>" [a-z]{2,5}'
    # separate_reasoning false: the grammar covers the whole output, thinking included.
    whole = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=40, temperature=0,
                                           extra_body={"ebnf": ebnf, "separate_reasoning": False})
    assert whole.choices[0].message.content.startswith("<think>")
    out = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=40, temperature=0,
                                         extra_body={"ebnf": ebnf, **NO_THINKING})
    message = out.choices[0].message
    assert message.reasoning_content and message.reasoning_content.isalpha()
    assert message.content and message.content.isalpha() and "<think>" not in message.content
    chunks = list(client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=40, temperature=0,
                                                 extra_body={"ebnf": ebnf, **NO_THINKING}, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (message.reasoning_content, message.content)
    # enable_thinking false reached the template: it closed an empty <think> block in the prompt.
    assert out.usage.prompt_tokens > whole.usage.prompt_tokens
