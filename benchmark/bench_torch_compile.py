"""Is `torch.compile` worth a flag on the CPU decode path? Measure it.

    python -m benchmark.bench_torch_compile

Times one decoder MLP block (residual add + RMSNorm + gate/up GEMM + SwiGLU +
down GEMM) at decode row counts, three ways, interleaved A B C A B C:
- eager, with the oneDNN-prepacked weights the CPU path uses
  (`layers/cpu_gemm.py`);
- eager, plain `F.linear`;
- `torch.compile(dynamic=True)` of the same function on plain weights
  (inductor cannot trace the opaque prepacked weight tensors).

Shapes are the `small` demo model's (hidden 768, intermediate 2048), bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from layers.cpu_gemm import packed_linear, prepack_weight


def mlp_block(x, residual, norm_weight, gate_up, down, eps: float):
    hidden = x + residual
    normed = F.rms_norm(hidden, norm_weight.shape, norm_weight, eps)
    gate_up_out = F.linear(normed, gate_up)
    d = gate_up_out.shape[-1] // 2
    return F.linear(F.silu(gate_up_out[..., :d]) * gate_up_out[..., d:], down), hidden


def mlp_block_prepacked(x, residual, norm_weight, gate_up, down, eps: float):
    hidden = x + residual
    normed = F.rms_norm(hidden, norm_weight.shape, norm_weight, eps)
    gate_up_out = packed_linear(normed, gate_up, None)
    d = gate_up_out.shape[-1] // 2
    return packed_linear(F.silu(gate_up_out[..., :d]) * gate_up_out[..., d:], down, None), hidden


def time_interleaved(fns: dict[str, Callable[[], object]], iters: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean call time, engines alternating per round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (and, for the compiled one, compilation)
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = torch.bfloat16
    norm_weight = torch.randn(args.hidden, dtype=dtype)
    gate_up = torch.randn(2 * args.intermediate, args.hidden, dtype=dtype) * 0.02
    down = torch.randn(args.hidden, args.intermediate, dtype=dtype) * 0.02
    compiled = torch.compile(mlp_block, dynamic=True)
    rows = []
    with torch.inference_mode():
        for m in args.rows:
            x = torch.randn(m, args.hidden, dtype=dtype)
            residual = torch.randn_like(x)
            packed_gate_up, packed_down = prepack_weight(gate_up, m), prepack_weight(down, m)
            start = time.perf_counter()
            compiled(x, residual, norm_weight, gate_up, down, 1e-6)
            compile_s = time.perf_counter() - start
            times = time_interleaved(
                {
                    "eager_prepacked": lambda: mlp_block_prepacked(
                        x, residual, norm_weight, packed_gate_up, packed_down, 1e-6
                    ),
                    "eager": lambda: mlp_block(x, residual, norm_weight, gate_up, down, 1e-6),
                    "compiled": lambda: compiled(x, residual, norm_weight, gate_up, down, 1e-6),
                },
                args.iters,
                args.rounds,
            )
            rows.append(
                {
                    "rows": m,
                    **{f"{k}_us": round(v, 1) for k, v in times.items()},
                    "compiled_vs_eager_prepacked": round(times["eager_prepacked"] / times["compiled"], 3),
                    "first_call_s": round(compile_s, 2),
                }
            )
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'rows':>6}{'eager prepacked us':>20}{'eager us':>10}{'compiled us':>13}{'speedup':>9}{'first call s':>14}")
        for r in rows:
            print(
                f"{r['rows']:>6}{r['eager_prepacked_us']:>20}{r['eager_us']:>10}{r['compiled_us']:>13}"
                f"{r['compiled_vs_eager_prepacked']:>9}{r['first_call_s']:>14}"
            )
    return rows


if __name__ == "__main__":
    main()
