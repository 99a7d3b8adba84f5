"""OpenAI-compatible responses: whole (`build_*_response`) and as SSE
streams (`openai_stream`), from the tokenizer manager's result dicts
(``{"index", "text" (cumulative), "output_ids", "meta_info": {...}}`` with
``index = prompt_index * n + sample``); chat choices go through the
server's tool-call and reasoning parsers (runtime/chat_output.py). Also the
error shape every route answers with.

Finish reasons: ``stop`` and ``length`` pass through, ``tool_calls`` when a
chat choice's calls were parsed, and an aborted request reports ``"abort"``
(as SGLang does; OpenAI has no equivalent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi.responses import JSONResponse

from managers.request_state import ClientDisconnected, ServerDeadError, ServiceUnavailableError
from runtime.chat_output import ChatChoiceStream, ChatOutputRules, chat_message
from runtime.openai_protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


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
                    model: str, created: int | None, rules: ChatOutputRules | None = None) -> dict:
    chat = isinstance(req, ChatCompletionRequest)
    rules = rules or ChatOutputRules()
    results = sorted(results, key=lambda r: r["index"])
    choices = []
    for res in results:
        meta = res["meta_info"]
        choice: dict[str, Any] = {"index": res["index"]}
        finish = map_finish_reason(meta.get("finish_reason"))
        if chat:
            choice["message"] = chat_message(rules, res["text"])
            if choice["message"].get("tool_calls") and finish == "stop":
                finish = "tool_calls"
        else:
            choice["text"] = res["text"]
        choice["logprobs"] = _logprobs_for(meta, chat) if _want_logprobs(req) else None
        choice["finish_reason"] = finish
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
                        created: int | None = None, rules: ChatOutputRules | None = None) -> dict:
    return _build_response(req, results, model, created, rules)


# ------------------------------------------------------------------------ streaming


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def openai_stream(req: CompletionRequest | ChatCompletionRequest, results: AsyncIterator[dict],
                        model: str, created: int | None = None,
                        rules: ChatOutputRules | None = None) -> AsyncIterator[bytes]:
    """Cumulative backend updates → OpenAI SSE chunks carrying only each choice's new text.

    Chat choices open with a ``{"role": "assistant"}`` chunk. Text the backend takes back
    (shorter than what was already sent) cannot be unsent; it is dropped silently.
    Errors after the stream started are sent as an ``{"error": ...}`` event.
    """
    chat = isinstance(req, ChatCompletionRequest)
    rules = rules or ChatOutputRules()
    splitters: dict[int, ChatChoiceStream] = {}  # per choice, when the parsers split its text
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
            if chat and not rules.plain:
                splitter = splitters.setdefault(index, ChatChoiceStream(rules))
                deltas = splitter.feed(delta) + (splitter.finish() if finish is not None else [])
                # All but the last delta go out on their own; the last carries logprobs and the finish.
                for extra in deltas[:-1]:
                    yield sse({**header, "choices": [{"index": index, "delta": extra, "logprobs": None,
                                                       "finish_reason": None}]})
                last_delta = deltas[-1] if deltas else {}
            else:
                last_delta = {"content": delta} if delta else {}
            if not last_delta and finish is None and logprobs is None:
                continue
            choice: dict[str, Any] = {"index": index}
            if chat:
                choice["delta"] = last_delta
            else:
                choice["text"] = delta
            choice["logprobs"] = logprobs
            choice["finish_reason"] = map_finish_reason(finish)
            if chat and choice["finish_reason"] == "stop" and index in splitters and splitters[index].made_calls:
                choice["finish_reason"] = "tool_calls"
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
