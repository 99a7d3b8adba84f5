"""The offline throughput benchmark runs both workloads and reports cache hits
(timings are not asserted)."""

from __future__ import annotations

from benchmark.bench_offline_throughput import main


def test_shared_prefix_workload_hits_the_cache(tiny_qwen3):
    result = main([
        "--model-path", str(tiny_qwen3), "--dtype", "float32", "--dataset", "generated-shared-prefix",
        "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4", "--gsp-system-prompt-len", "128",
        "--gsp-question-len", "8", "--gsp-output-len", "4", "--compare", "radix-cache",
        "--rounds", "1", "--max-total-tokens", "4096", "--json",
    ])
    on, off = result["results"]["radix=on,overlap=off"], result["results"]["radix=off,overlap=off"]
    assert on["hit_of_shareable"] >= 0.9
    assert off["cache_hit_rate"] == 0
    assert result["throughput_ratio"]["radix=off,overlap=off"] > 0


def test_random_workload_runs(tiny_qwen3):
    result = main([
        "--model-path", str(tiny_qwen3), "--dtype", "float32", "--num-prompts", "6",
        "--random-input-len", "40", "--random-output-len", "6", "--rounds", "1",
        "--disable-overlap", "--max-total-tokens", "4096", "--json",
    ])
    (summary,) = result["results"].values()
    assert summary["output_tok_per_s"] > 0 and summary["hit_of_shareable"] is None


def test_compare_hf_prints_a_ratio(tiny_qwen3, capsys):
    result = main([
        "--model-path", str(tiny_qwen3), "--dtype", "float32", "--num-prompts", "6",
        "--random-input-len", "40", "--random-output-len", "6", "--rounds", "1", "--compare-hf",
        "--hf-batch-size", "4", "--max-total-tokens", "4096",
    ])
    assert result["throughput_ratio"]["transformers"] > 0
    assert "/ transformers output throughput" in capsys.readouterr().out
