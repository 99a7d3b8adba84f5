"""A real server subprocess on 127.0.0.1: native routes, concurrency, aborts,
bad input, API key, lifecycle."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from server_helpers import alive, start_server


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"), "--dtype", "float32")
    yield srv
    children = srv.children()
    assert srv.stop() == 0
    time.sleep(0.5)
    assert not any(alive(pid) for pid in children), "child processes outlived the server"


def post(server, path, body, **kw):
    return requests.post(server.url + path, data=json.dumps(body) if not isinstance(body, (bytes, str)) else body, timeout=60, **kw)


def greedy(n):
    return {"max_new_tokens": n, "temperature": 0}


def assert_no_leak(server):
    for _ in range(50):  # requests may still be finishing
        state = requests.get(server.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        if state["requests_holding_kv"] == 0 and state["waiting_requests"] == 0:
            break
        time.sleep(0.1)
    assert state["requests_holding_kv"] == 0 and state["waiting_requests"] == 0
    assert state["kv_used_tokens"] == state["cache_evictable_tokens"]  # only the cache holds KV
    assert requests.post(server.url + "/flush_cache", timeout=10).status_code == 200
    state = requests.get(server.url + "/get_server_info", timeout=10).json()["internal_states"][0]
    assert state["kv_used_tokens"] == 0 and state["kv_free_tokens"] == state["kv_capacity_tokens"]
    assert state["cache_size_tokens"] == 0


def read_sse(response):
    chunks = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                break
            chunks.append(json.loads(payload))
    return chunks


def test_generate_single_batch_and_stream(server):
    single = post(server, "/generate", {"text": "Hello there", "sampling_params": greedy(8)}).json()
    assert single["meta_info"]["completion_tokens"] == 8 and len(single["output_ids"]) == 8
    assert single["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    batch = post(server, "/generate", {"text": ["Hello there", "Other prompt"], "sampling_params": greedy(8)}).json()
    assert isinstance(batch, list) and batch[0]["output_ids"] == single["output_ids"]
    ids = post(server, "/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": greedy(4)}).json()
    assert len(ids["output_ids"]) == 4
    with requests.post(server.url + "/generate", json={"text": "Hello there", "sampling_params": greedy(8), "stream": True},
                       stream=True, timeout=60) as r:
        chunks = read_sse(r)
    assert chunks[-1]["text"] == single["text"] and chunks[-1]["output_ids"] == single["output_ids"]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert chunks[-1]["meta_info"]["completion_tokens"] == 8
    assert_no_leak(server)


def test_32_concurrent_streaming_clients(server):
    results = {}

    def client(i):
        body = {"text": f"client {i} says", "sampling_params": greedy(6 + i % 5), "stream": True}
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=120) as r:
            results[i] = read_sse(r)[-1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 32
    assert all(results[i]["meta_info"]["completion_tokens"] == 6 + i % 5 for i in range(32))
    assert_no_leak(server)


def test_disconnect_mid_stream_aborts(server):
    body = {"text": "a long story", "sampling_params": {"max_new_tokens": 1900, "temperature": 0, "ignore_eos": True}, "stream": True}
    r = requests.post(server.url + "/generate", json=body, stream=True, timeout=60)
    lines = r.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    r.close()
    time.sleep(1.5)
    state = requests.get(server.url + "/get_server_info", timeout=10).json()["internal_states"][0]
    assert state["running_requests"] == 0
    assert_no_leak(server)


def test_abort_request_route(server):
    result = {}

    def long_request():
        body = {"text": "abort me", "rid": "to-abort", "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
        result["out"] = post(server, "/generate", body).json()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    duplicate = post(server, "/generate", {"text": "again", "rid": "to-abort", "sampling_params": greedy(2)})
    assert duplicate.status_code == 400 and "already in use" in duplicate.json()["error"]["message"]
    assert post(server, "/abort_request", {"rid": "to-abort"}).status_code == 200
    t.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["out"]["meta_info"]["completion_tokens"] < 1900
    assert_no_leak(server)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "malformed JSON"),
        ({"text": "x", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"text": "x", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"text": "x", "sampling_params": {"n": 0}}, "n must be"),
        ({"text": "x", "sampling_params": {"max_new_tokens": "many"}}, "max_new_tokens"),
        ({"text": "x", "sampling_params": {"unknown_param": 1}}, "unknown sampling parameter"),
        ({"text": "x", "sampling_params": {"max_new_tokens": 3000}}, "2048"),
        ({"text": ""}, "empty"),
        ({"input_ids": []}, "empty"),
        ({}, "exactly one of text or input_ids"),
        ([1, 2], "JSON object"),
        ({"text": 5}, "text must be"),
        ({"input_ids": ["a"]}, "input_ids must be"),
        ({"text": "x", "sampling_params": 3}, "sampling_params must be"),
        ({"text": "x", "stream": "yes"}, "stream and return_logprob"),
        ({"text": "x", "return_logprob": True, "top_logprobs_num": 50}, "top_logprobs_num"),
        # An id outside the vocabulary once killed the scheduler (IndexError in the embedding).
        ({"input_ids": [1, 2, 4096], "sampling_params": greedy(2)}, "token id 4096 at position 2 is outside the vocabulary [0, 4096)"),
        ({"input_ids": [[1, 2], [3, -1]], "sampling_params": greedy(2)}, "token id -1 at position 1"),
        # Duplicate or colliding rids in one call once returned interleaved output.
        ({"text": ["a", "b"], "rid": ["same", "same"]}, "'same' appears more than once"),
        ({"text": ["a", "b"], "rid": ["u1", "u1-0"], "sampling_params": [{"n": 2}, {}]},
         "'u1-0' appears more than once in this request (from rid 'u1' with n > 1)"),
        ({"text": "x", "sampling_params": {"stop": ["s"] * 65}}, "at most 64 stop strings"),
        ({"text": "x", "sampling_params": {"stop": "y" * 257}}, "at most 256 characters"),
        ({"text": "x", "sampling_params": {"stop_token_ids": [1] * 1025}}, "stop_token_ids"),
        ({"text": "x", "sampling_params": {"logit_bias": {"4096": -100}}}, "logit_bias token id 4096 is outside"),
        ({"text": "x", "sampling_params": {"logit_bias": {"5": -101}}}, "logit_bias values must be numbers in [-100, 100]"),
        ({"text": "x", "sampling_params": {"logit_bias": [5]}}, "logit_bias must be an object"),
        ({"text": "x", "sampling_params": {"no_repeat_ngram_size": -1}}, "no_repeat_ngram_size must be >= 0"),
        ({"text": "x", "sampling_params": {"regex": "([a-z"}}, "regex does not compile: Regex parsing error"),
        ({"text": "x", "sampling_params": {"json_schema": '{"type": "nope"}'}}, 'Unsupported type "nope"'),
        ({"text": "x", "sampling_params": {"json_schema": {"type": "object"}}}, "json_schema must be a string"),
        ({"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}, "at most one of json_schema"),
    ],
)
def test_bad_input_is_a_400_and_the_server_keeps_working(server, body, fragment):
    r = post(server, "/generate", body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    ok = post(server, "/generate", {"text": "still fine", "sampling_params": greedy(2)})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2


def test_info_routes(server):
    info = requests.get(server.url + "/get_model_info", timeout=10).json()
    assert info["context_length"] == 2048 and info["is_generation"]
    assert requests.get(server.url + "/health_generate", timeout=30).status_code == 200
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert "radixserve_requests_total" in metrics and "radixserve_time_to_first_token_seconds_bucket" in metrics


# Every top-level field of SGLang's GenerateReqInput (python/sglang/srt/managers/
# io_struct.py) at its default, written out here rather than imported from the
# server, so that a field the server forgets fails this test.
SGLANG_GENERATE_DEFAULTS = {
    "rid": None, "session_id": None, "text": None, "input_ids": None, "input_embeds": None,
    "image_data": None, "video_data": None, "audio_data": None, "mm_hashes": None,
    "mm_content_hashes": None, "use_audio_in_video": False, "video_config": None,
    "sampling_params": None, "return_logprob": None, "logprob_start_len": None,
    "top_logprobs_num": None, "token_ids_logprob": None, "return_sampling_mask": None,
    "return_text_in_logprobs": False, "return_flat_raw_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False, "stream": False, "log_metrics": True,
    "return_hidden_states": False, "return_routed_experts": False, "routed_experts_start_len": 0,
    "return_indexer_topk": False, "modalities": None, "session_params": None, "lora_path": None,
    "lora_id": None, "custom_logit_processor": None, "positional_embed_overrides": None,
    "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None,
    "bootstrap_pair_key": None, "decode_tp_size": None, "routed_dp_rank": None,
    "data_parallel_rank": None, "disagg_prefill_dp_rank": None, "kv_router_hint": None,
    "routing_key": None, "conversation_id": None, "http_worker_ipc": None, "background": False,
    "require_reasoning": False, "max_thinking_tokens": None, "priority": None, "extra_key": None,
    "no_logs": False, "custom_labels": None, "return_bytes": False, "return_entropy": False,
    "return_prompt_token_ids": False, "external_trace_header": None, "received_time": None,
    "need_wait_for_mm_inputs": None, "num_items_assigned": None, "encoder_urls": None,
    "max_dynamic_patch": None, "min_dynamic_patch": None, "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None, "images_config": None, "multi_item_delimiter_indices": None,
    "cache_salt": None,
}


def test_generate_takes_every_sglang_field_at_its_default(server):
    body = {**SGLANG_GENERATE_DEFAULTS, "text": "Hello there", "sampling_params": greedy(4)}
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 4
    # SGLang's bench_serving (--backend sglang) posts exactly this.
    bench = {"text": "Hello there", "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True},
             "stream": True, "return_logprob": False, "logprob_start_len": -1, "lora_path": None,
             "return_routed_experts": False, "image_data": None}
    with requests.post(server.url + "/generate", json=bench, stream=True, timeout=60) as r:
        assert r.status_code == 200
        chunks = read_sse(r)
    assert chunks[-1]["meta_info"]["completion_tokens"] == 4
    warned = [line for line in server.log().splitlines() if "ignoring unknown field" in line]
    assert not [name for name in SGLANG_GENERATE_DEFAULTS if any(repr(name) in line for line in warned)]


@pytest.mark.parametrize("field, value", [
    ("lora_path", "x"), ("lora_path", ["x"]), ("logprob_start_len", 0), ("image_data", "http://a/b.png"),
    ("bootstrap_room", 7), ("return_hidden_states", True), ("data_parallel_rank", 1),
    ("data_parallel_rank", True), ("session_params", {"id": "s"}), ("custom_logit_processor", "{}"),
])
def test_an_sglang_feature_we_lack_is_a_400_naming_it(server, field, value):
    r = post(server, "/generate", {"text": "x", "sampling_params": greedy(2), field: value})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(f"{field} is not supported"), message


def test_unknown_top_level_fields_are_ignored_and_logged_once(server):
    for _ in range(3):
        r = post(server, "/generate", {"text": "x", "sampling_params": greedy(2), "zz_not_a_field": 1, "model": "m"})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["completion_tokens"] == 2
    warnings = [line for line in server.log().splitlines() if "zz_not_a_field" in line]
    assert len(warnings) == 1 and "ignoring unknown field" in warnings[0], warnings


def test_sglang_route_names_answer_like_the_get_forms(server):
    def get(path):
        r = requests.get(server.url + path, timeout=10)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    model_info = get("/model_info")
    assert model_info == get("/get_model_info")
    assert model_info["model_type"] == "qwen3" and model_info["architectures"] == ["Qwen3ForCausalLM"]
    new, old = get("/server_info"), get("/get_server_info")
    assert set(new) == set(old) and new["version"] and new["tp_size"] == 1
    # The scheduler's CPU: what it detected, the level it runs, each kernel's variant.
    cpu = new["cpu"]
    assert cpu["level"] in ("generic", "avx2", "avx512", "amx") and cpu["features_source"] in ("cpuid", "torch", "hwcap")
    assert cpu["level"] == cpu["detected_level"] or cpu["cap"]
    assert isinstance(cpu["kernels"], str) or cpu["kernels"]["rms_norm_bf16"] != "none"
    assert {k: v for k, v in new.items() if k != "internal_states"} == {k: v for k, v in old.items() if k != "internal_states"}
    (load,) = get("/get_load")
    assert set(load) == {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"} and load["dp_rank"] == 0
    assert all(isinstance(v, int) and v >= 0 for v in load.values())


def test_openapi_describes_the_request_bodies(server):
    from managers.request_checks import SAMPLING_FIELDS

    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    bodies = {}
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        bodies[path] = schemas[ref.rsplit("/", 1)[1]]
    assert {"text", "input_ids", "sampling_params", "rid", "stream", "lora_path", "logprob_start_len",
            "bootstrap_room"} <= set(bodies["/generate"]["properties"])
    assert set(schemas["SamplingParamsBody"]["properties"]) == SAMPLING_FIELDS
    assert schemas["SamplingParamsBody"]["additionalProperties"] is False  # unknown keys are a 400
    assert {"prompt", "max_tokens", "logprobs"} <= set(bodies["/v1/completions"]["properties"])
    assert {"messages", "max_completion_tokens"} <= set(bodies["/v1/chat/completions"]["properties"])
    assert bodies["/abort_request"]["required"] == ["rid"]
    for path in ("/flush_cache", "/health", "/model_info", "/server_info", "/get_load"):
        assert path in doc["paths"], path


def test_chat_without_a_tokenizer_is_an_openai_400(tiny_qwen3, tmp_path):
    srv = start_server(tiny_qwen3, tmp_path, "--skip-tokenizer-init")
    try:
        r = post(srv, "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert "tokenizer" in err["message"] and "chat template" in err["message"] and "--skip-tokenizer-init" in err["message"]
        ids = post(srv, "/v1/completions", {"model": "default", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
        assert ids.status_code == 200 and ids.json()["usage"]["completion_tokens"] == 2
    finally:
        assert srv.stop() == 0


def test_api_key_is_enforced(tiny_qwen3, tmp_path):
    srv = start_server(tiny_qwen3, tmp_path, "--api-key", "sekret")
    try:
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200
        assert post(srv, "/generate", {"text": "x", "sampling_params": greedy(1)}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert post(srv, "/generate", {"text": "x", "sampling_params": greedy(1)}, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer sekret"}
        assert post(srv, "/generate", {"text": "x", "sampling_params": greedy(1)}, headers=good).status_code == 200
        assert requests.get(srv.url + "/v1/models", headers=good, timeout=10).status_code == 200
        assert requests.get(srv.url + "/v1/models", timeout=10).status_code == 401
        # Server settings are reported, the key itself is not.
        info = requests.get(srv.url + "/server_info", headers=good, timeout=10)
        assert info.status_code == 200 and "sekret" not in info.text and info.json()["api_key"] == "<set>"
    finally:
        srv.stop()


def test_killing_the_scheduler_fails_fast_and_exits_nonzero(tiny_qwen3, tmp_path):
    srv = start_server(tiny_qwen3, tmp_path)
    processes = requests.get(srv.url + "/get_server_info", timeout=10).json()["processes"]
    pending = {}

    def client():
        body = {"text": "pending", "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
        start = time.monotonic()
        try:
            pending["status"] = post(srv, "/generate", body).status_code
        except requests.RequestException as err:
            pending["status"] = type(err).__name__
        pending["seconds"] = time.monotonic() - start

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.0)
    os.kill(processes["scheduler"], signal.SIGKILL)
    code = srv.proc.wait(20)
    t.join(20)
    assert code != 0
    assert pending["status"] != 200 and pending["seconds"] < 15
    assert "scheduler process" in srv.log() and "died" in srv.log()
    time.sleep(1.5)
    assert not alive(processes["detokenizer"])


def test_generate_with_a_regex_and_an_ebnf(server):
    import re

    out = post(server, "/generate", {"text": "Number:", "sampling_params": {**greedy(12), "regex": "[0-9]{4}"}})
    assert out.status_code == 200 and re.fullmatch("[0-9]{4}", out.json()["text"])
    assert out.json()["meta_info"]["finish_reason"]["type"] == "stop"
    out = post(server, "/generate", {"text": ["a", "b"], "sampling_params": {**greedy(8), "ebnf": 'root ::= "on" | "off"'}})
    assert [o["text"] for o in out.json()] in (["on", "on"], ["on", "off"], ["off", "on"], ["off", "off"])
    assert_no_leak(server)
