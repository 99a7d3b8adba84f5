"""OpenAI-compatible API: request parsing and conversion, and the routes.

Request models live in ``runtime/openai_protocol.py`` (tools in
``runtime/chat_tools.py``), responses and streaming in
``runtime/openai_responses.py``. Everything here is a pure function of the
request except ``register_openai_routes``, which wires them to a
``TokenizerManager``. Kept free of torch / layers / model_executor so the
HTTP process stays light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from managers.io_struct import GenerateReqInput
from managers.request_state import ClientDisconnected, ServerDeadError, ServiceUnavailableError
from runtime.openai_protocol import (
    DEFAULT_MODEL_NAME,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from runtime.chat_output import ChatOutputRules
from runtime.chat_tools import NamedToolChoice, check_tools, forced_call_grammar, template_messages
from runtime.openai_responses import OrjsonResponse, _build_response, _peek, openai_error_response, openai_stream
from runtime.request_schema import add_request_schemas
from sampling.grammar import GRAMMAR_FIELDS, GrammarSpec, after_reasoning

if TYPE_CHECKING:
    from managers.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=BaseModel)

# Copied from the request into sampling_params under the same name when not None.
_PASSTHROUGH_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "seed", "stop_token_ids", "ignore_eos", "skip_special_tokens", "logit_bias",
    "no_repeat_ngram_size", "regex", "ebnf",
)


def _format_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors(include_url=False)
    parts: list[str] = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    if len(errors) > 5:
        parts.append(f"... ({len(errors) - 5} more)")
    param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
    return "; ".join(parts), param


def parse_request(model_cls: type[ModelT], body: bytes) -> ModelT | OrjsonResponse:
    """Parse a JSON body into ``model_cls``; malformed JSON or wrong types give an OpenAI 400."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return openai_error_response(f"Invalid JSON body: {exc}")
    if not isinstance(obj, dict):
        return openai_error_response("Request body must be a JSON object")
    try:
        return model_cls.model_validate(obj, strict=True)
    except ValidationError as exc:
        message, param = _format_validation_error(exc)
        return openai_error_response(message, param=param)


def check_model(req: SamplingFields, tm: TokenizerManager) -> OrjsonResponse | None:
    """None if ``req.model`` names the served model (or is "default"), else a 400."""
    if req.model in (tm.served_model_name, DEFAULT_MODEL_NAME):
        return None
    return openai_error_response(
        f"The model `{req.model}` does not exist. This server serves `{tm.served_model_name}`.",
        param="model", code="model_not_found")


# ----------------------------------------------------------------------- conversion


def _sampling_params(req: SamplingFields, max_new_tokens: int | None) -> dict:
    params: dict[str, Any] = {"n": req.n}
    for name in _PASSTHROUGH_SAMPLING:
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    if req.min_tokens is not None:
        params["min_new_tokens"] = req.min_tokens
    if req.stop is not None:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.response_format is not None and (schema := req.response_format.grammar()) is not None:
        params["json_schema"] = schema
    return params


def completion_to_generate(req: CompletionRequest, tm: TokenizerManager) -> GenerateReqInput:
    """Raises ValueError (a 400) for what the protocol allows but we do not serve."""
    if req.echo:
        raise ValueError("echo is not supported")
    prompt = req.prompt
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError("prompt must not be empty")
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one is a single prompt
    out = GenerateReqInput(sampling_params=_sampling_params(req, req.max_tokens), stream=req.stream)
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], str)):
        out.text = prompt
    else:
        out.input_ids = prompt
    if req.logprobs is not None:
        out.return_logprob = True
        out.top_logprobs_num = req.logprobs
    return out


