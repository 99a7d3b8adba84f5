"""Latency of one static batch: prefill, then decode step by step.

    python -m benchmark.bench_one_batch --batch-size 16 --input-len 128 --output-len 128 --compare-hf

Without --model-path it builds (once, cached) the `small` demo checkpoint.
With --compare-hf, transformers runs the same checkpoint in the same process,
alternating with ours step by step (prefill A, prefill B, then decode step A,
step B, ...), and the ratio of the two medians is printed: timings on a
shared machine swing, side by side they stay comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from layers.attention.registry import attention_backend_names
from model_executor.batch_runner import BatchRunner
from runtime.demo_model import ARCHS
from model_executor.model_config import ModelRunnerConfig
from model_executor.model_runner import ModelRunner


@dataclass
class RoundResult:
    prefill_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.decode_step_s) * 1e3


# An engine run is a generator: it yields the prefill time, then one time per
# decode step. The driver advances all engines in lock step, so a burst of
# load on this shared machine hits both sides of the comparison alike.
EngineRun = Iterator[float]


def random_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Stay clear of the special tokens at the top of the vocabulary.
    return torch.randint(0, vocab_size - 16, (batch_size, input_len), generator=generator)


def clock(device: torch.device | str) -> float:
    """perf_counter after the device's queued work: on CUDA, kernels run
    asynchronously, and an unsynchronised clock would time their launches."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_ours(runner: ModelRunner, prompts: torch.Tensor, output_len: int) -> EngineRun:
    batch = BatchRunner(runner)
    seq_ids = [batch.add_sequence() for _ in range(prompts.shape[0])]
    device = runner.device
    start = clock(device)
    out, _ = batch.extend(seq_ids, prompts.tolist())
    next_ids = torch.argmax(out.next_token_logits, dim=-1)
    yield clock(device) - start
    for _ in range(output_len - 1):
        start = clock(device)
        out, _ = batch.extend(seq_ids, next_ids.view(-1, 1).tolist())
        next_ids = torch.argmax(out.next_token_logits, dim=-1)
        yield clock(device) - start
    batch.release_all()


def run_hf(model, prompts: torch.Tensor, output_len: int) -> EngineRun:
    """transformers' own decode loop: what `generate` does, minus its
    per-step logits-processor bookkeeping (so the baseline is, if anything,
    flattered)."""
    from transformers import DynamicCache

    device = prompts.device
    with torch.inference_mode():
        cache = DynamicCache()
        start = clock(device)
        out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_ids = torch.argmax(out.logits[:, -1], dim=-1)
        yield clock(device) - start
        for _ in range(output_len - 1):
            start = clock(device)
            out = model(input_ids=next_ids.view(-1, 1), past_key_values=cache, use_cache=True)
            next_ids = torch.argmax(out.logits[:, -1], dim=-1)
            yield clock(device) - start


def run_round(engines: dict[str, Callable[[], EngineRun]]) -> dict[str, RoundResult]:
    runs = {name: start() for name, start in engines.items()}
    results = {name: RoundResult() for name in engines}
    for name, run in runs.items():
        results[name].prefill_s = next(run)
    while runs:
        for name in list(runs):
            step = next(runs[name], None)
            if step is None:
                del runs[name]
            else:
                results[name].decode_step_s.append(step)
    return results


def summarize(name: str, rounds: list[RoundResult], batch_size: int, input_len: int) -> dict:
    prefill = statistics.median(r.prefill_s for r in rounds)
    step_ms = statistics.median(r.median_step_ms for r in rounds)
    return {
        "engine": name,
        "prefill_ms": round(prefill * 1e3, 2),
        "prefill_tok_per_s": round(batch_size * input_len / prefill, 1),
        "median_decode_ms_per_step": round(step_ms, 3),
        "decode_tok_per_s": round(batch_size / (step_ms / 1e3), 1),
    }


def paired_ratio(ours: list[RoundResult], other: list[RoundResult]) -> float:
    """Median over decode steps of other's time / ours: step i of both ran
    back to back, so this is the comparison least moved by load swings."""
    ratios = [
        other_step / ours_step
        for ours_round, other_round in zip(ours, other)
        for ours_step, other_step in zip(ours_round.decode_step_s, other_round.decode_step_s)
    ]
    return round(statistics.median(ratios), 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.attention_backend is None:
        from runtime.device_defaults import default_attention_backend

        args.attention_backend = default_attention_backend(args.device, args.dtype)
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="checkpoint dir; default: the small demo model")
    parser.add_argument("--demo-arch", default="qwen3", choices=sorted(ARCHS))
    parser.add_argument("--demo-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention-backend", default=None, choices=attention_backend_names(),
                        help="default: the server's (cpu on a CPU, flashinfer or triton on CUDA)")
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights from config.json alone (a model shape without its weights)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers, in lock step")
    parser.add_argument(
        "--ablate",
        action="append",
        default=[],
        choices=sorted(ABLATIONS),
        help="also time radixserve with this optimisation off, in lock step (repeatable)",
    )
    parser.add_argument(
        "--tp-size",
        type=int,
        default=1,
        help="also time tensor parallelism over this many rank processes, alternating "
        "rounds with tp 1, and report the collectives' share of the decode step",
    )
    parser.add_argument(
        "--cuda-graph",
        default="on",
        choices=["on", "off"],
        help="decode from captured CUDA graphs (CUDA only); `--ablate cuda-graph` times both in lock step",
    )
    parser.add_argument("--quantization", default=None, help="as the server's --quantization")
    parser.add_argument("--quantize-lm-head", default=None, choices=["int8"], help="as the server's flag")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="also time another model set-up in lock step, e.g. int8:quantization=int8 or "
        "int4:model_path=/ckpt/gptq (keys: quantization, quantize_lm_head, model_path); repeatable",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


