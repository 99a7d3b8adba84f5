"""The grammars behind tool_choice required / named: for every
--tool-call-parser format, a valid call in that format is a complete output
and parses back to the same call; wrong arguments or another function are
refused."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from runtime.chat_tools import NamedFunction, NamedToolChoice, Tool, forced_call_grammar
from runtime.demo_model import demo_model_path
from runtime.tool_calls import make_tool_call_parser

TOOLS = [Tool.model_validate({"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"]}}}) for n in ("get_weather", "get_alerts")]
ARGS = '{"city": "Paris", "metric": true}'
CALLS = {
    "qwen25": lambda n, a: f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>',
    "llama3": lambda n, a: f'{{"name": "{n}", "parameters": {a}}}',
    "mistral": lambda n, a: f'[TOOL_CALLS] [{{"name": "{n}", "arguments": {a}}}]',
    "deepseekv3": lambda n, a: ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                                f"{n}\n```json\n{a}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "pythonic": lambda n, a: f"[{n}(" + ", ".join(
        f"{k}={v}" if isinstance(v, bool) else f"{k}={json.dumps(v)}" for k, v in json.loads(a).items()) + ")]",
}


@pytest.fixture(scope="module")
def compiler():
    import xgrammar as xgr

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_path("qwen3", "tiny")))
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=4096, stop_token_ids=[tokenizer.eos_token_id])
    return xgr.GrammarCompiler(info), tokenizer


def complete(compiler, ebnf: str, text: str) -> bool:
    import xgrammar as xgr

    grammar_compiler, tokenizer = compiler
    matcher = xgr.GrammarMatcher(grammar_compiler.compile_grammar(ebnf))
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return all(matcher.accept_token(t) for t in ids)


@pytest.mark.parametrize("parser", list(CALLS))
def test_forced_call_grammar_accepts_exactly_valid_calls(compiler, parser):
    write = CALLS[parser]
    required = forced_call_grammar(parser, TOOLS, "required")
    named = forced_call_grammar(parser, TOOLS, NamedToolChoice(function=NamedFunction(name="get_alerts")))
    for name in ("get_weather", "get_alerts"):
        assert complete(compiler, required, write(name, ARGS))
        parsed = make_tool_call_parser(parser, [t.model_dump() for t in TOOLS]).parse(write(name, ARGS))
        assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [(name, json.loads(ARGS))]
    assert complete(compiler, named, write("get_alerts", ARGS))
    assert not complete(compiler, named, write("get_weather", ARGS))
    assert not complete(compiler, required, write("get_weather", '{"city": 3, "metric": true}'))