def chat_to_generate(req: ChatCompletionRequest, tm: TokenizerManager) -> GenerateReqInput:
    """Renders the chat template; raises ValueError (a 400) if the template rejects the messages."""
    if tm.tokenizer is None:  # a 400, not an AttributeError's 500
        raise ValueError(
            "chat completions need a tokenizer to apply the chat template, and this server was "
            "started with --skip-tokenizer-init: send token ids to /v1/completions or /generate")
    messages = template_messages([{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages])
    tools = req.tools or []
    check_tools(tools, req.tool_choice)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if tools and req.tool_choice != "none":
        template_kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    try:
        text = tm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                **template_kwargs)
    except ValueError:
        raise
    except Exception as exc:  # jinja2 TemplateError (e.g. "roles must alternate"), raise_exception()
        raise ValueError(f"Chat template error: {exc}") from exc
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling_params(req, max_new)
    params.setdefault("max_new_tokens", None)  # unset: whatever room the context leaves
    if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
        # A valid call is guaranteed by decoding under a grammar of the calls.
        if tm.tool_call_parser is None:
            raise ValueError("tool_choice required or naming a function needs the server started with "
                             "--tool-call-parser")
        if any(k in params for k in ("json_schema", "regex", "ebnf")):
            raise ValueError("tool_choice required or naming a function cannot be combined with response_format, "
                             "regex or ebnf")
        params["ebnf"] = forced_call_grammar(tm.tool_call_parser, tools, req.tool_choice)
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking") is not False
    if tm.reasoning_parser is not None and req.separate_reasoning and thinking:
        # The model reasons freely; only its answer must follow the grammar.
        given = [k for k in GRAMMAR_FIELDS if params.get(k) is not None]
        if given:
            spec = after_reasoning(GrammarSpec(given[0], params.pop(given[0])), tm.reasoning_parser)
            params[spec.kind] = spec.text
    return GenerateReqInput(
        text=text, sampling_params=params, stream=req.stream,
        return_logprob=req.logprobs, top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0)


# ------------------------------------------------------------------------ responses


def chat_rules(req: ChatCompletionRequest, tm: TokenizerManager) -> ChatOutputRules:
    """What the server's parsers split off this request's choices."""
    with_tools = bool(req.tools) and req.tool_choice != "none"
    return ChatOutputRules(
        tool_parser=tm.tool_call_parser if with_tools else None,
        tools=[t.model_dump() for t in req.tools] if with_tools else None,
        reasoning_parser=tm.reasoning_parser if req.separate_reasoning else None,
        max_calls=None if req.parallel_tool_calls else 1,
    )
# --------------------------------------------------------------------------- routes


async def _serve(raw: Request, tm: TokenizerManager,
                 model_cls: type[CompletionRequest] | type[ChatCompletionRequest]) -> Response:
    req = parse_request(model_cls, await raw.body())
    if isinstance(req, Response):
        return req
    if (error := check_model(req, tm)) is not None:
        return error
    created = int(time.time())
    try:
        if isinstance(req, CompletionRequest):
            obj = completion_to_generate(req, tm)
        else:
            obj = await tm.run_blocking(chat_to_generate, req, tm)  # templates can be slow
        results = tm.generate_request(obj, raw)
        rules = chat_rules(req, tm) if isinstance(req, ChatCompletionRequest) else None
        if req.stream:
            stream = openai_stream(req, await _peek(results), tm.served_model_name, created, rules)
            return StreamingResponse(stream, media_type="text/event-stream")
        collected = [res async for res in results]
    except ValueError as exc:
        return openai_error_response(str(exc))
    except (ServiceUnavailableError, ServerDeadError):
        raise  # the app's handlers answer 503 / 500
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        logger.exception("%s failed", raw.url.path)
        return openai_error_response(f"Internal server error: {exc}", 500, "internal_server_error")
    return OrjsonResponse(_build_response(req, collected, tm.served_model_name, created, rules))


def models_response(tm: TokenizerManager) -> dict:
    return {"object": "list", "data": [{
        "id": tm.served_model_name, "object": "model", "created": int(time.time()),
        "owned_by": "radixserve", "max_model_len": tm.context_len}]}


def register_openai_routes(app: FastAPI, get_tm: Callable[[], TokenizerManager]) -> None:
    """``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``."""

    @app.get("/v1/models")
    async def list_models() -> Response:
        return OrjsonResponse(models_response(get_tm()))

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await _serve(raw, get_tm(), CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await _serve(raw, get_tm(), ChatCompletionRequest)

    # Parsed by hand (parse_request) for OpenAI's error shape; described for /openapi.json here.
    add_request_schemas(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest})
