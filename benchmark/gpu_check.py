"""The prepared GPU check: one command, one report.

    make gpu-check OUT=report-dir          # on a CUDA machine, under ~8 minutes
    python -m benchmark.gpu_check report-dir --cpu-smoke   # the reduced form CI runs

Steps, each a subprocess with its own time limit (a hang or crash fails that
step and the report still gets written):

1. environment: torch / triton / flashinfer versions, the device, and which
   of `REQUIRED_WHEELS` are missing (the GPU image lacks several; carry
   them as the device README says);
2. the GPU tests (test_gpu.py: every backend against torch_native, CUDA-graph
   replay against eager decode, greedy ids against transformers, overlap
   against no overlap; plus the CPU halves in test_triton_backend.py and
   test_cuda_graph_runner.py and test_cuda_graph_speculative.py, and the
   Triton dequant-GEMM of quantized weights);
3. decode on a Llama-3-8B-shaped dummy model (`--load-format dummy`, config
   only), batch 1 and 32, CUDA graphs on and off in lock step, with the
   bandwidth-roofline share;
4. offline throughput on a Qwen3-0.6B-shaped dummy model, 256 requests,
   input and output uniform in 100-1024, EOS ignored, against transformers
   `generate` on the same device (its own random weights: a speed check).

Writes OUT/report.md and OUT/report.json. `--cpu-smoke` shrinks the shapes
and the workload so the whole pipeline runs on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = pathlib.Path(__file__).resolve().parent.parent

# What a run needs beyond torch and triton; the H100/H200 image lacked all
# but the first two when last checked (../shared/gpu-review.md).
REQUIRED_WHEELS = ("torch", "triton", "transformers", "safetensors", "pyzmq", "fastapi", "uvicorn", "orjson",
                   "flashinfer")
_IMPORT_NAMES = {"pyzmq": "zmq", "flashinfer": "flashinfer"}

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001)
QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
# --cpu-smoke: the same two architectures, a few MB each.
SMOKE_LLAMA = {**LLAMA3_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}
SMOKE_QWEN3 = {**QWEN3_0_6B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024}


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    ok: bool = False
    seconds: float = 0.0
    result: dict = field(default_factory=dict)
    output_tail: str = ""


def environment() -> dict:
    import torch

    versions = {}
    for wheel in REQUIRED_WHEELS:
        module = _IMPORT_NAMES.get(wheel, wheel)
        if importlib.util.find_spec(module) is None:
            versions[wheel] = None
            continue
        try:
            versions[wheel] = getattr(__import__(module), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 -- a broken wheel is reported, not fatal
            versions[wheel] = f"import failed: {exc}"
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": cuda,
        "versions": versions,
        "missing_wheels": [w for w, v in versions.items() if v is None],
    }


def write_config(folder: pathlib.Path, config: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def run_step(step: Step) -> Step:
    started = time.monotonic()
    try:
        done = subprocess.run(step.command, cwd=REPO, capture_output=True, text=True, timeout=step.timeout_s)
        output = done.stdout + done.stderr
        step.ok = done.returncode == 0
    except subprocess.TimeoutExpired as exc:
        output = f"timed out after {step.timeout_s}s\n" + (exc.stdout or b"").decode(errors="replace")[-4000:]
    step.seconds = round(time.monotonic() - started, 1)
    step.output_tail = output[-4000:]
    # Benchmarks print one JSON object as their last line.
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                step.result = json.loads(line)
            except ValueError:
                pass
            break
    return step


def plan(out: pathlib.Path, smoke: bool) -> list[Step]:
    python = sys.executable
    device = "cpu" if smoke else "cuda"
    llama = write_config(out / "models" / "llama3-8b-shape", SMOKE_LLAMA if smoke else LLAMA3_8B)
    qwen = write_config(out / "models" / "qwen3-0.6b-shape", SMOKE_QWEN3 if smoke else QWEN3_0_6B)
    tests = ["test/test_gpu.py", "test/test_triton_backend.py", "test/test_cuda_graph_runner.py",
             "test/test_cuda_graph_speculative.py", "test/test_triton_quant_gemm.py", "test/test_triton_moe.py"]
    steps = [Step("gpu tests", [python, "-m", "pytest", "-q", "-x", *([tests[0]] if smoke else tests)],
                  timeout_s=330)]
    decode_len = ["--input-len", "16", "--output-len", "8", "--rounds", "1"] if smoke else \
        ["--input-len", "512", "--output-len", "64", "--rounds", "2"]
    for batch in (1, 32):
        steps.append(Step(
            f"decode batch {batch}, Llama-3-8B shape, cuda graph on/off",
            [python, "-m", "benchmark.bench_one_batch", "--model-path", llama, "--load-format", "dummy",
             "--device", device, "--batch-size", str(batch), *decode_len, "--ablate", "cuda-graph", "--json"],
            timeout_s=150))
    offline = ["--num-prompts", "8", "--random-input-len", "32", "--random-output-len", "16", "--hf-batch-size", "4",
               "--max-total-tokens", "4096"] if smoke else \
        ["--num-prompts", "256", "--random-input-len", "1024", "--random-output-len", "1024",
         "--hf-batch-size", "64", "--max-total-tokens", "400000", "--max-running-requests", "256"]
    steps.append(Step(
        "offline throughput, Qwen3-0.6B shape, vs transformers",
        [python, "-m", "benchmark.bench_offline_throughput", "--model-path", qwen, "--load-format", "dummy",
         "--random-range-ratio", "0.9", "--compare-hf", "--rounds", "1", "--json", *offline],
        timeout_s=300))
    return steps


def markdown(env: dict, steps: list[Step]) -> str:
    lines = [f"# GPU check: {env['device']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None),
             f"missing wheels: {', '.join(env['missing_wheels']) or 'none'}", "",
             "| step | ok | seconds | key figures |", "| --- | --- | --- | --- |"]
    for step in steps:
        lines.append(f"| {step.name} | {'yes' if step.ok else '**no**'} | {step.seconds} | {key_figures(step)} |")
    for step in steps:
        if not step.ok:
            lines += ["", f"## {step.name}: output tail", "", "```", step.output_tail[-2000:], "```"]
    return "\n".join(lines) + "\n"


def key_figures(step: Step) -> str:
    results = step.result.get("results")
    if isinstance(results, list):  # bench_one_batch rows: ours first
        return "; ".join(
            f"{r['engine']} {r['decode_tok_per_s']} tok/s" + (f" (roofline {r['roofline_share']:.0%})"
                                                               if "roofline_share" in r else "")
            for r in results)
    if isinstance(results, dict):  # bench_offline_throughput
        figures = [f"{name} {r['output_tok_per_s']:.1f} out tok/s" for name, r in results.items()]
        figures += [f"ratio {v}x" for v in step.result.get("throughput_ratio", {}).values()]
        return "; ".join(figures)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="folder for report.md and report.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if not env["cuda"] and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke for the reduced check", file=sys.stderr)
        return 2
    steps = []
    for step in plan(args.out, args.cpu_smoke):
        print(f"== {step.name}", flush=True)
        steps.append(run_step(step))
        print(f"   {'ok' if step.ok else 'FAILED'} in {step.seconds}s {key_figures(step)}", flush=True)
    report = {"environment": env, "steps": [asdict(s) for s in steps]}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(env, steps))
    print(f"report: {args.out / 'report.md'}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
