"""The online serving benchmark against one real server: every backend and
dataset completes, the JSON report has every field, failures are counted."""

from __future__ import annotations

import json

import pytest
from server_helpers import start_server

from benchmark.bench_serving import main

REPORT_FIELDS = [
    "backend", "dataset", "num_prompts", "completed", "failed", "duration_s", "request_throughput",
    "input_throughput", "output_throughput", "total_token_throughput", "concurrency", "max_concurrency",
    "request_rate", "errors",
] + [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2e_latency") for stat in ("mean", "median", "p99")]

SMALL = ["--random-input-len", "24", "--random-output-len", "6", "--disable-tqdm"]


@pytest.fixture(scope="module")
def server(tiny_qwen3, tmp_path_factory):
    srv = start_server(tiny_qwen3, tmp_path_factory.mktemp("logs"))
    yield srv
    srv.stop()


def run(server, tmp_path, *extra: str) -> dict:
    out_file = tmp_path / "report.json"
    report = main(["--base-url", server.url, "--output-file", str(out_file), *SMALL, *extra])
    written = json.loads(out_file.read_text())
    assert written == report
    assert set(REPORT_FIELDS) <= set(written)
    return written


def assert_all_ok(report: dict, n: int) -> None:
    assert report["failed"] == 0, report["errors"]
    assert report["completed"] == report["num_prompts"] == n
    assert report["output_throughput"] > 0 and report["input_throughput"] > 0
    assert report["mean_ttft_ms"] > 0 and report["mean_e2e_latency_ms"] >= report["mean_ttft_ms"]
    assert report["mean_tpot_ms"] > 0 and report["p99_itl_ms"] > 0
    assert report["concurrency"] > 0


@pytest.mark.parametrize("backend", ["native", "openai", "openai-chat"])
def test_random_dataset_each_backend(server, tmp_path, backend):
    report = run(server, tmp_path, "--backend", backend, "--num-prompts", "5", "--request-rate", "inf")
    assert_all_ok(report, 5)
    assert report["backend"] == backend and report["request_rate"] == "inf"
    # ignore_eos is on by default, so every request produced exactly its 6 tokens.
    assert report["total_output_tokens"] == 5 * 6


def test_shared_prefix_with_rate_and_concurrency_limit(server, tmp_path):
    report = run(server, tmp_path, "--dataset", "generated-shared-prefix", "--gsp-num-groups", "2",
                 "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "32", "--gsp-question-len", "8",
                 "--gsp-output-len", "5", "--request-rate", "50", "--max-concurrency", "2", "--backend", "openai")
    assert_all_ok(report, 6)
    assert report["max_concurrency"] == 2 and report["request_rate"] == 50
    assert report["total_output_tokens"] == 6 * 5
    assert report["concurrency"] <= 2.05  # the semaphore caps requests in flight


def test_sharegpt_dataset(server, tmp_path):
    convs = [{"conversations": [
        {"from": "human", "value": f"Question {i}: tell me about the number {i} and its friends."},
        {"from": "gpt", "value": f"The number {i} is a fine number with many friends, like {i + 1}."},
    ]} for i in range(6)]
    convs.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})  # too short
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    report = run(server, tmp_path, "--dataset", "sharegpt", "--dataset-path", str(path), "--num-prompts", "4",
                 "--sharegpt-output-len", "5", "--backend", "openai-chat")
    assert_all_ok(report, 4)
    assert report["total_output_tokens"] == 4 * 5


def test_failed_requests_are_counted_not_raised(server, tmp_path):
    # 3000 prompt tokens exceed the 2048-token context: the server answers 400.
    report = run(server, tmp_path, "--num-prompts", "2", "--random-input-len", "3000")
    assert report["completed"] == 0 and report["failed"] == 2
    assert len(report["errors"]) == 2 and "400" in report["errors"][0]
    assert "context length" in report["errors"][0]
    assert report["mean_ttft_ms"] is None and report["output_throughput"] == 0
