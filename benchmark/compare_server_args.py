"""One serving workload against `launch_server` started with different flags, alternating.

    python -m benchmark.compare_server_args --rounds 3 \\
        --variant "pause decodes=" --variant "mixed=--enable-mixed-chunk"

Each `--variant NAME=FLAGS` is one server configuration (FLAGS are appended to
the common command line; empty means the defaults). `--checkout NAME=DIR`
runs that variant's server from another checkout of the project (e.g. a
`git worktree` of an older commit), for before/after comparisons of code:

    git worktree add /tmp/before c476f5f
    python -m benchmark.compare_server_args --variant before= --variant after= \
        --checkout before=/tmp/before Round by round every
variant gets a fresh server, a short warm-up and then the seeded workload,
driven by our `bench_serving` through the streamed OpenAI completions route
(the same driver and workload as `bench_vs_llamacpp`'s serving half). Prints
per-round output tok/s, median TTFT and median TPOT, and each variant's
medians relative to the first.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import statistics
import tempfile

from benchmark.bench_vs_llamacpp import (
    REPO, _free_port, _warmup, add_serving_workload_args, drive, our_server_cmd, running,
)

METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant wants NAME=FLAGS, got {text!r}")
    return name.strip(), shlex.split(flags)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", type=parse_variant, action="append", required=True)
    p.add_argument("--checkout", type=parse_variant, action="append", default=[],
                   help="NAME=DIR: run variant NAME's server from checkout DIR")
    p.add_argument("--model-path", type=pathlib.Path, default=None, help="default: the small demo model")
    p.add_argument("--rounds", type=int, default=3)
    add_serving_workload_args(p)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.model_path is None:
        from runtime.demo_model import demo_model_path

        args.model_path = demo_model_path("qwen3", "small")
    model_path = pathlib.Path(args.model_path)
    results: dict[str, list[dict]] = {name: [] for name, _ in args.variant}
    checkouts = {name: pathlib.Path(dirs[0]) for name, dirs in args.checkout}
    if unknown := set(checkouts) - set(results):
        p.error(f"--checkout for unknown variant(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for name, flags in args.variant:
                port = _free_port()
                cmd = our_server_cmd(model_path, port, args.concurrency, flags)
                url = f"http://127.0.0.1:{port}"
                with running(cmd, f"{url}/health", pathlib.Path(work) / "server.log",
                             cwd=checkouts.get(name, REPO)):
                    drive(url, "openai", model_path, _warmup(args))
                    results[name].append(drive(url, "openai", model_path, args))
                row = results[name][-1]
                print(f"{name:>20}: {row['output_throughput']:7.1f} out tok/s  "
                      f"TTFT {row['median_ttft_ms']:7.1f} ms  TPOT {row['median_tpot_ms']:6.1f} ms", flush=True)
    base = args.variant[0][0]
    report = {"rounds": results, "median": {}, "ratio_to_" + base: {}}
    for name in results:
        med = {m: statistics.median(r[m] for r in results[name]) for m in METRICS}
        report["median"][name] = med
        report["ratio_to_" + base][name] = {
            m: med[m] / statistics.median(r[m] for r in results[base]) for m in METRICS
        }
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
