"""Tool calls in model output: split generated text into content and OpenAI tool calls.

One parser per model family (``registry.TOOL_CALL_PARSERS``, SGLang's
``--tool-call-parser`` names). ``parser.parse(text)`` handles a finished output;
``parser.stream()`` gives a per-output object fed with text deltas whose events
concatenate to exactly what ``parse`` returns. Malformed calls never raise: they come
back as content.
"""

from __future__ import annotations

from runtime.tool_calls.base import (
    ParsedOutput,
    StreamEvent,
    ToolCall,
    ToolCallParser,
    ToolCallStream,
    collect_events,
)
from runtime.tool_calls.registry import TOOL_CALL_PARSERS, make_tool_call_parser

__all__ = [
    "TOOL_CALL_PARSERS",
    "ParsedOutput",
    "StreamEvent",
    "ToolCall",
    "ToolCallParser",
    "ToolCallStream",
    "collect_events",
    "make_tool_call_parser",
]
