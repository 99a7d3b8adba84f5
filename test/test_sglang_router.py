"""Two real servers behind SGLang's own router (the ``sglang-router`` package,
an optional test dependency: skipped when it is not installed).

The router registers a worker by reading /server_info and /model_info, checks
/health, and forwards /generate and the OpenAI routes; it re-serializes native
bodies with its own defaults filled in (and a ``model`` field SGLang does not
define), so this also covers the top-level fields it adds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from server_helpers import free_port, start_server

pytest.importorskip("sglang_router")


def requests_served(url: str) -> float:
    metrics = requests.get(url + "/metrics", timeout=10).text
    match = re.search(r"^radixserve_requests_total\{[^}]*\} (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


def start_router(worker_urls: list[str], log_path: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-startup-check-interval", "1", "--health-check-interval-secs", "5",
            "--log-level", "warn"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited during start-up:\n{open(log_path).read()}")
        try:
            # Ready once a worker is registered and healthy; wait for both.
            workers = requests.get(url + "/workers", timeout=2).json()
            entries = workers.get("workers", workers) if isinstance(workers, dict) else workers
            if len(entries) == len(worker_urls) and requests.get(url + "/readiness", timeout=2).status_code == 200:
                return proc, url
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"router not ready after {timeout} s:\n{open(log_path).read()}")


def test_router_spreads_native_and_openai_requests_over_two_workers(tiny_qwen3, tmp_path):
    servers = [start_server(tiny_qwen3, tmp_path, "--dtype", "float32") for _ in range(2)]
    router = None
    try:
        router, url = start_router([s.url for s in servers], os.path.join(tmp_path, "router.log"))
        before = [requests_served(s.url) for s in servers]
        model = requests.get(servers[0].url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for i in range(4):
            native = requests.post(url + "/generate", timeout=60, json={
                "text": f"Hello {i}", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
            assert native.status_code == 200, native.text
            assert native.json()["meta_info"]["completion_tokens"] == 3
            completion = requests.post(url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": f"Once {i}", "max_tokens": 3, "temperature": 0})
            assert completion.status_code == 200, completion.text
            assert completion.json()["usage"]["completion_tokens"] == 3
            chat = requests.post(url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3})
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["role"] == "assistant"
        # A streamed native request, as SGLang's bench_serving sends it.
        with requests.post(url + "/generate", stream=True, timeout=60, json={
                "text": "stream me", "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
                "stream": True, "return_logprob": False, "logprob_start_len": -1, "lora_path": None}) as r:
            assert r.status_code == 200
            assert b"data: [DONE]" in r.content
        served = [requests_served(s.url) - b for s, b in zip(servers, before)]
        assert sum(served) == 13 and all(n > 0 for n in served), served
    finally:
        if router is not None:
            router.send_signal(signal.SIGTERM)
            try:
                router.wait(30)
            except subprocess.TimeoutExpired:
                router.kill()
        for s in servers:
            assert s.stop() == 0
