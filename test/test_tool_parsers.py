"""Tool-call parsers (runtime/tool_calls): realistic outputs per format, parse vs. stream.

Every case is checked non-streaming against the expected result and streamed whole,
in "token" chunks, in random chunk sizes and one character at a time: the streamed
events must rebuild exactly what ``parse`` returns.
"""

from __future__ import annotations

import json
import re
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.tool_calls import (
    TOOL_CALL_PARSERS,
    ParsedOutput,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    collect_events,
    make_tool_call_parser,
)
from runtime.tool_calls.deepseekv3 import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

FAST = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
]

WEATHER = {"city": "Paris", "unit": "celsius"}
# Nested, non-ASCII, escaped quotes and backslashes, every JSON scalar type.
NESTED = {
    "query": 'café "naïve" 日本 \\ path',
    "filters": {"tags": ["a", "b]", "{c}"], "range": {"min": -1.5, "max": None}},
    "exact": True,
    "limit": 10,
}


PROSE_MISTRAL = "Lists look like [1, 2] and [TOOL_CALLS is a token."
PROSE_PYTHONIC = "See [1] and [the docs](https://example.com), or a[i](x)."


def call(name: str, arguments: dict) -> ToolCall:
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def hermes(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def deepseek(name: str, arguments: dict | str) -> str:
    body = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{body}\n```{CALL_END}"


def llama(name: str, arguments: dict, key: str = "parameters") -> str:
    return json.dumps({"name": name, key: arguments}, ensure_ascii=False)


# (parser name, model output, expected content, expected calls)
CASES: list[tuple[str, str, str, list[ToolCall]]] = [
    # qwen25 (Hermes)
    ("qwen25", hermes("get_weather", WEATHER), "", [call("get_weather", WEATHER)]),
    (
        "qwen25",
        "Let me check both cities.\n\n"
        + hermes("get_weather", WEATHER)
        + "\n"
        + hermes("get_weather", {"city": "Rome"}),
        "Let me check both cities.",
        [call("get_weather", WEATHER), call("get_weather", {"city": "Rome"})],
    ),
    ("qwen25", hermes("search", NESTED) + "\n", "", [call("search", NESTED)]),
    ("qwen25", hermes("search", {}) + "\nI searched.", "I searched.", [call("search", {})]),
    ("qwen25", "No tools needed: 2 < 3 and <b>bold</b>.", "No tools needed: 2 < 3 and <b>bold</b>.", []),
    # llama3
    ("llama3", llama("get_weather", WEATHER), "", [call("get_weather", WEATHER)]),
    (
        "llama3",
        "<|python_tag|>" + llama("get_weather", WEATHER) + "; " + llama("search", NESTED, key="arguments"),
        "",
        [call("get_weather", WEATHER), call("search", NESTED)],
    ),
    (
        "llama3",
        "Let me look that up.\n<|python_tag|>" + llama("search", NESTED),
        "Let me look that up.",
        [call("search", NESTED)],
    ),
    ("llama3", "  \n" + llama("get_weather", WEATHER) + "\n", "", [call("get_weather", WEATHER)]),
    ("llama3", 'Use {"name": "x"} as a template.', 'Use {"name": "x"} as a template.', []),
    ("llama3", '{"answer": 42, "name": null}', '{"answer": 42, "name": null}', []),  # JSON mode, not a call
    # mistral
    (
        "mistral",
        "[TOOL_CALLS] [" + llama("get_weather", WEATHER, key="arguments") + "]",
        "",
        [call("get_weather", WEATHER)],
    ),
    (
        "mistral",
        "I'll check.[TOOL_CALLS]["
        + llama("get_weather", WEATHER, "arguments")
        + ", "
        + llama("search", NESTED, "arguments")
        + "]",
        "I'll check.",
        [call("get_weather", WEATHER), call("search", NESTED)],
    ),
    ("mistral", PROSE_MISTRAL, PROSE_MISTRAL, []),
    # pythonic
    ("pythonic", '[get_weather(city="Paris", unit=\'celsius\')]', "", [call("get_weather", WEATHER)]),
    (
        "pythonic",
        'Sure, checking both.\n[get_weather(city="Paris", unit="celsius"), get_weather(city="Rome")]',
        "Sure, checking both.",
        [call("get_weather", WEATHER), call("get_weather", {"city": "Rome"})],
    ),
    (
        "pythonic",
        '[search(query=\'café "naïve" 日本 \\\\ path\', filters={"tags": ["a", "b]", "{c}"], '
        '"range": {"min": -1.5, "max": None}}, exact=True, limit=10), search()]',
        "",
        [call("search", NESTED), call("search", {})],
    ),
    ("pythonic", PROSE_PYTHONIC, PROSE_PYTHONIC, []),
    # deepseekv3
    ("deepseekv3", CALLS_BEGIN + deepseek("get_weather", WEATHER) + CALLS_END, "", [call("get_weather", WEATHER)]),
    (
        "deepseekv3",
        "Checking the weather and searching.\n\n" + CALLS_BEGIN + deepseek("get_weather", WEATHER) + "\n"
        + deepseek("search", NESTED) + CALLS_END,
        "Checking the weather and searching.",
        [call("get_weather", WEATHER), call("search", NESTED)],
    ),
    (
        "deepseekv3",
        CALLS_BEGIN + deepseek("search", {}) + CALLS_END + "\n\nDone.",
        "Done.",
        [call("search", {})],
    ),
]

# Outputs with a malformed, truncated or unknown call: (parser, output, expected content,
# expected calls). Valid calls before the broken one survive; the broken part is content.
BROKEN: list[tuple[str, str, str, list[ToolCall]]] = [
    ("qwen25", 'Hi\n<tool_call>\n{"name": "search", "arguments": {"q": 1}\n</tool_call>', None, []),  # bad JSON
    ("qwen25", '<tool_call>\n["search", {}]\n</tool_call>', None, []),  # not an object
    ("qwen25", '<tool_call>\n{"name": "search", "arguments": [1]}\n</tool_call>', None, []),  # arguments not an object
    ("qwen25", '<tool_call>\n{"name": "search", "arguments": {"x": NaN}}\n</tool_call>', None, []),
    ("qwen25", 'Hi\n<tool_call>\n{"name": "search", "argu', None, []),  # truncated
    ("qwen25", "Hi <tool_ca", None, []),
    (
        "qwen25",
        hermes("search", {}) + "\n" + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
        [call("search", {})],
    ),
    ("llama3", '{"name": "search", "parameters": {"q": ', None, []),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": 1}}}', '}', [call("search", {"q": 1})]),
    ("llama3", "<|python_tag|>print('hello')", None, []),  # code interpreter, not JSON
    (
        "llama3",
        llama("search", {}) + '; {"name": "get_weather", "parameters": {"ci',
        '; {"name": "get_weather", "parameters": {"ci',
        [call("search", {})],
    ),
    ("mistral", '[TOOL_CALLS] [{"name": "search", "arguments": {"q": 1}]', None, []),  # mismatched brackets
    ("mistral", '[TOOL_CALLS] [{"name": "search", "arguments": {"q": "abc', None, []),
    ("mistral", '[TOOL_CALLS] [{"name": "search", "arguments": {}}, {"arguments": {}}]', None, []),  # one nameless
    ("mistral", "[TOOL_CALLS]", None, []),
    ("pythonic", "[get_weather(city=os.environ['HOME'])]", None, []),  # not a literal
    ("pythonic", '[get_weather("Paris")]', None, []),  # positional
    ("pythonic", "[get_weather(city={1, 2})]", None, []),  # set
    ("pythonic", '[search(q="x"), 42]', None, []),
    ("pythonic", '[get_weather(city="Par', None, []),
    # Content pieces around a call are joined as they are, the whitespace at the call dropped.
    (
        "pythonic",
        'Text [search(q="x")] then [get_weather(city=',
        "Textthen [get_weather(city=",
        [call("search", {"q": "x"})],
    ),
    ("deepseekv3", CALLS_BEGIN + deepseek("search", '{"q": 1') + CALLS_END, None, []),  # bad JSON
    ("deepseekv3", CALLS_BEGIN + CALL_BEGIN + "function" + SEP + 'search\n```json\n{"q": ', None, []),
    ("deepseekv3", "Text" + CALLS_BEGIN + "oops", None, []),
    (
        "deepseekv3",
        CALLS_BEGIN + deepseek("search", {}) + "\n" + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n{",
        CALL_BEGIN + "function" + SEP + "get_weather\n```json\n{",
        [call("search", {})],
    ),
]

# Calls to a function not declared in TOOLS stay content (verbatim: nothing else is a call).
UNKNOWN: list[tuple[str, str]] = [
    ("qwen25", "I'll do it.\n" + hermes("delete_everything", {"force": True})),
    ("llama3", llama("delete_everything", {"force": True})),
    ("mistral", "[TOOL_CALLS] [" + ", ".join(llama(f, {}, "arguments") for f in ("get_weather", "rm")) + "]"),
    ("pythonic", "[delete_everything(force=True)]"),
    ("deepseekv3", CALLS_BEGIN + deepseek("delete_everything", {"force": True}) + CALLS_END),
]


def _id(case: tuple) -> str:
    return f"{case[0]}-{zlib.crc32(case[1].encode()) % 10_000:04d}"  # stable across runs


def token_chunks(text: str) -> list[str]:
    # Roughly what a BPE detokenizer hands out: words, runs of spaces, single symbols.
    return re.findall(r"\w+|\s+|.", text, flags=re.S)


def sized_chunks(text: str, sizes: list[int]) -> list[str]:
    chunks, i, k = [], 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        chunks.append(text[i : i + n])
        i += n
        k += 1
    return chunks


def stream_parse(parser: ToolCallParser, chunks: list[str]) -> ParsedOutput:
    stream = parser.stream()
    events: list[StreamEvent] = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    _check_events(events)
    return collect_events(events)


def _check_events(events: list[StreamEvent]) -> None:
    seen: set[int] = set()
    for event in events:
        if event.index is None:
            assert event.content, "content events carry text"
            assert event.name is None and event.arguments == ""
            continue
        assert event.content is None
        assert (event.name is not None) == (event.index not in seen), "name only on the first delta"
        assert event.index == len(seen) or event.index in seen, "indices count up from 0"
        seen.add(event.index)


def check_all_splits(parser: ToolCallParser, text: str, sizes: list[int] | None = None) -> ParsedOutput:
    expected = parser.parse(text)
    splits = [[text], token_chunks(text), list(text)]
    if sizes:
        splits.append(sized_chunks(text, sizes))
    for chunks in splits:
        assert stream_parse(parser, chunks) == expected, chunks
    return expected


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_realistic_outputs(case):
    name, text, content, calls = case
    for tools in (None, TOOLS):
        parser = make_tool_call_parser(name, tools)
        assert parser.parse(text) == ParsedOutput(content, calls)
        check_all_splits(parser, text)


@pytest.mark.parametrize("case", CASES + BROKEN, ids=_id)
@FAST
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_random_chunk_sizes(case, sizes):
    parser = make_tool_call_parser(case[0], TOOLS)
    check_all_splits(parser, case[1], sizes)


@pytest.mark.parametrize("case", BROKEN, ids=_id)
def test_malformed_or_truncated_calls_are_content(case):
    name, text, content, calls = case
    parser = make_tool_call_parser(name, TOOLS)
    # None: nothing in the output is a valid call, so it all comes back verbatim.
    assert parser.parse(text) == ParsedOutput(text if content is None else content, calls)
    check_all_splits(parser, text)


@pytest.mark.parametrize("case", UNKNOWN, ids=_id)
def test_unknown_function_stays_content(case):
    name, text = case
    assert make_tool_call_parser(name, TOOLS).parse(text) == ParsedOutput(text, [])
    check_all_splits(make_tool_call_parser(name, TOOLS), text)
    # Without a tool list every name is accepted.
    assert make_tool_call_parser(name, None).parse(text).tool_calls


def test_content_streams_before_the_output_ends():
    # Plain text is not held back until finish(): only a possible marker prefix waits.
    stream = make_tool_call_parser("qwen25", None).stream()
    assert [e.content for e in stream.feed("Hello wor")] == ["Hello wor"]
    assert [e.content for e in stream.feed("ld <tool")] == ["ld"]  # " <tool" may still open a call
    assert stream.feed("_call>\n" + json.dumps({"name": "f", "arguments": {"a": 1}})) == []
    assert stream.feed("\n</tool_call>") == [StreamEvent(index=0, name="f", arguments='{"a": 1}')]
    assert stream.finish() == []


# Random texts built from pieces of every format's markup: whatever comes out, it must
# not raise and every split must agree with parse().
PIECES = [
    "<tool_call>", "</tool_call>", "<tool_", "<|python_tag|>", "<|py", "[TOOL_CALLS]", "[TOOL",
    CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, "function", "\n```json\n", "\n```", "```",
    '{"name": "search", "arguments": {"q": "a]}\\"b"}}', '{"name": "get_weather", "parameters": {}}',
    '{"name": "search"', "search(q=1)", 'get_weather(city="x")', "[", "]", "{", "}", "(", ")", ";", ",",
    '"', "'", "\\", " ", "\n", "text", "é", "<", "|",
]


@pytest.mark.parametrize("name", list(TOOL_CALL_PARSERS))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=14), sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6))
def test_any_text_any_split_agrees_with_parse(name, pieces, sizes):
    text = "".join(pieces)
    for tools in (None, TOOLS):
        check_all_splits(make_tool_call_parser(name, tools), text, sizes)


def test_registry_names_and_unknown_name():
    assert set(TOOL_CALL_PARSERS) == {"qwen25", "llama3", "mistral", "pythonic", "deepseekv3"}
    for name, parser_class in TOOL_CALL_PARSERS.items():
        assert isinstance(make_tool_call_parser(name, None), parser_class)
    with pytest.raises(ValueError) as info:
        make_tool_call_parser("hermes", None)
    message = str(info.value)
    assert "hermes" in message
    assert all(name in message for name in TOOL_CALL_PARSERS)


def test_stream_objects_are_independent():
    parser = make_tool_call_parser("qwen25", None)
    first, second = parser.stream(), parser.stream()
    first.feed("<tool_call>\n")
    assert [e.content for e in second.feed("plain")] == ["plain"]
    assert collect_events(first.feed(hermes("f", {})[len("<tool_call>\n") :]) + first.finish()).tool_calls == [
        call("f", {})
    ]
