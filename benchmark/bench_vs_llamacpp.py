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

`--formats` pairs each engine's own format at the same bits, both made from
the same weights by each engine's own tool (a CPU user of llama.cpp runs a
quantized GGUF, not bf16):

- `bf16`: our bf16 checkpoint against the converter's bf16 GGUF;
- `q8_0`: ours with `--quantization int8` (per-channel int8 made at load)
  against `llama-quantize ... Q8_0`;
- `q4_0`, `q4_k_m`: a GPTQ int4 checkpoint (group 128, symmetric, written by
  test/quant_checkpoints.py from the same weights) against `Q4_0` / `Q4_K_M`.

Our quantized set-ups keep the LM head in bf16, as checkpoints ship it, while
llama-quantize rounds the GGUF's output tensor (Q6_K for Q4_0 / Q4_K_M, Q8_0
for Q8_0); `--quantize-lm-head int8` rounds ours too (the server's flag).

`--emulate avx2` runs our side as an AVX2-only CPU would (benchmark/
cpu_emulation.py) and wants `--llama-cpp-bin` pointing at a llama.cpp built
for AVX2 only (GGML_NATIVE=OFF, GGML_AVX512=OFF, ...): both engines then stay
within the class. The report names the CPU, its level and instruction sets.
Known quirks handled here: a freshly trained BPE vocabulary has no
pre-tokenizer hash the converter knows (mapped to `--force-pre`, qwen2 by
default, whose regex our demo tokenizer uses); `llama-batched-bench` skips a
batch that does not fit its context, so the context is sized to fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

from benchmark.cpu_emulation import LEVEL_ENV, cpu_name, emulation_env

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


def find_binary(llama_dir: pathlib.Path, name: str, bin_dir: pathlib.Path | None = None) -> pathlib.Path:
    places = [bin_dir / name] if bin_dir is not None else []
    for candidate in (*places, llama_dir / "build" / "bin" / name, llama_dir / "bin" / name, llama_dir / name):
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


GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def quantize_gguf(llama_dir: pathlib.Path, bf16_gguf: pathlib.Path, fmt: str) -> pathlib.Path:
    """llama.cpp's own tool, from the bf16 GGUF (as its users make them)."""
    out = bf16_gguf.with_name(bf16_gguf.name.replace("-bf16.gguf", f"-{GGUF_TYPES[fmt]}.gguf"))
    if out.exists() and out.stat().st_mtime >= bf16_gguf.stat().st_mtime:
        return out
    done = subprocess.run([str(find_binary(llama_dir, "llama-quantize")), str(bf16_gguf), str(out), GGUF_TYPES[fmt]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-quantize {GGUF_TYPES[fmt]} failed:\n{done.stderr[-3000:]}")
    return out


def gptq_int4_checkpoint(model_path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """A GPTQ int4 (group 128, symmetric) checkpoint of the same weights, in
    the format GPTQ checkpoints ship in (the test suite's writer: round to
    nearest, no calibration, the same as llama-quantize's Q4_0 / Q4_K_M)."""
    sys.path.insert(0, str(REPO / "test"))  # the writer lives with the tests that check its format
    from quant_checkpoints import QuantSpec, quantize_checkpoint

    out = out_dir / f"{model_path.name}-gptq-int4-g128"
    if not (out / "config.json").exists():
        quantize_checkpoint(model_path, out, QuantSpec("gptq", bits=4, group_size=128))
    return out


@dataclasses.dataclass(frozen=True)
class Pair:
    """One comparison: our set-up against a GGUF at the same bits."""

    name: str
    model_path: pathlib.Path
    our_args: tuple[str, ...]
    gguf: pathlib.Path


def make_pairs(formats: list[str], llama_dir: pathlib.Path, model_path: pathlib.Path, bf16_gguf: pathlib.Path,
               work: pathlib.Path, quantize_lm_head: str | None = None) -> list[Pair]:
    """`quantize_lm_head`: also round our LM head (quantized pairs only), as
    llama-quantize does with the GGUF's output tensor."""
    head = ("--quantize-lm-head", quantize_lm_head) if quantize_lm_head else ()
    pairs = []
    for fmt in formats:
        if fmt == "bf16":
            pairs.append(Pair(fmt, model_path, (), bf16_gguf))
        elif fmt == "q8_0":
            pairs.append(Pair(fmt, model_path, ("--quantization", "int8", *head),
                              quantize_gguf(llama_dir, bf16_gguf, fmt)))
        elif fmt in ("q4_0", "q4_k_m"):
            pairs.append(Pair(fmt, gptq_int4_checkpoint(model_path, work), head,
                              quantize_gguf(llama_dir, bf16_gguf, fmt)))
        else:
            raise SystemExit(f"unknown format {fmt!r}: choose from bf16, {', '.join(GGUF_TYPES)}")
    return pairs


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


def ours_static(model_path: pathlib.Path, batch: int, input_len: int, output_len: int,
                extra: Sequence[str] = (), env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmark.bench_one_batch", "--model-path", str(model_path),
           "--batch-size", str(batch), "--input-len", str(input_len), "--output-len", str(output_len),
           "--rounds", "1", "--json", *extra]  # bench_one_batch takes --quantization as the server does
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
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
def running(cmd: list[str], health_url: str, log: pathlib.Path, cwd: pathlib.Path = REPO,
            env: dict[str, str] | None = None) -> Iterator[None]:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
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


def serving_rounds(args: argparse.Namespace, llama_dir: pathlib.Path, pair: Pair, work: pathlib.Path,
                   env: dict[str, str] | None = None) -> dict[str, list[dict]]:
    llama_port, our_port = _free_port(), _free_port()
    context = args.concurrency * (args.serve_input_len + args.serve_output_len) * 2
    llama_cmd = [str(find_binary(llama_dir, "llama-server", args.llama_cpp_bin)), "-m", str(pair.gguf),
                 "--port", str(llama_port), "--parallel", str(args.concurrency), "-c", str(context),
                 "-t", str(args.threads), "--alias", "default"]
    our_cmd = our_server_cmd(pair.model_path, our_port, args.concurrency, pair.our_args)
    model_path = pair.model_path
    results: dict[str, list[dict]] = {"radixserve": [], "llama.cpp": []}
    # One server at a time: an idle peer still holds memory and threads.
    for _ in range(args.rounds):
        with running(our_cmd, f"http://127.0.0.1:{our_port}/health", work / "radixserve.log", env=env):
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


def our_cpu(env: dict[str, str]) -> dict:
    """The CPU as our side sees it (its level under --emulate), asked in a child."""
    code = "import json; from layers.cpu_features import cpu_report; print(json.dumps(cpu_report()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"probing the CPU failed:\n{done.stderr[-2000:]}")
    return {"name": cpu_name(), **json.loads(done.stdout.strip().splitlines()[-1])}


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp-dir", required=True, type=pathlib.Path)
    p.add_argument("--llama-cpp-bin", type=pathlib.Path, default=None,
                   help="folder of the llama.cpp binaries to time (default: <dir>/build/bin); e.g. an AVX2-only build")
    p.add_argument("--formats", default="bf16", help="comma-separated: bf16, q8_0, q4_0, q4_k_m")
    p.add_argument("--quantize-lm-head", choices=["int8"], default=None,
                   help="quantized pairs: also round our LM head (llama-quantize stores the GGUF's as Q6_K / Q8_0)")
    p.add_argument("--emulate", choices=sorted(LEVEL_ENV), default=None,
                   help="run our side as a CPU of this level would (pair it with --llama-cpp-bin)")
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
    env = emulation_env(args.emulate)
    pairs = make_pairs([f.strip() for f in args.formats.split(",") if f.strip()], llama_dir,
                       pathlib.Path(args.model_path), gguf, work, args.quantize_lm_head)
    report: dict = {"model_path": str(args.model_path), "threads": args.threads, "cpu": our_cpu(env),
                    "llama_cpp_bin": str(args.llama_cpp_bin or llama_dir / "build" / "bin"),
                    "static": {}, "serving": {}}
    print(f"CPU: {report['cpu']['name']}, our level {report['cpu']['level']} "
          f"({' '.join(report['cpu']['features'])})", flush=True)

    for pair in pairs:
        tag = f"{pair.name} ({' '.join(pair.our_args) or pair.model_path.name} vs {pair.gguf.name})"
        if not args.skip_static:
            bench = find_binary(llama_dir, "llama-batched-bench", args.llama_cpp_bin)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                rows: dict[str, list[dict]] = {"radixserve": [], "llama.cpp": []}
                for _ in range(args.rounds):
                    rows["radixserve"].append(ours_static(pair.model_path, batch, args.input_len, args.output_len,
                                                          pair.our_args, env))
                    rows["llama.cpp"].append(llama_static(bench, pair.gguf, batch, args.input_len, args.output_len,
                                                          args.threads))
                report["static"][f"{pair.name}/{batch}"] = rows
                for key in ("decode_tok_per_s", "prefill_tok_per_s"):
                    ours = [round(r[key], 1) for r in rows["radixserve"]]
                    theirs = [round(r[key], 1) for r in rows["llama.cpp"]]
                    ratio = median_of(rows["radixserve"], key) / median_of(rows["llama.cpp"], key)
                    print(f"{tag} static batch {batch:>3} {key:<18} ours {ours} llama.cpp {theirs} "
                          f"ratio {ratio:.2f}x", flush=True)

        if not args.skip_serving:
            rows = serving_rounds(args, llama_dir, pair, work, env)
            report["serving"][pair.name] = rows
            for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
                ratio = median_of(rows["radixserve"], key) / median_of(rows["llama.cpp"], key)
                print(f"{tag} serving {key:<18} ours {[round(r[key], 1) for r in rows['radixserve']]} "
                      f"llama.cpp {[round(r[key], 1) for r in rows['llama.cpp']]} ratio {ratio:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
