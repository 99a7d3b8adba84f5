"""OpenAI-compatible API: request conversion, responses, SSE streaming, routes.

Request models live in ``runtime/openai_protocol.py``. Everything here is a pure
function of (request, backend result dicts) except ``register_openai_routes``, which
wires them to a ``TokenizerManager``. Kept free of torch / layers / model_executor so
the HTTP process stays light.

Result dicts are the tokenizer manager's: ``{"index", "text" (cumulative),
"output_ids", "meta_info": {"id", "prompt_tokens", "completion_tokens",
"cached_tokens", "finish_reason", ...}}`` with ``index = prompt_index * n + sample``.

Finish reasons: ``stop`` and ``length`` pass through; an aborted request reports
``"abort"`` (as SGLang does; OpenAI has no equivalent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from managers.io_struct import GenerateReqInput
from managers.tokenizer_manager import ClientDisconnected, ServerDeadError, ServiceUnavailableError
from runtime.openai_protocol import (
    DEFAULT_MODEL_NAME,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from runtime.request_schema import add_request_schemas

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


# --------------------------------------------------------------------------- errors


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def openai_error_body(message: str, err_type: str = "invalid_request_error",
                      param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def openai_error_response(message: str, status: int = 400, err_type: str = "invalid_request_error",
                          param: str | None = None, code: str | int | None = None) -> OrjsonResponse:
    return OrjsonResponse(openai_error_body(message, err_type, param, code), status_code=status)


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
    messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
    try:
        text = tm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ValueError:
        raise
    except Exception as exc:  # jinja2 TemplateError (e.g. "roles must alternate"), raise_exception()
        raise ValueError(f"Chat template error: {exc}") from exc
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling_params(req, max_new)
    params.setdefault("max_new_tokens", None)  # unset: whatever room the context leaves
    return GenerateReqInput(
        text=text, sampling_params=params, stream=req.stream,
        return_logprob=req.logprobs, top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0)


# ------------------------------------------------------------------------ responses


def map_finish_reason(finish_reason: dict | None) -> str | None:
    if finish_reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(finish_reason.get("type"), "abort")


def _matched_stop(finish_reason: dict | None) -> int | str | None:
    return None if finish_reason is None else finish_reason.get("matched")


def _tok_text(entry: list | tuple) -> str:
    return entry[2] if len(entry) > 2 and entry[2] is not None else ""


def completion_logprobs(token_logprobs: list, top_logprobs: list | None, text_offset: int = 0) -> dict:
    """Legacy completions shape; ``text_offset`` is where the first token starts in the text."""
    offsets = []
    for entry in token_logprobs:
        offsets.append(text_offset)
        text_offset += len(_tok_text(entry))
    top = None
    if top_logprobs is not None:
        top = [None if alts is None else {_tok_text(a): a[0] for a in alts} for alts in top_logprobs]
    return {"tokens": [_tok_text(e) for e in token_logprobs],
            "token_logprobs": [e[0] for e in token_logprobs],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_logprobs: list, top_logprobs: list | None) -> dict:
    def item(entry: list | tuple) -> dict:
        text = _tok_text(entry)
        return {"token": text, "logprob": entry[0], "bytes": list(text.encode("utf-8"))}

    content = []
    for i, entry in enumerate(token_logprobs):
        alts = top_logprobs[i] if top_logprobs is not None and i < len(top_logprobs) else None
        content.append({**item(entry), "top_logprobs": [item(a) for a in alts or ()]})
    return {"content": content}


def _logprobs_for(meta: dict, chat: bool, start: int = 0, text_offset: int = 0) -> dict | None:
    """Logprobs of output tokens ``start:``, or None if the request did not ask for them."""
    if "output_token_logprobs" not in meta:
        return None
    tokens = meta["output_token_logprobs"][start:]
    top = meta.get("output_top_logprobs")
    top = top[start:] if top is not None else None
    return chat_logprobs(tokens, top) if chat else completion_logprobs(tokens, top, text_offset)


def usage_from_results(results: list[dict], n: int) -> dict:
    """Completion tokens summed over choices; prompt tokens once per prompt (not per sample)."""
    prompt_tokens = cached_tokens = completion_tokens = 0
    seen_prompts: set[int] = set()
    for res in results:
        meta = res["meta_info"]
        completion_tokens += meta.get("completion_tokens", 0)
        if res["index"] // n not in seen_prompts:
            seen_prompts.add(res["index"] // n)
            prompt_tokens += meta.get("prompt_tokens", 0)
            cached_tokens += meta.get("cached_tokens", 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _want_logprobs(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return req.logprobs is not None if isinstance(req, CompletionRequest) else req.logprobs


def _build_response(req: CompletionRequest | ChatCompletionRequest, results: list[dict],
                    model: str, created: int | None) -> dict:
    chat = isinstance(req, ChatCompletionRequest)
    results = sorted(results, key=lambda r: r["index"])
    choices = []
    for res in results:
        meta = res["meta_info"]
        choice: dict[str, Any] = {"index": res["index"]}
        if chat:
            choice["message"] = {"role": "assistant", "content": res["text"]}
        else:
            choice["text"] = res["text"]
        choice["logprobs"] = _logprobs_for(meta, chat) if _want_logprobs(req) else None
        choice["finish_reason"] = map_finish_reason(meta.get("finish_reason"))
        choice["matched_stop"] = _matched_stop(meta.get("finish_reason"))
        choices.append(choice)
    rid = results[0]["meta_info"]["id"] if results else ""
    return {"id": ("chatcmpl-" if chat else "cmpl-") + rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created if created is not None else int(time.time()),
            "model": model, "choices": choices, "usage": usage_from_results(results, req.n)}


def build_completion_response(req: CompletionRequest, results: list[dict], model: str,
                              created: int | None = None) -> dict:
    return _build_response(req, results, model, created)


def build_chat_response(req: ChatCompletionRequest, results: list[dict], model: str,
                        created: int | None = None) -> dict:
    return _build_response(req, results, model, created)


# ------------------------------------------------------------------------ streaming


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def openai_stream(req: CompletionRequest | ChatCompletionRequest, results: AsyncIterator[dict],
                        model: str, created: int | None = None) -> AsyncIterator[bytes]:
    """Cumulative backend updates → OpenAI SSE chunks carrying only each choice's new text.

    Chat choices open with a ``{"role": "assistant"}`` chunk. Text the backend takes back
    (shorter than what was already sent) cannot be unsent; it is dropped silently.
    Errors after the stream started are sent as an ``{"error": ...}`` event.
    """
    chat = isinstance(req, ChatCompletionRequest)
    want_logprobs = _want_logprobs(req)
    created = created if created is not None else int(time.time())
    header = {"id": "", "object": "chat.completion.chunk" if chat else "text_completion",
              "created": created, "model": model}
    sent_chars: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    token_chars: dict[int, int] = {}  # completions' text_offset, continued across chunks
    last: dict[int, dict] = {}
    try:
        async for res in results:
            index, meta, text = res["index"], res["meta_info"], res["text"]
            if not header["id"]:
                header["id"] = ("chatcmpl-" if chat else "cmpl-") + meta["id"]
            if chat and index not in sent_chars:
                role = {"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                yield sse({**header, "choices": [role]})
            done = sent_chars.get(index, 0)
            delta = text[done:]
            sent_chars[index] = max(done, len(text))
            last[index] = res
            logprobs = None
            if want_logprobs:
                start = sent_tokens.get(index, 0)
                logprobs = _logprobs_for(meta, chat, start, token_chars.get(index, 0))
                sent_tokens[index] = len(meta.get("output_token_logprobs", ()))
                if logprobs is not None and not chat:
                    token_chars[index] = token_chars.get(index, 0) + sum(map(len, logprobs["tokens"]))
                    if not logprobs["tokens"]:
                        logprobs = None
                elif logprobs is not None and not logprobs["content"]:
                    logprobs = None
            finish = meta.get("finish_reason")
            if not delta and finish is None and logprobs is None:
                continue
            choice: dict[str, Any] = {"index": index}
            if chat:
                choice["delta"] = {"content": delta} if delta else {}
            else:
                choice["text"] = delta
            choice["logprobs"] = logprobs
            choice["finish_reason"] = map_finish_reason(finish)
            if finish is not None:
                choice["matched_stop"] = _matched_stop(finish)
            yield sse({**header, "choices": [choice]})
        if req.include_usage:
            yield sse({**header, "choices": [], "usage": usage_from_results(list(last.values()), req.n)})
    except ClientDisconnected:
        return
    except ValueError as exc:
        yield sse(openai_error_body(str(exc)))
    except ServiceUnavailableError as exc:  # shutting down: expected, no traceback
        yield sse(openai_error_body(str(exc), "service_unavailable", code=503))
    except ServerDeadError as exc:
        yield sse(openai_error_body(str(exc), "server_error", code=500))
    except Exception as exc:
        logger.exception("stream %s failed", header["id"] or "(no id yet)")
        yield sse(openai_error_body(f"Internal server error: {exc}", "internal_server_error", code=500))
    yield SSE_DONE


async def _peek(results: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Pull the first item now (so a ValueError surfaces before the stream starts); replay it."""
    iterator = aiter(results)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return _replay([], iterator)
    return _replay([first], iterator)


async def _replay(head: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for item in head:
        yield item
    async for item in rest:
        yield item


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
        if req.stream:
            stream = openai_stream(req, await _peek(results), tm.served_model_name, created)
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
    return OrjsonResponse(_build_response(req, collected, tm.served_model_name, created))


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
