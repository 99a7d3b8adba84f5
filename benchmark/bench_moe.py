"""A mixture-of-experts model against the dense model of equal active size,
and where the MoE layers' time goes.

    python -m benchmark.bench_moe --batch-sizes 1 32

1. Decode tok/s of the MoE `small` demo (Qwen3-MoE, 8 experts, top-2 of
   1024 each: the dense `small` model's 2048 active MLP width) against the
   dense `small` model, both in one process, alternating round by round
   (bench_one_batch with a variant), at each batch size.
2. The MoE decode step split: each MoE layer's input is captured during a
   real decode step, then its parts are timed in isolation on that input:
   - routing: the router GEMM, softmax / top-k and the load count;
   - dispatch: sorting the slots by expert, gathering the rows, writing the
     outputs back and the weighted sum (the layer minus the expert MLPs);
   - experts: the expert MLPs themselves (at one or two tokens on CPU bf16
     the layer is one native call, cpu_kernels/dispatch.cpp, counted here whole).
   Summed over the layers and divided by the measured step time. Timed in a
   loop, the weights are warmer in cache than in a real step, so "experts"
   is a lower bound; routing and dispatch are small-op overheads that a warm
   cache hardly changes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable

import torch

from benchmark import bench_one_batch
from layers.moe.dispatch import group_by_expert
from layers.moe.router import select_experts
from model_executor.batch_runner import BatchRunner
from model_executor.models.moe import SparseMoeBlock
from runtime.demo_model import demo_model_path


def median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def side_by_side(dense: str, moe: str, batch_size: int, args: argparse.Namespace) -> dict:
    argv = ["--model-path", dense, "--batch-size", str(batch_size), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--rounds", str(args.rounds), "--variant", f"moe:model_path={moe}",
            "--json"]
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench_one_batch.main(argv)
    rows = {row["engine"]: row for row in result["results"]}
    return {"batch_size": batch_size, "dense_decode_tok_per_s": rows["radixserve"]["decode_tok_per_s"],
            "moe_decode_tok_per_s": rows["moe"]["decode_tok_per_s"],
            "dense_ms_per_step": rows["radixserve"]["median_decode_ms_per_step"],
            "moe_ms_per_step": rows["moe"]["median_decode_ms_per_step"],
            "moe_vs_dense_paired": round(1 / rows["moe"]["ours_decode_speedup_paired"], 3),
            "dense_decode_mb_per_step": round(rows["radixserve"]["decode_bytes_per_step"] / 1e6, 1),
            "moe_decode_mb_per_step": round(rows["moe"]["decode_bytes_per_step"] / 1e6, 1),
            "moe_roofline_share": rows["moe"]["roofline_share"]}


def step_breakdown(moe: str, batch_size: int, args: argparse.Namespace) -> dict:
    warmup = 3
    # KV room for the prompt and every decode step below (warm-up, timed, captured).
    ns = bench_one_batch.parse_args(["--batch-size", str(batch_size), "--input-len", str(args.input_len),
                                     "--output-len", str(warmup + args.steps + 1)])
    runner = bench_one_batch.make_runner(ns, moe, {}, None)
    prompts = bench_one_batch.random_prompts(batch_size, args.input_len, runner.model_config.vocab_size, 0)
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in range(batch_size)]
    batch.extend(seq_ids, prompts.tolist())
    step = [[1]] * batch_size
    for _ in range(warmup):
        batch.extend(seq_ids, step)
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch.extend(seq_ids, step)
        step_times.append(time.perf_counter() - start)
    blocks = [m for m in runner.model.modules() if isinstance(m, SparseMoeBlock)]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].clone()))
             for i, b in enumerate(blocks)]
    batch.extend(seq_ids, step)
    for hook in hooks:
        hook.remove()
    batch.release_all()
    parts = {"routing": 0.0, "dispatch": 0.0, "experts": 0.0}
    with torch.inference_mode():
        for i, block in enumerate(blocks):
            x, experts = inputs[i], block.experts
            method = experts.moe_method
            logits = block.gate(x)
            weights, ids = select_experts(logits, experts.top_k, experts.renormalize)
            groups = group_by_expert(ids, experts.num_local_experts)
            rows = x.index_select(0, groups.tokens)

            def route(x=x, block=block, experts=experts):
                w, chosen = select_experts(block.gate(x), experts.top_k, experts.renormalize)
                experts.step_counts.scatter_add_(0, chosen.flatten(), torch.ones_like(chosen.flatten()))

            def run_experts(experts=experts, method=method, groups=groups, rows=rows):
                start = 0
                for expert, count in enumerate(groups.counts):
                    if count:
                        method.expert_mlp(experts, expert, rows[start : start + count])
                        start += count

            whole = median_us(lambda: method.apply(experts, x, weights, ids), args.repeats)
            # At 1-2 tokens on CPU bf16 the whole layer is one native call,
            # cheaper than its GEMVs called one by one: all of it counts as experts.
            expert_us = min(median_us(run_experts, args.repeats), whole)
            parts["routing"] += median_us(route, args.repeats)
            parts["experts"] += expert_us
            parts["dispatch"] += max(whole - expert_us, 0.0)
    step_us = statistics.median(step_times) * 1e6
    return {"batch_size": batch_size, "moe_layers": len(blocks), "step_ms": round(step_us / 1e3, 3),
            **{f"{k}_ms": round(v / 1e3, 3) for k, v in parts.items()},
            **{f"{k}_share": round(v / step_us, 3) for k, v in parts.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed for the breakdown's step time")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per part and layer")
    parser.add_argument("--size", choices=["small", "tiny"], default="small", help="demo size (tiny: a smoke run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    dense, moe = str(demo_model_path("qwen3", args.size)), str(demo_model_path("qwen3_moe", args.size))
    result = {"threads": torch.get_num_threads(),
              "side_by_side": [side_by_side(dense, moe, b, args) for b in args.batch_sizes],
              "moe_step_breakdown": [step_breakdown(moe, b, args) for b in args.batch_sizes]}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"input {args.input_len}, output {args.output_len}, bfloat16, threads {result['threads']}")
    print(f"{'batch':>5}{'dense tok/s':>13}{'MoE tok/s':>11}{'MoE/dense (paired)':>20}{'MB/step dense':>15}"
          f"{'MB/step MoE':>13}{'MoE roofline share':>20}")
    for row in result["side_by_side"]:
        print(f"{row['batch_size']:>5}{row['dense_decode_tok_per_s']:>13}{row['moe_decode_tok_per_s']:>11}"
              f"{row['moe_vs_dense_paired']:>20}{row['dense_decode_mb_per_step']:>15}{row['moe_decode_mb_per_step']:>13}"
              f"{row['moe_roofline_share']:>20.0%}")
    print(f"{'batch':>5}{'step ms':>9}{'routing':>16}{'dispatch':>16}{'experts':>16}")
    for row in result["moe_step_breakdown"]:
        cells = "".join(f"{row[k + '_ms']:>9} ({row[k + '_share']:>4.0%})" for k in ("routing", "dispatch", "experts"))
        print(f"{row['batch_size']:>5}{row['step_ms']:>9}{cells}")
    return result


if __name__ == "__main__":
    main()
