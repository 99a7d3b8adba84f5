"""radixserve against llama.cpp on this machine, side by side.

    python -m benchmark.bench_vs_llamacpp --llama-cpp-dir ~/src/llama.cpp --rounds 3

`--llama-cpp-dir` is a llama.cpp checkout the user built (never vendored):

    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_UI=OFF   # UI=OFF: no npm, builds offline
    cmake --build build -j --target llama-batched-bench llama-server

The script converts our checkpoint (default: the small demo model) to a bf16
GGUF with that checkout's own converter, then alternates, round by round:

- static decode: `llama-batched-bench` against our `bench_one_batch`, same
  batch sizes, prompt and output lengths, each in a fresh process;
- serving: `llama-server --parallel N` against `launch_server`, both driven
  by our `bench_serving` with one seeded workload through the same streamed
  OpenAI completions route.

llama-server passes every streamed reply through its chat-format parser,
which fails a reply that is not valid UTF-8, as a random-weight model's
often is ("does not match the expected Content-only format"); apply
`benchmark/llamacpp-content-only.patch` to the checkout before building
(`git apply`): plain content then skips the parser. It touches no compute.

and prints per-round figures and the median ratios (ours / llama.cpp).
Known quirks handled here: a freshly trained BPE vocabulary has no
pre-tokenizer hash the converter knows (mapped to `--force-pre`, qwen2 by
default, whose regex our demo tokenizer uses); `llama-batched-bench` skips a
batch that does not fit its context, so the context is sized to fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent

# Runs inside the converter's process: keep the checkout's converter as is,
# but map an unknown BPE pre-tokenizer to the one named in argv[1].
_CONVERT_SHIM = """
import runpy, sys
llama_dir, force_pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
try:
    from conversion import base as models
except ImportError:  # older checkouts keep the model classes in the script itself
    import convert_hf_to_gguf as models
original = models.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return force_pre
models.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
if hasattr(models, "main") and models.__name__ == "convert_hf_to_gguf":
    models.main()
else:
    runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def find_binary(llama_dir: pathlib.Path, name: str) -> pathlib.Path:
    for candidate in (llama_dir / "build" / "bin" / name, llama_dir / "bin" / name, llama_dir / name):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{name} not found under {llama_dir} (build it: see this script's docstring)")


def convert_to_gguf(llama_dir: pathlib.Path, model_path: pathlib.Path, out_dir: pathlib.Path, force_pre: str) -> pathlib.Path:
    out = out_dir / f"{model_path.name}-bf16.gguf"
    if out.exists() and out.stat().st_mtime >= (model_path / "config.json").stat().st_mtime:
        return out
    cmd = [sys.executable, "-c", _CONVERT_SHIM, str(llama_dir), force_pre, str(model_path),
           "--outtype", "bf16", "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"GGUF conversion failed:\n{done.stderr[-3000:]}")
    return out


# -- static decode -----------------------------------------------------------------


def llama_static(bench: pathlib.Path, gguf: pathlib.Path, batch: int, input_len: int, output_len: int,
                 threads: int) -> dict:
    context = batch * (input_len + output_len) + 256  # a batch that does not fit is silently skipped
    cmd = [str(bench), "-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512",
           "-npp", str(input_len), "-ntg", str(output_len), "-npl", str(batch), "-t", str(threads),
           "--output-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            return {"decode_tok_per_s": row["speed_tg"], "prefill_tok_per_s": row["speed_pp"]}
    raise RuntimeError(f"llama-batched-bench printed no result (rc {done.returncode}):\n{done.stderr[-2000:]}")


def ours_static(model_path: pathlib.Path, batch: int, input_len: int, output_len: int) -> dict:
    cmd = [sys.executable, "-m", "benchmark.bench_one_batch", "--model-path", str(model_path),
           "--batch-size", str(batch), "--input-len", str(input_len), "--output-len", str(output_len),
           "--rounds", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bench_one_batch failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])["results"][0]
    return {"decode_tok_per_s": row["decode_tok_per_s"], "prefill_tok_per_s": row["prefill_tok_per_s"]}


# -- serving -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def running(cmd: list[str], health_url: str, log: pathlib.Path, cwd: pathlib.Path = REPO) -> Iterator[None]:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            _wait_ready(health_url, proc)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def add_serving_workload_args(p: argparse.ArgumentParser) -> None:
    """The seeded bench_serving workload both serving comparisons drive."""
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--serve-input-len", type=int, default=192)
    p.add_argument("--serve-output-len", type=int, default=192)
    p.add_argument("--serve-range-ratio", type=float, default=0.67,
                   help="lengths uniform in [len x (1 - ratio), len]: 64-192 by default, as issue 12 measured")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)


def our_server_cmd(model_path: pathlib.Path, port: int, concurrency: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "runtime.launch_server", "--model-path", str(model_path),
            "--port", str(port), "--served-model-name", "default",
            "--max-running-requests", str(concurrency), *extra]


def drive(base_url: str, backend: str, model_path: pathlib.Path, args: argparse.Namespace) -> dict:
    from benchmark.bench_serving import parse_args, run_benchmark

    client = parse_args([
        "--base-url", base_url, "--backend", backend, "--model", "default", "--tokenizer", str(model_path),
        "--dataset", "random", "--num-prompts", str(args.num_prompts),
        "--random-input-len", str(args.serve_input_len), "--random-output-len", str(args.serve_output_len),
        "--random-range-ratio", str(args.serve_range_ratio), "--max-concurrency", str(args.concurrency),
        "--seed", str(args.seed), "--disable-tqdm",
    ])
    report = asyncio.run(run_benchmark(client))
    if report["completed"] != args.num_prompts:
        raise RuntimeError(f"only {report['completed']} of {args.num_prompts} requests succeeded: "
                           f"{sorted(set(report['errors']))[:3]}")
    return {key: report[key] for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms")}


def serving_rounds(args: argparse.Namespace, llama_dir: pathlib.Path, gguf: pathlib.Path,
                   model_path: pathlib.Path, work: pathlib.Path) -> dict[str, list[dict]]:
    llama_port, our_port = _free_port(), _free_port()
    context = args.concurrency * (args.serve_input_len + args.serve_output_len) * 2
    llama_cmd = [str(find_binary(llama_dir, "llama-server")), "-m", str(gguf), "--port", str(llama_port),
                 "--parallel", str(args.concurrency), "-c", str(context), "-t", str(args.threads),
                 "--alias", "default"]
    our_cmd = our_server_cmd(model_path, our_port, args.concurrency)
    results: dict[str, list[dict]] = {"radixserve": [], "llama.cpp": []}
    # One server at a time: an idle peer still holds memory and threads.
    for _ in range(args.rounds):
        with running(our_cmd, f"http://127.0.0.1:{our_port}/health", work / "radixserve.log"):
            drive(f"http://127.0.0.1:{our_port}", "openai", model_path, _warmup(args))
            results["radixserve"].append(drive(f"http://127.0.0.1:{our_port}", "openai", model_path, args))
        with running(llama_cmd, f"http://127.0.0.1:{llama_port}/health", work / "llama-server.log"):
            drive(f"http://127.0.0.1:{llama_port}", "openai", model_path, _warmup(args))
            results["llama.cpp"].append(drive(f"http://127.0.0.1:{llama_port}", "openai", model_path, args))
        print(f"serving round: ours {results['radixserve'][-1]}  llama.cpp {results['llama.cpp'][-1]}", flush=True)
    return results


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "num_prompts": min(8, args.num_prompts), "seed": args.seed + 1})


