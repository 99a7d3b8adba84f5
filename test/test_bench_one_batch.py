"""The one-batch benchmark runs end to end (timings are not asserted)."""

from __future__ import annotations

import pytest

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


def test_bench_one_batch_reports_the_decode_roofline(tiny_qwen3):
    result = main([
        "--model-path", str(tiny_qwen3), "--batch-size", "2", "--input-len", "8", "--output-len", "4",
        "--rounds", "1", "--json",
    ])
    ours = result["results"][0]
    assert ours["decode_bytes_per_step"] > 0 and ours["copy_bandwidth_gb_per_s"] > 0
    # Both sides are rounded to 3 decimals in the report: compare loosely.
    expected = ours["roofline_ms_per_step"] / ours["median_decode_ms_per_step"]
    assert ours["roofline_share"] > 0
    assert ours["roofline_share"] == pytest.approx(expected, rel=0.1, abs=0.002)


def test_weight_bytes_skip_the_embedding_unless_tied():
    import json

    import torch

    from benchmark.roofline import weight_bytes_per_step
    from runtime.demo_model import demo_model_path

    for tied in (False, True):
        path = demo_model_path("llama", "tiny", tie_word_embeddings=tied, rope_scaling="llama3" if tied else None)
        with open(path / "config.json") as f:
            c = json.load(f)
        h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        q = c["num_attention_heads"] * c["head_dim"]
        kv = c["num_key_value_heads"] * c["head_dim"]
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h  # projections, MLP, two norms
        expected = layers * per_layer + h + vocab * h  # final norm, LM head (or the tied embedding)
        assert weight_bytes_per_step(str(path), torch.bfloat16) == 2 * expected
        assert weight_bytes_per_step(str(path), torch.bfloat16, tp_size=2) == expected


def test_bench_moe_smoke():
    from benchmark import bench_moe

    result = bench_moe.main(["--size", "tiny", "--batch-sizes", "1", "3", "--rounds", "1", "--output-len", "4",
                             "--input-len", "16", "--steps", "2", "--repeats", "2", "--json"])
    sides, parts = result["side_by_side"], result["moe_step_breakdown"]
    assert [row["batch_size"] for row in sides] == [1, 3] and all(row["moe_decode_tok_per_s"] > 0 for row in sides)
    # The MoE step reads more experts at batch 3 than at 1 (one per slot at most).
    assert sides[1]["moe_decode_mb_per_step"] > sides[0]["moe_decode_mb_per_step"]
    assert all(row["moe_layers"] == 3 and row["experts_ms"] > 0 and row["routing_ms"] > 0 for row in parts)


def test_bench_speculative_smoke():
    from benchmark import bench_speculative

    result = bench_speculative.main(["--size", "tiny", "--rounds", "1", "--input-len", "32", "--output-len", "24",
                                     "--json"])
    rows = {(r["workload"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {(w, m) for w in ("repeat", "random") for m in ("plain", "NGRAM", "STANDALONE",
                                                                        "STANDALONE-self", "EAGLE")}
    assert rows[("repeat", "STANDALONE-self")]["accept_length"] > 2  # the target as its own draft: all held
    assert all(r["decode_ms_per_token"] > 0 for r in rows.values())


def test_bench_speculative_on_a_config_only_target(tmp_path):
    """The GPU run's form (a Llama-3-8B-shaped dummy target, plain against
    NGRAM) at the GPU check's smoke shape."""
    from benchmark import bench_speculative
    from benchmark.gpu_check import SMOKE_LLAMA, write_config

    target = write_config(tmp_path / "llama-shape", SMOKE_LLAMA)
    result = bench_speculative.main(["--model-path", target, "--load-format", "dummy", "--rounds", "1",
                                     "--input-len", "32", "--output-len", "16", "--num-draft-tokens", "8", "--json"])
    rows = {(r["workload"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {(w, m) for w in ("repeat", "random") for m in ("plain", "NGRAM")}
    assert rows[("repeat", "NGRAM")]["accept_length"] is not None
    assert all(r["decode_ms_per_token"] > 0 for r in rows.values())