VARIANT_KEYS = ("quantization", "quantize_lm_head", "model_path")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    settings = dict(item.split("=", 1) for item in spec.split(",") if item)
    unknown = set(settings) - set(VARIANT_KEYS)
    if not name or unknown:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE with keys {', '.join(VARIANT_KEYS)}")
    return name, settings


# name -> (ModelRunnerConfig overrides, torch-native staging budget or None for the default)
ABLATIONS = {
    "prepack": ({"cpu_weight_prepack": False}, None),
    "small-batch-gemv": ({"cpu_small_batch_gemv": False}, None),
    # The streaming kernel for 1-2 rows only (the default before AMX Xeons took it up to 6).
    "streaming-rows": ({"cpu_streaming_rows": 2}, None),
    "fused-ops": ({"cpu_fused_ops": False}, None),
    "native-stack": ({"cpu_native_stack": False}, None),
    "staging": ({}, 0),
    "cuda-graph": ({"disable_cuda_graph": True}, None),
}


def make_runner(
    args: argparse.Namespace, model_path: str, overrides: dict, staging_bytes: int | None, tp_group=None
) -> ModelRunner:
    total = args.batch_size * (args.input_len + args.output_len)
    config = ModelRunnerConfig(
        model_path=model_path,
        dtype=args.dtype,
        device=args.device,
        page_size=args.page_size,
        max_total_tokens=-(-total // args.page_size) * args.page_size + args.page_size * args.batch_size,
        max_running_requests=args.batch_size,
        attention_backend=args.attention_backend,
        random_seed=args.seed,
        disable_cuda_graph=args.cuda_graph == "off",
        load_format=args.load_format,
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    runner = ModelRunner(config, tp_group)
    if staging_bytes is not None:
        from layers.attention.torch_native import TorchNativeAttnBackend

        runner.attn_backend = TorchNativeAttnBackend(staging_bytes=staging_bytes)
    return runner


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_path = args.model_path
    if model_path is None:
        from runtime.demo_model import demo_model_path

        model_path = str(demo_model_path(args.demo_arch, args.demo_size))
    if args.tp_size > 1:
        return compare_tp(args, model_path, argv)
    runner = make_runner(args, model_path, {}, None)
    prompts = random_prompts(args.batch_size, args.input_len, runner.model_config.vocab_size, args.seed)
    engines = {"radixserve": lambda: run_ours(runner, prompts, args.output_len)}
    for name in args.ablate:
        ablated = make_runner(args, model_path, *ABLATIONS[name])
        engines[f"no-{name}"] = lambda r=ablated: run_ours(r, prompts, args.output_len)
    variants = {"radixserve": runner}
    for text in args.variant:
        name, settings = parse_variant(text)
        path = settings.pop("model_path", model_path)
        variants[name] = make_runner(args, path, settings, None)
        engines[name] = lambda r=variants[name]: run_ours(r, prompts, args.output_len)
    if args.compare_hf:
        from transformers import AutoModelForCausalLM

        hf_dtype = runner.dtype  # same dtype as ours, whatever "auto" resolved to
        hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=hf_dtype).to(args.device).eval()
        hf_prompts = prompts.to(args.device)
        engines["transformers"] = lambda: run_hf(hf_model, hf_prompts, args.output_len)

    run_round(engines)  # warm-up: first-call allocations, kernel selection
    rounds: dict[str, list[RoundResult]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, result in run_round(engines).items():
            rounds[name].append(result)

    rows = [summarize(name, r, args.batch_size, args.input_len) for name, r in rounds.items()]
    ours = rows[0]
    for row in rows:
        if row["engine"] in variants:
            variant = variants[row["engine"]]
            row.update(roofline(args, variant.config.model_path, variant, row["median_decode_ms_per_step"]))
            row["weight_bytes"] = variant.quantization_info["weight_bytes"]
    for row in rows[1:]:
        row["ours_decode_speedup"] = round(ours["decode_tok_per_s"] / row["decode_tok_per_s"], 3)
        row["ours_decode_speedup_paired"] = paired_ratio(rounds["radixserve"], rounds[row["engine"]])
        row["ours_prefill_speedup"] = round(ours["prefill_tok_per_s"] / row["prefill_tok_per_s"], 3)
    config = {k: v for k, v in vars(args).items() if k != "json"} | {"model_path": model_path}
    result = {"config": config, "threads": torch.get_num_threads(), "results": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"batch {args.batch_size}, input {args.input_len}, output {args.output_len}, "
            f"{args.dtype}, {args.device}, threads {torch.get_num_threads()}"
        )
        print(
            f"decode roofline: {ours['decode_bytes_per_step'] / 1e6:.1f} MB per step at "
            f"{ours['copy_bandwidth_gb_per_s']} GB/s copy bandwidth = {ours['roofline_ms_per_step']} ms; "
            f"measured {ours['median_decode_ms_per_step']} ms ({ours['roofline_share']:.0%} of the roofline)"
        )
        print(
            f"{'engine':<14}{'prefill ms':>12}{'prefill tok/s':>15}{'decode ms/step':>16}"
            f"{'decode tok/s':>14}{'ours/it decode':>16}{'paired':>8}{'ours/it prefill':>17}"
        )
        for row in rows:
            print(
                f"{row['engine']:<14}{row['prefill_ms']:>12}{row['prefill_tok_per_s']:>15}"
                f"{row['median_decode_ms_per_step']:>16}{row['decode_tok_per_s']:>14}"
                f"{row.get('ours_decode_speedup', ''):>16}{row.get('ours_decode_speedup_paired', ''):>8}"
                f"{row.get('ours_prefill_speedup', ''):>17}"
            )
    return result


def roofline(args: argparse.Namespace, model_path: str, runner: ModelRunner, step_ms: float) -> dict:
    """The decode step's memory-bandwidth floor and our share of it (see roofline.py)."""
    from benchmark.roofline import copy_bandwidth, kv_bytes_per_step, weight_bytes_per_step

    config = runner.model_config
    # Context of the median decode step: the prompt plus half the output.
    context_tokens = args.batch_size * (args.input_len + args.output_len // 2)
    step_bytes = weight_bytes_per_step(model_path, runner.dtype, model=runner.model,
                                       batch_size=args.batch_size) + kv_bytes_per_step(
        context_tokens, config.num_layers, runner.num_kv_heads, config.head_dim, runner.dtype
    )
    bandwidth = copy_bandwidth(runner.device)
    floor_ms = step_bytes / bandwidth * 1e3
    return {
        "decode_bytes_per_step": step_bytes,
        "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
        "roofline_ms_per_step": round(floor_ms, 3),
        "roofline_share": round(floor_ms / step_ms, 3),
    }


def compare_tp(args: argparse.Namespace, model_path: str, argv: list[str] | None) -> dict:
    """tp 1 in this process against tp N in N rank processes, round by round."""
    import sys

    from benchmark.tp_ranks import TPRanks

    runner = make_runner(args, model_path, {}, None)
    prompts = random_prompts(args.batch_size, args.input_len, runner.model_config.vocab_size, args.seed)
    ranks = TPRanks(list(sys.argv[1:] if argv is None else argv), model_path, args.tp_size)
    tp1_rounds, tpn_rounds = [], []
    try:
        for i in range(args.rounds + 1):  # the first round warms up
            tp1 = run_round({"tp1": lambda: run_ours(runner, prompts, args.output_len)})["tp1"]
            tpn = ranks.run_round()
            if i:
                tp1_rounds.append(tp1)
                tpn_rounds.append(tpn)
    finally:
        ranks.close()
    rows = [summarize("tp1", tp1_rounds, args.batch_size, args.input_len),
            summarize(f"tp{args.tp_size}", [r.result for r in tpn_rounds], args.batch_size, args.input_len)]
    decode_s = sum(sum(r.result.decode_step_s) for r in tpn_rounds)
    rows[1]["all_reduce_share_of_decode"] = round(sum(r.all_reduce_s for r in tpn_rounds) / decode_s, 4)
    rows[1]["all_gather_share_of_decode"] = round(sum(r.all_gather_s for r in tpn_rounds) / decode_s, 4)
    rows[1]["decode_time_vs_tp1"] = round(rows[1]["median_decode_ms_per_step"] / rows[0]["median_decode_ms_per_step"], 3)
    config = {k: v for k, v in vars(args).items() if k != "json"} | {"model_path": model_path}
    result = {"config": config, "results": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batch {args.batch_size}, input {args.input_len}, output {args.output_len}, {args.dtype}, {args.device}")
        print(f"{'engine':<8}{'prefill ms':>12}{'decode ms/step':>16}{'decode tok/s':>14}"
              f"{'all-reduce share':>18}{'all-gather share':>18}")
        for row in rows:
            print(f"{row['engine']:<8}{row['prefill_ms']:>12}{row['median_decode_ms_per_step']:>16}"
                  f"{row['decode_tok_per_s']:>14}{row.get('all_reduce_share_of_decode', ''):>18}"
                  f"{row.get('all_gather_share_of_decode', ''):>18}")
    return result


if __name__ == "__main__":
    main()
