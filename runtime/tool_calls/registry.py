"""Tool-call parsers by SGLang's ``--tool-call-parser`` names."""

from __future__ import annotations

from runtime.tool_calls.base import ToolCallParser
from runtime.tool_calls.deepseekv3 import DeepSeekV3ToolCallParser
from runtime.tool_calls.llama3 import Llama3ToolCallParser
from runtime.tool_calls.mistral import MistralToolCallParser
from runtime.tool_calls.pythonic import PythonicToolCallParser
from runtime.tool_calls.qwen25 import Qwen25ToolCallParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen25": Qwen25ToolCallParser,
    "llama3": Llama3ToolCallParser,
    "mistral": MistralToolCallParser,
    "pythonic": PythonicToolCallParser,
    "deepseekv3": DeepSeekV3ToolCallParser,
}


def make_tool_call_parser(name: str, tools: list[dict] | None = None) -> ToolCallParser:
    """The parser for ``name``; with ``tools``, calls to undeclared functions stay content."""
    try:
        parser_class = TOOL_CALL_PARSERS[name]
    except KeyError:
        choices = ", ".join(TOOL_CALL_PARSERS)
        raise ValueError(f"unknown tool-call parser {name!r}; valid choices: {choices}") from None
    return parser_class(tools)
