"""Offline throughput: the offline Engine (whole runtime, no HTTP) on a synthetic workload.

    python -m benchmark.bench_offline_throughput --dataset generated-shared-prefix --compare radix-cache

Workloads:
- random: `--num-prompts` prompts of random tokens, input / output lengths
  drawn from [len * (1 - range_ratio), len];
- generated-shared-prefix: `--gsp-num-groups` groups of
  `--gsp-prompts-per-group` requests; each group shares one long system
  prompt followed by its own question (the radix cache's best case).

With --compare, a second configuration (the named feature toggled) runs the
same workload; with --compare-hf, transformers `generate` does (static
batches of --hf-batch-size, left padded). All alternate round by round in
one process and the ratios are printed. Every round starts from an empty
cache.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
import statistics
import time

import torch

from layers.attention.registry import attention_backend_names
from runtime.engine import Engine

Workload = list[tuple[list[int], int, int]]  # (input ids, max_new_tokens, shareable prefix length)


def random_workload(args: argparse.Namespace, vocab: int, gen: torch.Generator) -> Workload:
    def draw(length: int) -> int:
        low = max(1, int(length * (1 - args.random_range_ratio)))
        return int(torch.randint(low, length + 1, (1,), generator=gen))

    out = []
    for _ in range(args.num_prompts):
        ids = torch.randint(4, vocab - 128, (draw(args.random_input_len),), generator=gen).tolist()
        out.append((ids, draw(args.random_output_len), 0))
    return out


def shared_prefix_workload(args: argparse.Namespace, vocab: int, gen: torch.Generator) -> Workload:
    out = []
    for _ in range(args.gsp_num_groups):
        system = torch.randint(4, vocab - 128, (args.gsp_system_prompt_len,), generator=gen).tolist()
        for i in range(args.gsp_prompts_per_group):
            question = torch.randint(4, vocab - 128, (args.gsp_question_len,), generator=gen).tolist()
            # The first request of a group computes the system prompt; the rest can share it.
            out.append((system + question, args.gsp_output_len, 0 if i == 0 else len(system)))
    return out


def summarize(workload: Workload, elapsed: float, output: int, cached: int) -> dict:
    inputs = sum(len(ids) for ids, _, _ in workload)
    shareable = sum(share for _, _, share in workload)
    return {
        "seconds": elapsed,
        "request_per_s": len(workload) / elapsed,
        "input_tok_per_s": inputs / elapsed,
        "output_tok_per_s": output / elapsed,
        "cache_hit_rate": cached / inputs,
        "hit_of_shareable": cached / shareable if shareable else None,
    }


def run_engine(engine: Engine, workload: Workload) -> dict:
    """All requests submitted at once; the scheduler batches them."""
    assert engine.flush_cache()
    params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for _, n, _ in workload]
    start = time.perf_counter()
    results = engine.generate(input_ids=[ids for ids, _, _ in workload], sampling_params=params, show_progress=False)
    elapsed = time.perf_counter() - start
    output = sum(r["meta_info"]["completion_tokens"] for r in results)
    cached = sum(r["meta_info"]["cached_tokens"] for r in results)
    return summarize(workload, elapsed, output, cached)


def run_hf(model, workload: Workload, batch_size: int, pad_id: int) -> dict:
    """transformers `generate` in static batches of `batch_size`, left padded,
    greedy, EOS ignored; each batch runs to its longest requested output, but
    only the requested tokens count as output."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(workload), batch_size):
            chunk = workload[first : first + batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _, _) in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            new = max(n for _, n, _ in chunk)
            model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return summarize(workload, elapsed, sum(n for _, n, _ in workload), 0)


def overlap_default(args: argparse.Namespace) -> bool:
    # As the server: on by default on GPUs, opt-in on CPU.
    return not args.disable_overlap and (torch.cuda.is_available() or args.enable_cpu_overlap)


def engine_args(args: argparse.Namespace, model_path: str, toggle: str | None) -> dict:
    radix = not args.disable_radix_cache
    overlap = overlap_default(args)
    attention = args.attention_backend
    if toggle == "radix-cache":
        radix = not radix
    elif toggle == "overlap":
        overlap = not overlap
    elif toggle == "attention":
        attention = "torch_native"
    return dict(
        load_format=args.load_format,
        skip_tokenizer_init=args.load_format == "dummy",  # a shape-only folder has no tokenizer; ids only
        attention_backend=attention,
        model_path=model_path,
        dtype=args.dtype,
        device="cpu" if not torch.cuda.is_available() else "cuda",
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        schedule_policy=args.schedule_policy,
        disable_radix_cache=not radix,
        disable_overlap=not overlap,
        enable_cpu_overlap=overlap,
    )


