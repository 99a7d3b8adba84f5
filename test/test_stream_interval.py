"""--stream-interval N on a real server: a chunk every N tokens, the first at
once and the final one always, and the same text as with N = 1 on both the
native /generate stream and the OpenAI stream."""

from __future__ import annotations

import json

import pytest
import requests

from server_helpers import start_server

TOKENS = 24
PARAMS = {"max_new_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def servers(tiny_qwen3, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = {}
    try:
        for n in (1, 4):
            started[n] = start_server(tiny_qwen3, logs, "--dtype", "float32", "--stream-interval", str(n))
        yield started
    finally:
        for srv in started.values():
            srv.stop()


def sse_events(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[len(b"data: "):]))
    return out


def native_stream(server) -> list[dict]:
    body = {"text": PROMPT, "sampling_params": PARAMS, "stream": True}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        return sse_events(resp)


def openai_stream(server) -> list[dict]:
    body = {"model": "default", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        return sse_events(resp)


def test_native_stream_sends_every_nth_token(servers):
    every = native_stream(servers[1])
    fourth = native_stream(servers[4])
    # Cumulative chunks: the last one is the whole output, identical for both.
    assert fourth[-1]["text"] == every[-1]["text"] and fourth[-1]["output_ids"] == every[-1]["output_ids"]
    assert fourth[-1]["meta_info"]["finish_reason"]["type"] == "length"
    counts = [c["meta_info"]["completion_tokens"] for c in fourth]
    assert counts[-1] == TOKENS
    # The first chunk is not held back for N tokens; every later one but the
    # final waits for N more (more if the reader fell behind, never fewer).
    assert counts[0] < 4
    assert all(b - a >= 4 for a, b in zip(counts, counts[1:-1]))
    assert len(fourth) <= 1 + -(-(TOKENS - 1) // 4) + 1  # first, one per 4 tokens, final
    assert len(every) > len(fourth)


def test_openai_stream_concatenates_to_the_same_text(servers):
    every = openai_stream(servers[1])
    fourth = openai_stream(servers[4])
    text = lambda chunks: "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))  # noqa: E731
    assert text(fourth) == text(every) != ""
    assert fourth[-1]["choices"][0]["finish_reason"] == "length"
    assert len(fourth) < len(every)
    assert len(fourth) <= 1 + -(-(TOKENS - 1) // 4) + 1
