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
