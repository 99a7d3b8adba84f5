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
        ({"text": "x", "bogus": 1}, "unknown field"),
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
