"""bf16 linear layers on this CPU, per way of computing them: which one a CPU
level should use (layers/cpu_gemm.py), measured rather than assumed.

    python -m benchmark.bench_cpu_linear                       # this CPU's level
    python -m benchmark.bench_cpu_linear --emulate avx2       # as an AVX2-only CPU would run

Ways, each on the small demo model's linear shapes (qkv, o, gate_up, down,
lm head) at several row counts, the weights rotated over copies larger than
the caches (as a decode step streams them from memory):

- `native`: our streaming kernel on the bf16 weight (layers/cpu_kernels/gemm.inc);
- `onednn`: oneDNN's prepacked bf16 linear (only where oneDNN has bf16);
- `fp32`: torch's fp32 linear on a widened fp32 copy (twice the bytes);
- `torch_bf16`: torch's own bf16 F.linear on the plain weight.

`--emulate LEVEL` re-runs this script in a child with RADIXSERVE_CPU_ISA,
ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS set, so
our kernels, oneDNN, ATen and MKL all stay within that level: the closest
this machine gets to the other CPU class (its caches and memory stay this
machine's). Ways are interleaved call by call, the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmark.cpu_emulation import LEVEL_ENV, emulation_env

SHAPES = {  # [N, K] of the small demo model (hidden 768, intermediate 2048, vocab 16384)
    "qkv": (1280, 768),
    "o": (768, 768),
    "gate_up": (4096, 768),
    "down": (768, 2048),
    "lm_head": (16384, 768),
}


def run(rows_list: list[int], rounds: int) -> list[dict]:
    import torch

    from layers.cpu_features import cpu_isa
    from layers.cpu_gemm import packed_linear, prepack_supported, prepack_weight
    from layers.cpu_kernels import native_ops

    torch.manual_seed(0)
    ops = native_ops()
    cpu = torch.device("cpu")
    results = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(256e6 // (n * k * 2)))  # > 256 MB of bf16 weights: out of every cache
        weights = [torch.randn(n, k).bfloat16() for _ in range(copies)]
        ways = {}
        if ops is not None and ops.bf16_gemm_supported():
            packed = [ops.pack_bf16_weight(w) for w in weights]
            ways["native"] = lambda x, i: ops.bf16_linear(x, packed[i], None, n)
        if prepack_supported(cpu, torch.bfloat16):
            onednn = [prepack_weight(w, 16) for w in weights]
            ways["onednn"] = lambda x, i: packed_linear(x, onednn[i], None)
        wide = [w.float() for w in weights[: max(2, copies // 2)]]  # the same bytes as the bf16 copies
        ways["fp32"] = lambda x, i: torch.nn.functional.linear(x.float(), wide[i % len(wide)]).bfloat16()
        ways["torch_bf16"] = lambda x, i: torch.nn.functional.linear(x, weights[i])
        for rows in rows_list:
            x = torch.randn(rows, k).bfloat16()
            times: dict[str, list[float]] = {way: [] for way in ways}
            calls = max(rounds, copies)
            for call in range(calls + 2):
                for way, fn in ways.items():
                    start = time.perf_counter()
                    fn(x, call % copies)
                    if call >= 2:  # the first two calls warm up
                        times[way].append(time.perf_counter() - start)
            us = {way: round(statistics.median(t) * 1e6, 1) for way, t in times.items()}
            results.append({"shape": name, "n": n, "k": k, "rows": rows, "us": us})
            print(f"{name:>8} [{n}, {k}] rows {rows:>4}: " + "  ".join(f"{w} {v:>9.1f}" for w, v in us.items()),
                  flush=True)
    print(json.dumps({"level": cpu_isa().describe()["level"], "results": results}))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--emulate", choices=sorted(LEVEL_ENV), help="run as a CPU of this level would")
    args = parser.parse_args(argv)
    if args.emulate:
        child = [sys.executable, "-m", "benchmark.bench_cpu_linear", "--rounds", str(args.rounds), "--rows",
                 *map(str, args.rows)]
        sys.exit(subprocess.run(child, env=emulation_env(args.emulate)).returncode)
    run(args.rows, args.rounds)


if __name__ == "__main__":
    main()
