"""OpenAI protocol layer without a model: parsing, conversion, responses, SSE streaming.

End-to-end tests against a running server live with the HTTP server's tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from runtime.demo_model import demo_model_path
from runtime.openai_api import chat_to_generate, check_model, completion_to_generate, parse_request, register_openai_routes
from runtime.openai_responses import (
    SSE_DONE,
    OrjsonResponse,
    _peek,
    build_chat_response,
    build_completion_response,
    chat_logprobs,
    completion_logprobs,
    map_finish_reason,
    openai_error_response,
    openai_stream,
    usage_from_results,
)
from runtime.openai_protocol import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def tm() -> SimpleNamespace:
    tok = AutoTokenizer.from_pretrained(demo_model_path("qwen3", "tiny"))
    return SimpleNamespace(tokenizer=tok, served_model_name="m", context_len=2048, tool_call_parser=None,
                           reasoning_parser=None)


def body(obj) -> bytes:
    return orjson.dumps(obj)


def completion(**fields) -> CompletionRequest:
    req = parse_request(CompletionRequest, body({"model": "m", "prompt": "hi", **fields}))
    assert isinstance(req, CompletionRequest), req.body if isinstance(req, OrjsonResponse) else req
    return req


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    req = parse_request(ChatCompletionRequest, body({"model": "m", **fields}))
    assert isinstance(req, ChatCompletionRequest), req.body if isinstance(req, OrjsonResponse) else req
    return req


def error_of(resp) -> dict:
    assert isinstance(resp, OrjsonResponse), resp
    assert resp.status_code == 400
    err = orjson.loads(resp.body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def result(index: int, text: str, *, rid: str = "r0", prompt_tokens: int = 5, completion_tokens: int = 3,
           finish: dict | None = None, cached: int = 0, logprobs: list | None = None,
           top: list | None = None) -> dict:
    meta = {"id": rid, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "cached_tokens": cached, "finish_reason": finish, "e2e_latency": 0.1}
    if logprobs is not None:
        meta["output_token_logprobs"] = logprobs
        meta["output_top_logprobs"] = top
    return {"index": index, "text": text, "output_ids": list(range(completion_tokens)), "meta_info": meta}


async def aiter_list(items: list[dict], raise_after: Exception | None = None) -> AsyncIterator[dict]:
    for item in items:
        yield item
    if raise_after is not None:
        raise raise_after


def run_stream(req, items, raise_after=None) -> list:
    async def collect() -> list[bytes]:
        return [c async for c in openai_stream(req, aiter_list(items, raise_after), "m", created=1)]

    raw = asyncio.run(collect())
    assert raw[-1] == SSE_DONE
    events = []
    for chunk in raw[:-1]:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        events.append(orjson.loads(chunk[len(b"data: "):]))
    return events


# ----------------------------------------------------------------------- parsing


def test_parse_valid_requests_and_ignore_unknown_fields():
    req = completion(max_tokens=4, stream=True, stream_options={"include_usage": True},
                     logit_bias={"1": 2}, some_new_openai_field=[1])
    assert req.max_tokens == 4 and req.stream and req.include_usage
    assert completion().max_tokens == 16 and completion().n == 1
    assert completion(temperature=0).temperature == 0.0  # ints are fine for floats
    c = chat(messages=[{"role": "system", "content": "s"},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert c.messages[1].text() == "a\nb"
    assert chat().max_tokens is None


def test_parse_malformed_json_and_non_object():
    assert "Invalid JSON" in error_of(parse_request(CompletionRequest, b'{"model": '))["message"]
    assert "JSON object" in error_of(parse_request(CompletionRequest, b"[1, 2]"))["message"]


@pytest.mark.parametrize("fields, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),  # strict: no string → number coercion
    ({"n": 1.5}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 3}, "stop"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"stream_options": {"include_usage": "x"}}, "stream_options"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
])
def test_completion_wrong_types_are_400(fields, param):
    err = error_of(parse_request(CompletionRequest, body({"model": "m", "prompt": "hi", **fields})))
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"]


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": -2}, "max_completion_tokens"),
    ({"logprobs": 3}, "logprobs"),
])
def test_chat_wrong_types_are_400(fields, param):
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    err = error_of(parse_request(ChatCompletionRequest, body({"model": "m", **fields})))
    assert err["param"] == param


def test_top_logprobs_requires_logprobs():
    err = error_of(parse_request(ChatCompletionRequest, body(
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})))
    assert "logprobs must be true" in err["message"]


def test_error_response_shape():
    resp = openai_error_response("nope", 404, "not_found_error", param="x", code="c")
    assert resp.status_code == 404
    assert orjson.loads(resp.body) == {"error": {"message": "nope", "type": "not_found_error",
                                                 "param": "x", "code": "c"}}


def test_check_model(tm):
    assert check_model(completion(), tm) is None
    assert check_model(completion(model="default"), tm) is None
    assert check_model(chat(model="default"), tm) is None
    err = error_of(check_model(completion(model="gpt-4"), tm))
    assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]


# -------------------------------------------------------------------- conversion


def test_completion_prompt_kinds(tm):
    assert completion_to_generate(completion(prompt="abc"), tm).text == "abc"
    assert completion_to_generate(completion(prompt=["abc"]), tm).text == "abc"
    assert completion_to_generate(completion(prompt=["a", "b"]), tm).text == ["a", "b"]
    one = completion_to_generate(completion(prompt=[1, 2, 3]), tm)
    assert one.input_ids == [1, 2, 3] and one.text is None
    assert completion_to_generate(completion(prompt=[[1, 2]]), tm).input_ids == [1, 2]
    assert completion_to_generate(completion(prompt=[[1], [2, 3]]), tm).input_ids == [[1], [2, 3]]
    with pytest.raises(ValueError, match="empty"):
        completion_to_generate(completion(prompt=[]), tm)
    with pytest.raises(ValueError, match="echo is not supported"):
        completion_to_generate(completion(echo=True), tm)


def test_completion_sampling_params(tm):
    obj = completion_to_generate(completion(
        max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop="\n", seed=3, frequency_penalty=0.1,
        presence_penalty=0.2, top_k=5, min_p=0.05, repetition_penalty=1.1, min_tokens=2, ignore_eos=True,
        skip_special_tokens=False, stop_token_ids=[4], stream=True), tm)
    assert obj.sampling_params == {
        "max_new_tokens": 7, "min_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": ["\n"],
        "seed": 3, "frequency_penalty": 0.1, "presence_penalty": 0.2, "top_k": 5, "min_p": 0.05,
        "repetition_penalty": 1.1, "ignore_eos": True, "skip_special_tokens": False, "stop_token_ids": [4]}
    assert obj.stream and not obj.return_logprob
    defaults = completion_to_generate(completion(stop=["a", "b"], temperature=None), tm).sampling_params
    assert defaults == {"max_new_tokens": 16, "top_p": 1.0, "n": 1, "frequency_penalty": 0.0,
                        "presence_penalty": 0.0, "stop": ["a", "b"]}
    lp = completion_to_generate(completion(logprobs=3), tm)
    assert lp.return_logprob and lp.top_logprobs_num == 3
    lp0 = completion_to_generate(completion(logprobs=0), tm)
    assert lp0.return_logprob and lp0.top_logprobs_num == 0


def test_chat_conversion_uses_template(tm):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "three"}]
    obj = chat_to_generate(chat(messages=messages, max_tokens=9, stop="x"), tm)
    expected = tm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"},
         {"role": "assistant", "content": ""}, {"role": "user", "content": "three"}],
        tokenize=False, add_generation_prompt=True)
    assert obj.text == expected and obj.text.endswith("<|im_start|>assistant\n")
    assert obj.input_ids is None
    assert obj.sampling_params["max_new_tokens"] == 9 and obj.sampling_params["stop"] == ["x"]
    assert not obj.return_logprob and obj.top_logprobs_num == 0


def test_chat_max_tokens_and_logprobs(tm):
    params = chat_to_generate(chat(max_tokens=9, max_completion_tokens=4), tm).sampling_params
    assert params["max_new_tokens"] == 4
    # Unset: None, which the tokenizer manager turns into the room left in the context.
    assert chat_to_generate(chat(), tm).sampling_params["max_new_tokens"] is None
    obj = chat_to_generate(chat(logprobs=True, top_logprobs=4), tm)
    assert obj.return_logprob and obj.top_logprobs_num == 4
    obj = chat_to_generate(chat(logprobs=True), tm)
    assert obj.return_logprob and obj.top_logprobs_num == 0


def test_chat_template_errors_become_value_errors(tm):
    tok = AutoTokenizer.from_pretrained(demo_model_path("qwen3", "tiny"))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    strict_tm = SimpleNamespace(tokenizer=tok, served_model_name="m", context_len=2048, tool_call_parser=None,
                           reasoning_parser=None)
    with pytest.raises(ValueError, match="roles must alternate"):
        chat_to_generate(chat(), strict_tm)


def test_chat_without_a_tokenizer_says_why(tm):
    no_tokenizer = SimpleNamespace(tokenizer=None, served_model_name="m", context_len=2048)
    with pytest.raises(ValueError, match="need a tokenizer to apply the chat template.*--skip-tokenizer-init"):
        chat_to_generate(chat(), no_tokenizer)


# --------------------------------------------------------------------- responses


@pytest.mark.parametrize("finish, expected", [
    (None, None), ({"type": "stop", "matched": 3}, "stop"), ({"type": "stop", "matched": "\n"}, "stop"),
    ({"type": "length"}, "length"), ({"type": "abort", "message": "x"}, "abort"),
])
def test_map_finish_reason(finish, expected):
    assert map_finish_reason(finish) == expected


def test_completion_response_batch_with_n():
    stop, length = {"type": "stop", "matched": 7}, {"type": "length"}
    # 2 prompts x n=2, arriving out of order; prompt tokens count once per prompt.
    results = [result(3, "d", prompt_tokens=4, completion_tokens=1, finish=length, rid="b"),
               result(0, "a", prompt_tokens=6, completion_tokens=2, finish=stop, rid="a", cached=2),
               result(2, "c", prompt_tokens=4, completion_tokens=3, finish=stop, rid="b"),
               result(1, "b", prompt_tokens=6, completion_tokens=5, finish=length, rid="a", cached=2)]
    resp = build_completion_response(completion(n=2, prompt=["x", "y"]), results, "m", created=11)
    assert resp["id"] == "cmpl-a" and resp["object"] == "text_completion"
    assert resp["created"] == 11 and resp["model"] == "m"
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in resp["choices"]] == ["a", "b", "c", "d"]
    assert [c["finish_reason"] for c in resp["choices"]] == ["stop", "length", "stop", "length"]
    assert resp["choices"][0]["matched_stop"] == 7 and resp["choices"][0]["logprobs"] is None
    assert resp["usage"] == {"prompt_tokens": 10, "completion_tokens": 11, "total_tokens": 21,
                             "prompt_tokens_details": {"cached_tokens": 2}}


def test_chat_response():
    results = [result(1, "B", completion_tokens=2, finish={"type": "length"}),
               result(0, "A", completion_tokens=4, finish={"type": "stop"})]
    resp = build_chat_response(chat(n=2), results, "m", created=1)
    assert resp["id"] == "chatcmpl-r0" and resp["object"] == "chat.completion"
    assert resp["choices"][0]["message"] == {"role": "assistant", "content": "A"}
    assert resp["choices"][1]["finish_reason"] == "length"
    assert resp["usage"]["prompt_tokens"] == 5 and resp["usage"]["completion_tokens"] == 6
    assert resp["usage"]["total_tokens"] == 11


TOKENS = [[-0.5, 10, "He"], [-1.0, 11, "llo"], [-0.25, 12, " é"]]
TOP = [[[-0.5, 10, "He"], [-2.0, 13, "Ha"]], [[-1.0, 11, "llo"], [-1.5, 14, "y"]],
       [[-0.25, 12, " é"], [-3.0, 15, "!"]]]


def test_completion_logprobs_shape():
    lp = completion_logprobs(TOKENS, TOP)
    assert lp == {"tokens": ["He", "llo", " é"], "token_logprobs": [-0.5, -1.0, -0.25],
                  "top_logprobs": [{"He": -0.5, "Ha": -2.0}, {"llo": -1.0, "y": -1.5}, {" é": -0.25, "!": -3.0}],
                  "text_offset": [0, 2, 5]}
    assert completion_logprobs(TOKENS, None, text_offset=4)["top_logprobs"] is None
    assert completion_logprobs(TOKENS, None, text_offset=4)["text_offset"] == [4, 6, 9]


def test_chat_logprobs_shape():
    lp = chat_logprobs(TOKENS, TOP)
    first = lp["content"][0]
    assert first == {"token": "He", "logprob": -0.5, "bytes": [72, 101],
                     "top_logprobs": [{"token": "He", "logprob": -0.5, "bytes": [72, 101]},
                                      {"token": "Ha", "logprob": -2.0, "bytes": [72, 97]}]}
    assert lp["content"][2]["bytes"] == list(" é".encode())
    assert chat_logprobs(TOKENS, None)["content"][1]["top_logprobs"] == []


def test_responses_carry_logprobs_when_asked():
    res = [result(0, "Hello é", completion_tokens=3, finish={"type": "stop"}, logprobs=TOKENS, top=TOP)]
    comp = build_completion_response(completion(logprobs=2), res, "m")
    assert comp["choices"][0]["logprobs"]["tokens"] == ["He", "llo", " é"]
    ch = build_chat_response(chat(logprobs=True, top_logprobs=2), res, "m")
    assert len(ch["choices"][0]["logprobs"]["content"]) == 3
    assert build_chat_response(chat(), res, "m")["choices"][0]["logprobs"] is None


def test_usage_counts_prompt_once_per_prompt():
    results = [result(i, "x", prompt_tokens=7, completion_tokens=i + 1) for i in range(3)]
    assert usage_from_results(results, n=3)["prompt_tokens"] == 7
    assert usage_from_results(results, n=1)["prompt_tokens"] == 21
    assert usage_from_results([], n=1)["total_tokens"] == 0


# --------------------------------------------------------------------- streaming


def cumulative(index: int, pieces: list[str], finish: dict, **kw) -> list[dict]:
    out, text = [], ""
    for i, piece in enumerate(pieces):
        text += piece
        last = i == len(pieces) - 1
        out.append(result(index, text, completion_tokens=i + 1, finish=finish if last else None, **kw))
    return out


def interleave(*streams: list[dict]) -> list[dict]:
    out = []
    for group in zip(*streams):
        out.extend(group)
    return out


def test_completion_stream_deltas_usage_and_done():
    a = cumulative(0, ["Hel", "lo", "", " world"], {"type": "stop", "matched": "\n"})
    b = cumulative(1, ["Fo", "o", "!", "?"], {"type": "length"})
    events = run_stream(completion(n=2, stream=True, stream_options={"include_usage": True}), interleave(a, b))
    *chunks, usage = events
    for ev in chunks:
        assert ev["id"] == "cmpl-r0" and ev["object"] == "text_completion" and ev["created"] == 1
        assert len(ev["choices"]) == 1
    texts = {0: "", 1: ""}
    for ev in chunks:
        texts[ev["choices"][0]["index"]] += ev["choices"][0]["text"]
    assert texts == {0: "Hello world", 1: "Foo!?"}
    # The empty update produced no chunk; each choice ends with one finish_reason chunk.
    assert len(chunks) == 7
    finishes = [(ev["choices"][0]["index"], ev["choices"][0]["finish_reason"]) for ev in chunks
                if ev["choices"][0]["finish_reason"] is not None]
    assert finishes == [(0, "stop"), (1, "length")]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
                              "prompt_tokens_details": {"cached_tokens": 0}}


def test_stream_without_include_usage_has_no_usage_chunk():
    events = run_stream(completion(stream=True), cumulative(0, ["a", "b"], {"type": "stop"}))
    assert all(ev["choices"] for ev in events) and all("usage" not in ev for ev in events)
    assert "".join(ev["choices"][0]["text"] for ev in events) == "ab"


def test_chat_stream_role_first_then_deltas():
    a = cumulative(0, ["Hi", " there"], {"type": "stop"})
    b = cumulative(1, ["Yo", ""], {"type": "length"})
    events = run_stream(chat(n=2, stream=True, stream_options={"include_usage": True}), interleave(a, b))
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    chunks = events[:-1]
    assert all(ev["object"] == "chat.completion.chunk" and ev["id"] == "chatcmpl-r0" for ev in chunks)
    for index, expected, finish in [(0, "Hi there", "stop"), (1, "Yo", "length")]:
        mine = [ev["choices"][0] for ev in chunks if ev["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in mine[1:])
        assert "".join(c["delta"].get("content", "") for c in mine[1:]) == expected
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [finish]
    # Choice 1's last update added no text: its finish chunk has an empty delta.
    assert [c for ev in chunks for c in ev["choices"] if c["index"] == 1][-1]["delta"] == {}


def test_stream_never_resends_text_the_backend_takes_back():
    items = [result(0, "abc", finish=None), result(0, "ab", finish={"type": "stop"})]
    events = run_stream(completion(stream=True), items)
    assert "".join(ev["choices"][0]["text"] for ev in events) == "abc"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_logprobs_are_deltas():
    items = [result(0, "He", logprobs=TOKENS[:1], top=TOP[:1]),
             result(0, "Hello é", logprobs=TOKENS, top=TOP, finish={"type": "stop"})]
    events = run_stream(completion(stream=True, logprobs=1), items)
    lps = [ev["choices"][0]["logprobs"] for ev in events]
    assert [lp["tokens"] for lp in lps] == [["He"], ["llo", " é"]]
    assert [lp["text_offset"] for lp in lps] == [[0], [2, 5]]
    chat_events = run_stream(chat(stream=True, logprobs=True, top_logprobs=1), items)
    contents = [ev["choices"][0]["logprobs"]["content"] for ev in chat_events[1:]]
    assert [[c["token"] for c in content] for content in contents] == [["He"], ["llo", " é"]]
    assert chat_events[0]["choices"][0]["logprobs"] is None


def test_stream_error_after_start_is_an_error_event():
    events = run_stream(completion(stream=True), [result(0, "a")], raise_after=ValueError("bad things"))
    assert events[0]["choices"][0]["text"] == "a"
    assert events[-1] == {"error": {"message": "bad things", "type": "invalid_request_error",
                                    "param": None, "code": None}}


def test_peek_raises_value_error_before_streaming():
    async def failing() -> AsyncIterator[dict]:
        raise ValueError("prompt too long")
        yield {}  # pragma: no cover

    with pytest.raises(ValueError, match="prompt too long"):
        asyncio.run(_peek(failing()))

    async def replayed() -> list[dict]:
        items = [result(0, "a"), result(0, "ab")]
        return [x async for x in await _peek(aiter_list(items))]

    assert [r["text"] for r in asyncio.run(replayed())] == ["a", "ab"]

    async def empty() -> list[dict]:
        return [x async for x in await _peek(aiter_list([]))]

    assert asyncio.run(empty()) == []


# ------------------------------------------------------------------------ routes


@pytest.fixture(scope="module")
def client(tm) -> TestClient:
    app = FastAPI()
    register_openai_routes(app, lambda: tm)
    return TestClient(app)


def test_models_route(client):
    resp = client.get("/v1/models")
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "list"
    (model,) = data["data"]
    assert model["id"] == "m" and model["object"] == "model" and model["owned_by"] == "radixserve"
    assert model["max_model_len"] == 2048 and isinstance(model["created"], int)


@pytest.mark.parametrize("path, payload, code", [
    ("/v1/completions", b'{"prompt": ', None),
    ("/v1/completions", b'{"model": "m", "prompt": "x", "temperature": "hot"}', None),
    ("/v1/completions", b'{"model": "nope", "prompt": "x"}', "model_not_found"),
    ("/v1/completions", b'{"model": "m", "prompt": "x", "echo": true}', None),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "n": 0}', None),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
     "model_not_found"),
])
def test_routes_answer_bad_requests_with_openai_400(client, path, payload, code):
    resp = client.post(path, content=payload, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code and err["message"]


def test_openapi_describes_both_request_bodies(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert name in schemas
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "ChatMessage" in schemas and "messages" in schemas["ChatCompletionRequest"]["required"]


def test_a_grammar_is_moved_after_the_reasoning_when_the_server_splits_it(tm):
    thinking = SimpleNamespace(**{**vars(tm), "reasoning_parser": "qwen3"})
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}})
    params = chat_to_generate(req, thinking).sampling_params
    assert "json_schema" not in params and '"any_text"' in params["structural_tag"]
    no_thinking = req.model_copy(update={"chat_template_kwargs": {"enable_thinking": False}})
    assert chat_to_generate(no_thinking, thinking).sampling_params["json_schema"] == '{"type": "object"}'
    assert chat_to_generate(req, tm).sampling_params["json_schema"] == '{"type": "object"}'
