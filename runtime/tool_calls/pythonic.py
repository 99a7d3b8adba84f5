"""Pythonic calls (Llama-3.2 / Llama-4 style): a Python list ``[f(a=1, b="x"), g()]``.

The list may be the whole output or follow some text. Any ``[`` could open one, so a
``[`` is held back only while the text after it can still read ``[name(``; prose such
as ``[1]`` or ``[link](url)`` is released at once. The list is parsed with ``ast``
(never evaluated) and only JSON-like literals are accepted as argument values.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from runtime.tool_calls.base import CallBuilder, Scanner, Segment, ToolCall, ToolCallParser, bracket_span_end

_HEAD = re.compile(r"\[\s*[^\W\d]\w*\s*\(")  # "[name(": a call list starts here
_PARTIAL_HEAD = re.compile(r"\[\s*(?:[^\W\d]\w*\s*)?")  # what may still grow into _HEAD


class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    """The value of a JSON-like literal node; anything else raises _NotLiteral."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _NotLiteral
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**x}
                raise _NotLiteral
            key_value = _literal(key)
            if not isinstance(key_value, str):  # JSON object keys are strings
                raise _NotLiteral
            result[key_value] = _literal(value)
        return result
    raise _NotLiteral


class _PythonicScanner(Scanner):
    def __init__(self, builder: CallBuilder) -> None:
        self._builder = builder

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        pos = 0
        while True:
            start = buf.find("[", pos)
            if start < 0:
                out.append(buf[pos:])
                return out, len(buf)
            out.append(buf[pos:start])
            end: int | None = None
            if _HEAD.match(buf, start):
                end = bracket_span_end(buf, start, quotes="'\"")
            elif not _PARTIAL_HEAD.fullmatch(buf, start):
                out.append("[")  # not a call list: an ordinary bracket
                pos = start + 1
                continue
            if end is None:  # may still become a call list
                if final:
                    out.append(buf[start:])
                    return out, len(buf)
                return out, start
            calls = self._calls(buf[start:end])
            if calls is None:
                out.append(buf[start:end])
            else:
                out.extend(calls)
            pos = end

    def _calls(self, text: str) -> list[ToolCall] | None:
        """All calls of the list, or None if anything in it is not a plain call."""
        try:
            tree = ast.parse(text, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            arguments = {}
            for keyword in node.keywords:
                if keyword.arg is None or keyword.arg in arguments:  # **kwargs, repeats
                    return None
                try:
                    arguments[keyword.arg] = _literal(keyword.value)
                except (_NotLiteral, RecursionError):
                    return None
            call = self._builder.build(node.func.id, arguments)
            if call is None:
                return None
            calls.append(call)
        return calls


class PythonicToolCallParser(ToolCallParser):
    def _new_scanner(self) -> Scanner:
        return _PythonicScanner(self._builder)