# -- report ------------------------------------------------------------------------


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp-dir", required=True, type=pathlib.Path)
    p.add_argument("--model-path", type=pathlib.Path, default=None, help="default: the small demo model")
    p.add_argument("--work-dir", type=pathlib.Path, default=None, help="GGUF and logs (default: a temp dir)")
    p.add_argument("--force-pre", default="qwen2", help="pre-tokenizer for a vocabulary the converter does not know")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-sizes", default="1,16,32")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--skip-serving", action="store_true")
    add_serving_workload_args(p)
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the report here")
    args = p.parse_args(argv)

    if args.model_path is None:
        from runtime.demo_model import demo_model_path

        args.model_path = demo_model_path("qwen3", "small")
    work = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    llama_dir = args.llama_cpp_dir.expanduser().resolve()
    gguf = convert_to_gguf(llama_dir, pathlib.Path(args.model_path), work, args.force_pre)
    report: dict = {"model_path": str(args.model_path), "gguf": str(gguf), "threads": args.threads,
                    "static": {}, "serving": {}}

    if not args.skip_static:
        bench = find_binary(llama_dir, "llama-batched-bench")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            rows: dict[str, list[dict]] = {"radixserve": [], "llama.cpp": []}
            for _ in range(args.rounds):
                rows["radixserve"].append(ours_static(args.model_path, batch, args.input_len, args.output_len))
                rows["llama.cpp"].append(llama_static(bench, gguf, batch, args.input_len, args.output_len,
                                                      args.threads))
            report["static"][batch] = rows
            for key in ("decode_tok_per_s", "prefill_tok_per_s"):
                ours = [round(r[key], 1) for r in rows["radixserve"]]
                theirs = [round(r[key], 1) for r in rows["llama.cpp"]]
                ratio = median_of(rows["radixserve"], key) / median_of(rows["llama.cpp"], key)
                print(f"static batch {batch:>3} {key:<18} ours {ours} llama.cpp {theirs} ratio {ratio:.2f}x",
                      flush=True)

    if not args.skip_serving:
        rows = serving_rounds(args, llama_dir, gguf, pathlib.Path(args.model_path), work)
        report["serving"] = rows
        for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
            ratio = median_of(rows["radixserve"], key) / median_of(rows["llama.cpp"], key)
            print(f"serving {key:<18} ours {[round(r[key], 1) for r in rows['radixserve']]} "
                  f"llama.cpp {[round(r[key], 1) for r in rows['llama.cpp']]} ratio {ratio:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
