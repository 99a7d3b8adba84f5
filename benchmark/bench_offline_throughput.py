"""Offline throughput: drive the scheduler in-process with a synthetic workload.

    python -m benchmark.bench_offline_throughput --dataset generated-shared-prefix --compare radix-cache

Workloads:
- random: `--num-prompts` prompts of random tokens, input / output lengths
  drawn from [len * (1 - range_ratio), len];
- generated-shared-prefix: `--gsp-num-groups` groups of
  `--gsp-prompts-per-group` requests; each group shares one long system
  prompt followed by its own question (the radix cache's best case).

With --compare, a second configuration (the named feature toggled) runs the
same workload, the two alternating round by round in one process, and the
ratio is printed. Every round starts from an empty cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from managers.io_struct import TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from managers.scheduler import Scheduler, SchedulerConfig
from model_executor.model_config import ModelRunnerConfig

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


def run_once(sched: Scheduler, workload: Workload) -> dict:
    assert sched.flush_cache()
    start = time.perf_counter()
    for i, (ids, max_new, _) in enumerate(workload):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
        sched.add_request(TokenizedGenerateReq(f"req-{i}", ids, params))
    cached = output = 0
    for out in sched.run_until_idle():
        for finish, completion, hit in zip(out.finished_reasons, out.completion_tokens, out.cached_tokens):
            if finish is not None:
                output += completion
                cached += hit
    elapsed = time.perf_counter() - start
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


def build_scheduler(args: argparse.Namespace, model_path: str, toggle: str | None) -> Scheduler:
    radix = not args.disable_radix_cache
    overlap = not args.disable_overlap
    if toggle == "radix-cache":
        radix = not radix
    elif toggle == "overlap":
        overlap = not overlap
    runner_config = ModelRunnerConfig(
        model_path=model_path,
        dtype=args.dtype,
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
    )
    config = SchedulerConfig(
        chunked_prefill_size=args.chunked_prefill_size if args.chunked_prefill_size > 0 else None,
        schedule_policy=args.schedule_policy,
        disable_radix_cache=not radix,
        enable_overlap=overlap,
    )
    return Scheduler(runner_config, config)


def label(args: argparse.Namespace, toggle: str | None) -> str:
    radix = not args.disable_radix_cache ^ (toggle == "radix-cache")
    overlap = not args.disable_overlap ^ (toggle == "overlap")
    return f"radix={'on' if radix else 'off'},overlap={'on' if overlap else 'off'}"


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
    p.add_argument("--compare", choices=["radix-cache", "overlap"], default=None,
                   help="also run with this feature toggled, alternating, and print the ratio")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    model_path = args.model_path
    if model_path is None:
        from runtime.demo_model import demo_model_path

        model_path = str(demo_model_path("qwen3", args.demo_size))
    toggles = [None] + ([args.compare] if args.compare else [])
    schedulers = {label(args, t): build_scheduler(args, model_path, t) for t in toggles}
    vocab = next(iter(schedulers.values())).vocab_size
    make = random_workload if args.dataset == "random" else shared_prefix_workload
    workload = make(args, vocab, torch.Generator().manual_seed(args.seed))

    for sched in schedulers.values():  # warm-up on a slice of the workload
        run_once(sched, workload[:2])
    runs: dict[str, list[dict]] = {name: [] for name in schedulers}
    for _ in range(args.rounds):
        for name, sched in schedulers.items():
            runs[name].append(run_once(sched, workload))
    for sched in schedulers.values():
        sched.shutdown()

    summary = {
        name: {key: statistics.median(r[key] for r in rs) if rs[0][key] is not None else None for key in rs[0]}
        for name, rs in runs.items()
    }
    result: dict = {"config": vars(args) | {"model_path": model_path}, "results": summary}
    names = list(summary)
    if len(names) == 2:
        a, b = summary[names[0]], summary[names[1]]
        result["throughput_ratio"] = round(a["output_tok_per_s"] / b["output_tok_per_s"], 3)
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
        if "throughput_ratio" in result:
            print(f"{names[0]} / {names[1]} throughput: {result['throughput_ratio']}x")
    return result


if __name__ == "__main__":
    main()
