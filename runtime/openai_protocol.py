"""Request models of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``).

Only types and cheap structural limits are checked here (pydantic, strict mode, so
``"temperature": "0.7"`` is a 400 like on OpenAI). Value ranges of the sampling
parameters are checked once, downstream, by the tokenizer manager. Unknown fields are
ignored: OpenAI clients send many we do not use (``user``, ``tools``...).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.chat_tools import Tool, ToolChoice

# Accepted as a model name besides the served one (SGLang's and many clients' default).
DEFAULT_MODEL_NAME = "default"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self

    def grammar(self) -> str | None:
        """The JSON schema (as text) the output must match, if any."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema":
            return json.dumps(self.json_schema.schema_)
        return None


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. ``None`` means "backend default"."""

    model_config = ConfigDict(extra="ignore")

    model: str = DEFAULT_MODEL_NAME
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    user: str | None = None
    # Extra sampling fields SGLang accepts.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    # {token id: bias in [-100, 100]}; -100 bans the token.
    logit_bias: dict[str, float] | None = None
    no_repeat_ngram_size: int | None = None
    # Constrained decoding: OpenAI's response_format, or SGLang's extra fields.
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    # OpenAI caps this at 5; SGLang allows more. 0 returns only the sampled tokens' logprobs.
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None is legal for assistant turns that only carried tool calls.
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # assistant turns: the calls it made
    tool_call_id: str | None = None  # tool turns: which call this answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    # OpenAI's newer name; wins over max_tokens when both are given.
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    # SGLang's: reasoning split off into reasoning_content (with --reasoning-parser).
    separate_reasoning: bool = True
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": false}

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("logprobs must be true when top_logprobs is set")
        return self
