"""The one-batch benchmark runs end to end (timings are not asserted)."""

from __future__ import annotations

from benchmark.bench_one_batch import main


def test_bench_one_batch_runs_all_engines(tiny_qwen3, capsys):
    result = main([
        "--model-path", str(tiny_qwen3), "--batch-size", "2", "--input-len", "8", "--output-len", "4",
        "--rounds", "1", "--compare-hf", "--ablate", "prepack", "--ablate", "staging", "--json",
    ])
    engines = [row["engine"] for row in result["results"]]
    assert engines == ["radixserve", "no-prepack", "no-staging", "transformers"]
    for row in result["results"]:
        assert row["decode_tok_per_s"] > 0 and row["prefill_tok_per_s"] > 0
    for row in result["results"][1:]:
        assert row["ours_decode_speedup_paired"] > 0
    assert '"engine": "transformers"' in capsys.readouterr().out


def test_bench_one_batch_tp2_reports_collective_shares(tiny_qwen3):
    result = main([
        "--model-path", str(tiny_qwen3), "--batch-size", "2", "--input-len", "8", "--output-len", "4",
        "--rounds", "1", "--tp-size", "2", "--json",
    ])
    tp1, tp2 = result["results"]
    assert (tp1["engine"], tp2["engine"]) == ("tp1", "tp2")
    assert tp2["decode_tok_per_s"] > 0
    # Every decode step all-reduces twice per layer: the share cannot be zero.
    assert 0 < tp2["all_reduce_share_of_decode"] < 1
    assert 0 < tp2["all_gather_share_of_decode"] < 1
