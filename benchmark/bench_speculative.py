"""Batch-1 decode latency with speculative decoding against without, on the
`small` demo model (bf16, CPU defaults), with the acceptance length.

    python -m benchmark.bench_speculative --output-len 128 --rounds 3
    # GPU: a Llama-3-8B-shaped dummy target (config only), CUDA graphs on
    python -m benchmark.bench_speculative --device cuda --load-format dummy \
        --model-path DIR --num-draft-tokens 8 --rounds 3

Modes, each a Scheduler in this process, alternating request by request
(A B C ... A B C ...) so machine swings hit all alike:
- plain: no speculation;
- NGRAM: prompt lookup (managers/ngram_drafts.py);
- STANDALONE: the `draft` demo model (tiny's body, small's vocabulary);
- STANDALONE-self: the target as its own draft (every guess accepted: the
  mechanism's cost at full acceptance; no draft is that good and free);
- EAGLE: a random-weight EAGLE head for the target (runtime/demo_eagle.py).
Workloads: "repeat" (a 32-token passage four times, what asking to repeat or
edit a text looks like) and "random" (128 random tokens). The demo models'
weights are random, so how often a guess holds is theirs, not a trained
model's: the acceptance lengths are reported next to the latencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from managers.io_struct import TokenizedGenerateReq
from managers.eagle_drafts import EagleProposer
from managers.model_drafts import DraftModelProposer
from managers.ngram_drafts import NgramProposer
from managers.sampling_params import SamplingParams
from managers.scheduler import Scheduler
from managers.scheduler_config import SchedulerConfig
from model_executor.model_config import ModelRunnerConfig
from model_executor.model_runner import ModelRunner
from runtime.demo_eagle import demo_eagle_head_path
from runtime.demo_model import demo_model_path


def runner_config(path: str, args: argparse.Namespace, verify_rows: int = 0) -> ModelRunnerConfig:
    """On CUDA: the Triton backend, CUDA graphs for decode and (a target
    that verifies guesses) for verify steps of `verify_rows` rows."""
    tokens = 4 * (args.input_len + args.output_len + 64)
    cuda = args.device == "cuda"
    return ModelRunnerConfig(model_path=path, dtype="bfloat16", device=args.device, page_size=1,
                             max_total_tokens=tokens, max_running_requests=4,
                             attention_backend="triton" if cuda else "cpu", load_format=args.load_format,
                             verify_graph_rows=verify_rows if cuda else 0)


def make_modes(args: argparse.Namespace) -> dict[str, Scheduler]:
    config = SchedulerConfig(enable_overlap=False)
    if args.model_path is not None:  # a given target: no draft model or head fits it, so plain and NGRAM
        return {"plain": Scheduler(runner_config(args.model_path, args), config),
                "NGRAM": Scheduler(runner_config(args.model_path, args, args.num_draft_tokens), config,
                                   drafter=NgramProposer(1, 12, args.num_draft_tokens))}
    if args.size == "tiny":  # a smoke run: the tiny model, another tiny one as draft
        target, draft = str(demo_model_path("qwen3", "tiny")), str(demo_model_path("qwen3", "tiny", seed=1))
    else:
        target, draft = str(demo_model_path("qwen3", "small")), str(demo_model_path("qwen3", "draft"))
    head = str(demo_eagle_head_path("qwen3", args.size))
    modes = {"plain": None, "NGRAM": NgramProposer(1, 12, args.num_draft_tokens)}
    if not args.skip_standalone:
        modes["STANDALONE"] = DraftModelProposer(ModelRunner(runner_config(draft, args)), args.num_draft_tokens)
        modes["STANDALONE-self"] = DraftModelProposer(ModelRunner(runner_config(target, args)),
                                                      args.num_draft_tokens)
        head_config = dataclasses.replace(runner_config(head, args), fallback_weight_paths=(target,))
        modes["EAGLE"] = EagleProposer(ModelRunner(head_config), args.num_draft_tokens)
    schedulers = {name: Scheduler(runner_config(target, args, 0 if drafter is None else args.num_draft_tokens),
                                  config, drafter=drafter)
                  for name, drafter in modes.items()}
    if "EAGLE" in schedulers:  # what --speculative-algorithm EAGLE wires up
        schedulers["EAGLE"].capture_hidden = True
        schedulers["EAGLE"].results.feature_sink = modes["EAGLE"].observe
    return schedulers


def one_request(sched: Scheduler, prompt: list[int], output_len: int) -> dict:
    """Time to first token, then decode ms per output token, and the
    acceptance of this request alone."""
    before = (sched.spec.verify_steps, sched.spec.accepted_tokens)
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    sched.add_request(TokenizedGenerateReq("bench", prompt, params))
    start, first, tokens = time.perf_counter(), None, 0
    while not sched.is_idle():
        out = sched.step()
        tokens += sum(len(ids) for ids in out.new_token_ids)
        if first is None and tokens:
            first = time.perf_counter()
    end = time.perf_counter()
    assert tokens == output_len
    verify = sched.spec.verify_steps - before[0]
    accepted = sched.spec.accepted_tokens - before[1]
    return {"ttft_ms": (first - start) * 1e3, "decode_ms_per_token": (end - first) * 1e3 / (output_len - 1),
            "accept_length": 1 + accepted / verify if verify else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="last token + guesses per verify step")
    parser.add_argument("--skip-standalone", action="store_true")
    parser.add_argument("--size", choices=["small", "tiny"], default="small")
    parser.add_argument("--model-path", help="a target instead of the demo model (plain and NGRAM only), e.g. "
                                             "a config-only folder with --load-format dummy")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    modes = make_modes(args)
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(modes.values())).vocab_size - 128  # below the special tokens
    passage = torch.randint(0, vocab, (args.input_len // 4,), generator=gen).tolist()
    workloads = {"repeat": passage * 4, "random": torch.randint(0, vocab, (args.input_len,), generator=gen).tolist()}
    for sched in modes.values():  # warm-up: first-call allocations
        one_request(sched, workloads["random"], 8)
    samples: dict[tuple[str, str], list[dict]] = {(w, m): [] for w in workloads for m in modes}
    for _ in range(args.rounds):
        for workload, prompt in workloads.items():
            for mode, sched in modes.items():
                samples[(workload, mode)].append(one_request(sched, prompt, args.output_len))
    rows = []
    for (workload, mode), runs in samples.items():
        plain = statistics.median(r["decode_ms_per_token"] for r in samples[(workload, "plain")])
        ms = statistics.median(r["decode_ms_per_token"] for r in runs)
        lengths = [r["accept_length"] for r in runs if r["accept_length"] is not None]
        rows.append({"workload": workload, "mode": mode, "decode_ms_per_token": round(ms, 2),
                     "speedup_vs_plain": round(plain / ms, 3),
                     "accept_length": round(statistics.median(lengths), 2) if lengths else None,
                     "ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 1)})
    for sched in modes.values():
        sched.shutdown()
    result = {"config": vars(args), "threads": torch.get_num_threads(), "results": rows}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"batch 1, input {args.input_len}, output {args.output_len}, bf16, {args.device}, "
          f"threads {result['threads']}, "
          f"{args.num_draft_tokens} tokens per verify")
    print(f"{'workload':<10}{'mode':<17}{'ms/token':>10}{'vs plain':>10}{'accept len':>12}{'TTFT ms':>10}")
    for row in rows:
        length = "" if row["accept_length"] is None else row["accept_length"]
        print(f"{row['workload']:<10}{row['mode']:<17}{row['decode_ms_per_token']:>10}{row['speedup_vs_plain']:>10}"
              f"{length:>12}{row['ttft_ms']:>10}")
    return result


if __name__ == "__main__":
    main()