def label(args: argparse.Namespace, toggle: str | None) -> str:
    radix = not args.disable_radix_cache ^ (toggle == "radix-cache")
    overlap = overlap_default(args) ^ (toggle == "overlap")
    name = f"radix={'on' if radix else 'off'},overlap={'on' if overlap else 'off'}"
    if args.compare == "attention" or args.attention_backend:
        name += f",attn={'torch_native' if toggle == 'attention' else args.attention_backend or 'default'}"
    return name


def _vocab_size(model_path: str) -> int:
    with open(os.path.join(model_path, "config.json")) as f:
        return json.load(f)["vocab_size"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: the small demo model")
    p.add_argument("--demo-size", default="small", choices=["tiny", "small"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dataset", default="random", choices=["random", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=32)
    p.add_argument("--random-range-ratio", type=float, default=0.5)
    p.add_argument("--gsp-num-groups", type=int, default=4)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=512)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--chunked-prefill-size", type=int, default=2048, help="<= 0 disables")
    p.add_argument("--schedule-policy", default="lpm", choices=["fcfs", "lpm", "dfs-weight"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--disable-overlap", action="store_true")
    p.add_argument("--enable-cpu-overlap", action="store_true", help="overlap scheduling on CPU (off by default)")
    p.add_argument("--attention-backend", default=None, choices=attention_backend_names(),
                   help="default: the server's (cpu on a CPU)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone (transformers then gets its own random init)")
    p.add_argument("--compare", choices=["radix-cache", "overlap", "attention"], default=None,
                   help="also run with this feature toggled (attention: torch_native), alternating, and print the ratio")
    p.add_argument("--compare-hf", action="store_true",
                   help="also run transformers generate on the same prompts, alternating, and print the ratio")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    model_path = args.model_path
    if model_path is None:
        from runtime.demo_model import demo_model_path

        model_path = str(demo_model_path("qwen3", args.demo_size))
    toggles = [None] + ([args.compare] if args.compare else [])
    engines = {label(args, t): Engine(**engine_args(args, model_path, t)) for t in toggles}
    runs_fn: dict[str, Callable[[], dict]] = {
        name: (lambda e=engine: run_engine(e, workload)) for name, engine in engines.items()
    }
    vocab = _vocab_size(model_path)
    make = random_workload if args.dataset == "random" else shared_prefix_workload
    workload = make(args, vocab, torch.Generator().manual_seed(args.seed))
    if args.compare_hf:
        from transformers import AutoModelForCausalLM

        if args.load_format == "dummy":  # same shapes, its own random weights: a speed comparison only
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path)
            hf_model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()
        hf_model.to(engine_args(args, model_path, None)["device"])  # the device ours runs on
        pad_id = hf_model.generation_config.pad_token_id or 0
        runs_fn["transformers"] = lambda: run_hf(hf_model, workload, args.hf_batch_size, pad_id)

    try:
        for name, fn in runs_fn.items():  # warm-up on a slice of the workload
            if name == "transformers":
                run_hf(hf_model, workload[:2], 2, pad_id)
            else:
                run_engine(engines[name], workload[:2])
        runs: dict[str, list[dict]] = {name: [] for name in runs_fn}
        for _ in range(args.rounds):
            for name, fn in runs_fn.items():
                runs[name].append(fn())
    finally:
        for engine in engines.values():
            engine.shutdown()

    summary = {
        name: {key: statistics.median(r[key] for r in rs) if rs[0][key] is not None else None for key in rs[0]}
        for name, rs in runs.items()
    }
    result: dict = {"config": vars(args) | {"model_path": model_path}, "results": summary}
    names = list(summary)
    if len(names) >= 2:
        ours = summary[names[0]]
        result["throughput_ratio"] = {
            other: round(ours["output_tok_per_s"] / summary[other]["output_tok_per_s"], 3) for other in names[1:]
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"dataset {args.dataset}, {len(workload)} requests, {args.dtype}, threads {torch.get_num_threads()}")
        for name, s in summary.items():
            shareable = "-" if s["hit_of_shareable"] is None else f"{s['hit_of_shareable']:.1%}"
            print(
                f"{name:<26} {s['request_per_s']:8.2f} req/s {s['input_tok_per_s']:10.1f} in tok/s "
                f"{s['output_tok_per_s']:8.1f} out tok/s  hit rate {s['cache_hit_rate']:.1%} "
                f"(of shareable: {shareable})"
            )
        for other, ratio in result.get("throughput_ratio", {}).items():
            print(f"{names[0]} / {other} output throughput: {ratio}x")
    return result


if __name__ == "__main__":
    main()

