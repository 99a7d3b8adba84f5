"""Tools on /v1/chat/completions, request side: which tools are declared,
what `tool_choice` asks for, the messages as the chat template wants them,
and, for `required` or a named function, a grammar that makes the model
write a valid call in the server's `--tool-call-parser` format."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sampling.grammar import GrammarSpec, check_grammar


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: ToolFunction


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[Tool], choice: ToolChoice | None) -> None:
    """ValueError (a 400) for a parameter schema that is not JSON Schema, or a
    named choice that is not among the tools."""
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            try:
                check_grammar(GrammarSpec("json_schema", json.dumps(tool.function.parameters)))
            except ValueError as err:
                raise ValueError(f"tools[{i}].function.parameters ({tool.function.name}) is not a usable "
                                 f"JSON schema: {err}") from None
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")
    if choice is not None and choice != "none" and not tools:
        raise ValueError("tool_choice needs tools")


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls with their arguments as objects (templates render
    them with `tojson`; a JSON string would come out quoted twice)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _with_object_arguments(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # the template gets it as written
    return {**call, "function": function}


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # an EBNF string literal: same escapes as JSON


def _call_object(name: str, parameters: dict | None, arguments_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters or {"type": "object"}},
            "required": ["name", arguments_key], "additionalProperties": False}


def _pythonic_call(name: str, params: dict | None, text, schema) -> Any:
    """`[name(key=value, ...)]` with the required parameters in declared order.
    Values are JSON, which Python reads alike, except booleans and null at the
    top level (True / False / None); nested ones stay JSON's, which the
    pythonic parser refuses, so schemas with nested booleans are not forced."""
    import xgrammar as xgr

    properties = (params or {}).get("properties", {})
    required = [k for k in properties if k in set((params or {}).get("required", ()))]
    parts = [text(f"[{name}(")]
    for i, key in enumerate(required):
        parts.append(text(f"{', ' if i else ''}{key}="))
        prop = properties[key]
        if prop.get("type") == "boolean":
            parts.append(xgr.Grammar.from_ebnf('root ::= "True" | "False"'))
        elif prop.get("type") == "null":
            parts.append(text("None"))
        else:
            parts.append(schema(prop))
    parts.append(text(")]"))
    return xgr.Grammar.concat(*parts)


def forced_call_grammar(parser: str, tools: list[Tool], choice: ToolChoice) -> str:
    """EBNF of exactly one call, in `parser`'s format, to the named function
    or (for `required`) any of `tools`, its arguments valid for its schema
    (for `pythonic`: its required arguments, see `_pythonic_call`)."""
    import xgrammar as xgr

    chosen = [t for t in tools if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]

    def schema(obj: dict) -> Any:
        return xgr.Grammar.from_json_schema(json.dumps(obj), any_whitespace=False)

    def text(s: str) -> Any:
        return xgr.Grammar.from_ebnf(f"root ::= {_literal(s)}")

    calls = []
    for tool in chosen:
        name, params = tool.function.name, tool.function.parameters
        if parser == "qwen25":
            calls.append(xgr.Grammar.concat(text("<tool_call>\n"), schema(_call_object(name, params, "arguments")),
                                            text("\n</tool_call>")))
        elif parser == "llama3":
            calls.append(schema(_call_object(name, params, "parameters")))
        elif parser == "mistral":
            calls.append(xgr.Grammar.concat(text("[TOOL_CALLS] ["), schema(_call_object(name, params, "arguments")),
                                            text("]")))
        elif parser == "deepseekv3":
            calls.append(xgr.Grammar.concat(
                text(f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n"),
                schema(params or {"type": "object"}), text("\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")))
        elif parser == "pythonic":
            calls.append(_pythonic_call(name, params, text, schema))
        else:
            raise ValueError(f"no forced-call grammar for tool-call parser {parser!r}")
    grammar = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    return str(grammar)
