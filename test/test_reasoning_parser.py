"""Reasoning parsers (runtime/reasoning.py): <think> sections split off, parse vs. stream."""

from __future__ import annotations

import re
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.reasoning import REASONING_PARSERS, ReasoningParser, make_reasoning_parser

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# (parser, output, expected reasoning, expected content)
CASES: list[tuple[str, str, str | None, str]] = [
    # qwen3: reasoning only when the output opens with <think>
    ("qwen3", "<think>\nUser wants 2+2.\nIt is 4.\n</think>\n\nIt is 4.", "User wants 2+2.\nIt is 4.", "It is 4."),
    ("qwen3", "\n<think>\n\n</think>\n\nHello!", "", "Hello!"),  # thinking disabled, empty block
    ("qwen3", "Hello! No thinking here.", None, "Hello! No thinking here."),
    ("qwen3", "  Use <think> tags like </think> this.", None, "  Use <think> tags like </think> this."),
    ("qwen3", "<think>\nStill thinking when max_tokens hit", "Still thinking when max_tokens hit", ""),
    ("qwen3", "<think>思考：café “q” \\n</think>\n\n答案 </think> x", "思考：café “q” \\n", "答案 </think> x"),
    ("qwen3", "<thin", None, "<thin"),
    ("qwen3", "", None, ""),
    # deepseek-r1: the template opened <think>; the output starts inside it
    ("deepseek-r1", "Okay, 2+2 is 4.\n</think>\n\nThe answer is 4.", "Okay, 2+2 is 4.", "The answer is 4."),
    ("deepseek-r1", "<think>\nOkay.\n</think>\n\n**4**", "Okay.", "**4**"),
    ("deepseek-r1", "\nLong reasoning, cut off by max_tokens", "Long reasoning, cut off by max_tokens", ""),
    ("deepseek-r1", "</think>\n\nJust the answer.", "", "Just the answer."),
    ("deepseek-r1", "a < b; </thinking> is not the tag</think>x", "a < b; </thinking> is not the tag", "x"),
    ("deepseek-r1", "", "", ""),
]


def _id(case: tuple) -> str:
    return f"{case[0]}-{zlib.crc32(case[1].encode()) % 10_000:04d}"  # stable across runs


def stream_parse(parser: ReasoningParser, chunks: list[str]) -> tuple[str, str]:
    stream = parser.stream()
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    assert all(kind in ("reasoning", "content") and text for kind, text in events)
    kinds = [kind for kind, _ in events]
    if "content" in kinds:  # the reasoning section always comes first
        assert "reasoning" not in kinds[kinds.index("content") :]
    reasoning = "".join(text for kind, text in events if kind == "reasoning")
    content = "".join(text for kind, text in events if kind == "content")
    return reasoning, content


def sized_chunks(text: str, sizes: list[int]) -> list[str]:
    chunks, i, k = [], 0, 0
    while i < len(text):
        chunks.append(text[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return chunks


def check_all_splits(parser: ReasoningParser, text: str, sizes: list[int] | None = None) -> None:
    reasoning, content = parser.parse(text)
    splits = [[text], re.findall(r"\w+|\s+|.", text, flags=re.S), list(text)]
    if sizes:
        splits.append(sized_chunks(text, sizes))
    for chunks in splits:
        assert stream_parse(parser, chunks) == (reasoning or "", content), chunks


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_parse(case):
    name, text, reasoning, content = case
    assert make_reasoning_parser(name).parse(text) == (reasoning, content)


@pytest.mark.parametrize("case", CASES, ids=_id)
@SETTINGS
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_stream_matches_parse(case, sizes):
    check_all_splits(make_reasoning_parser(case[0]), case[1], sizes)


PIECES = ["<think>", "</think>", "<thi", "</th", "<", "/", ">", "\n", "\r\n", " ", "think", "text", "é"]


@pytest.mark.parametrize("name", list(REASONING_PARSERS))
@SETTINGS
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=16), sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6))
def test_any_text_any_split_agrees_with_parse(name, pieces, sizes):
    check_all_splits(make_reasoning_parser(name), "".join(pieces), sizes)


def test_reasoning_streams_before_the_tag_closes():
    stream = make_reasoning_parser("qwen3").stream()
    assert stream.feed("<think>\nStep one") == [("reasoning", "Step one")]
    assert stream.feed(".\n</thi") == [("reasoning", ".")]  # "\n</thi" may be the closing tag
    assert stream.feed("nk>\n\nDone") == [("content", "Done")]
    assert stream.finish() == []


def test_registry_names_and_unknown_name():
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek-r1"}
    for name, parser_class in REASONING_PARSERS.items():
        assert isinstance(make_reasoning_parser(name), parser_class)
    with pytest.raises(ValueError, match="qwen3.*deepseek-r1"):
        make_reasoning_parser("deepseek_r1")
