"""Request-body schemas for /openapi.json.

The routes read their JSON bodies by hand, and keep doing so: their error
messages and shapes (OpenAI's on /v1, field-naming 400s on /generate) are
part of the contract and tested, and FastAPI's own validation would answer
422 with different text. So FastAPI cannot see what the bodies hold; the
models here describe them, and ``add_request_schemas`` puts them into the
generated document. They are documentation, not validators: the checks live
in managers/request_checks.py, managers/sampling_params.py,
runtime/sglang_fields.py and (for /v1) runtime/openai_protocol.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, create_model

from managers.request_checks import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from runtime.sglang_fields import ADVISORY_FIELDS, UNSUPPORTED_DEFAULTS


class SamplingParamsBody(BaseModel):
    """``sampling_params`` of /generate (managers/sampling_params.py). Unknown keys are a 400."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(128, ge=0, description="null: as many as the context has room for")
    min_new_tokens: int = Field(0, ge=0, description="EOS and stop strings are ignored until this many")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1 or 0: disabled")
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description=f"at most {MAX_STOP_STRINGS} strings")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1, description="samples per prompt")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]; -100 bans it")
    no_repeat_ngram_size: int = Field(0, ge=0, description="ban tokens that would repeat an n-gram of this size")
    json_schema: str | None = Field(None, description="constrain the output to this JSON schema (a JSON string)")
    regex: str | None = Field(None, description="constrain the output to this regular expression")
    ebnf: str | None = Field(None, description="constrain the output to this EBNF grammar (xgrammar's dialect)")
    structural_tag: str | None = Field(None, description="xgrammar structural tag (a JSON string)")


class _GenerateBase(BaseModel):
    # Top-level fields nobody defines are ignored (and logged once), not refused.
    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = Field(None, description="A prompt or a batch; exactly one of text / input_ids")
    input_ids: list[int] | list[list[int]] | None = Field(None, description="Token ids of a prompt or a batch")
    sampling_params: SamplingParamsBody | list[SamplingParamsBody] | None = Field(
        None, description="One object for every prompt, or one per prompt")
    rid: str | list[str] | None = Field(None, description="Request id(s), for /abort_request")
    stream: bool | None = Field(False, description="Server-sent events with the cumulative text")
    return_logprob: bool | None = Field(False, description="Logprobs of the output tokens in meta_info")
    top_logprobs_num: int | None = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per output token")


def _compat_field(name: str) -> tuple[Any, Any]:
    defaults = UNSUPPORTED_DEFAULTS[name]
    return (Any, Field(defaults[0], description=(
        "SGLang field this server does not implement: accepted only as "
        f"{' / '.join('null' if d is None else repr(d) for d in defaults)} (400 otherwise)")))


# SGLang's GenerateReqInput as accepted here: ours, plus its other fields at their defaults.
GenerateRequest = create_model(
    "GenerateRequest",
    __base__=_GenerateBase,
    **{name: _compat_field(name) for name in UNSUPPORTED_DEFAULTS},
    **{name: (Any, Field(None, description="Accepted and ignored")) for name in sorted(ADVISORY_FIELDS)},
)


class AbortRequestBody(BaseModel):
    rid: str = Field(description="The id a /generate request was sent with")


def add_request_schemas(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Describe the JSON body of each ``POST path`` in ``bodies`` in /openapi.json.

    Wraps ``app.openapi``; may be called more than once on an app (each call
    adds its routes). Editing the cached document again is harmless: it only
    sets the same entries."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        doc = build()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            operation = doc.get("paths", {}).get(path, {}).get("post")
            if operation is None:
                continue
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            name = schema.get("title", model.__name__)
            components[name] = schema
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
            }
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
