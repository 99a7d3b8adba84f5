"""Randomised scheduler stress: KV pressure, shared prefixes, n > 1, aborts.

    python -m benchmark.stress_scheduler --minutes 5 --seed 0 [--page-size 16]

Drives an in-process `Scheduler` (tiny demo model, fp32, CPU) round after
round. Each round draws a configuration (page size 1/16, chunked prefill
on/off, overlap on/off, a tight KV pool, a schedule policy) and a workload:
groups of prompts sharing long prefixes whose lengths often end mid-page,
n in 1..3, a few sampled or penalised requests, staggered arrivals and
random aborts of requests still in flight. After every step the KV
ownership invariant is checked (each page is free, held by the radix cache
or held by exactly one request); after each round nothing may leak, every
request must finish once, unaborted ones with exactly max_new_tokens tokens
(no EOS is configured), and greedy outputs must equal those of the same
request run alone.

Any failure prints the round's seed and configuration and exits non-zero.
`test/test_scheduler_stress.py` runs a few rounds of the same generator.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from layers.attention.registry import backends_for_device
from managers.io_struct import AbortReq, BatchTokenIDOut, TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from managers.scheduler import Scheduler
from managers.scheduler_config import SchedulerConfig
from model_executor.model_config import ModelRunnerConfig

# Prompt token ids: above the special tokens, inside the trained vocabulary
# (as test/model_helpers.make_prompts draws them).
FIRST_TOKEN = 4
VOCAB_MARGIN = 128


# -- configuration and workload ---------------------------------------------------


@dataclass(frozen=True)
class StressConfig:
    page_size: int
    chunk: int | None  # chunked_prefill_size; a multiple of page_size
    overlap: bool
    max_total_tokens: int
    max_running: int
    policy: str
    # Not drawn: a seed gives the same workload whichever kernels run it.
    attention_backend: str = "torch_native"

    def describe(self) -> str:
        return (f"page_size={self.page_size} chunk={self.chunk} overlap={self.overlap} "
                f"max_total_tokens={self.max_total_tokens} max_running={self.max_running} "
                f"policy={self.policy} attention={self.attention_backend}")


@dataclass(frozen=True)
class Arrival:
    step: int  # the scheduler step before which the request is added
    rid: str
    input_ids: tuple[int, ...]
    params: SamplingParams

    def child_rids(self) -> list[str]:
        """The rids the scheduler reports for it (n > 1 becomes `{rid}-{i}`)."""
        n = self.params.n
        return [self.rid] if n == 1 else [f"{self.rid}-{i}" for i in range(n)]


@dataclass(frozen=True)
class Workload:
    seed: int
    config: StressConfig
    arrivals: list[Arrival]
    abort_prob: float  # per step: chance to abort one request still in flight


def random_config(rng: random.Random, page_size: int | None = None) -> StressConfig:
    page = page_size if page_size is not None else rng.choice([1, 16])
    chunk = rng.choice([None, 64, 128, 256])
    return StressConfig(
        page_size=page,
        chunk=chunk,
        overlap=rng.random() < 0.5,
        # Tight: a few long prompts fill it, so admission fails, the cache
        # evicts and running requests get retracted.
        max_total_tokens=rng.choice([1024, 1536, 2048, 4096]),
        # Many decodes: each needs a fresh page now and then that admission
        # does not budget for, so prefills fail to get KV and are undone.
        max_running=rng.choice([4, 8, 16, 32]),
        policy=rng.choice(["lpm", "lpm", "fcfs", "dfs-weight"]),
    )


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN, vocab_size - VOCAB_MARGIN) for _ in range(n)]


def _prefix_length(rng: random.Random, page_size: int) -> int:
    """A shared-prefix length; with paging, often a page boundary +- a little
    (a prefix that ends mid-page is the interesting case)."""
    if rng.random() < 0.5:
        return rng.randint(8, 400)
    pages = rng.randint(1, 20)
    return max(1, pages * 16 + rng.choice([-3, -1, 0, 1, 5]))


def _sampling_params(rng: random.Random, max_new: int, n: int) -> SamplingParams:
    kind = rng.random()
    if kind < 0.75:
        return SamplingParams(max_new_tokens=max_new, temperature=0.0, n=n)
    if kind < 0.9:
        return SamplingParams(max_new_tokens=max_new, temperature=0.8, top_k=50,
                              seed=rng.randrange(1 << 30), n=n)
    # Penalties make the overlap scheduler wait for each result (fresh state).
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.3, n=n)


def random_workload(seed: int, vocab_size: int, context_len: int, page_size: int | None = None,
                    num_requests: int = 60, max_new_tokens: int = 48,
                    attention_backend: str = "torch_native") -> Workload:
    rng = random.Random(seed)
    config = dataclasses.replace(random_config(rng, page_size), attention_backend=attention_backend)
    limit = min(config.max_total_tokens, context_len)
    groups = [_tokens(rng, _prefix_length(rng, config.page_size), vocab_size)
              for _ in range(rng.randint(2, 4))]
    arrivals: list[Arrival] = []
    step = 0
    for i in range(num_requests):
        group = rng.choice(groups)
        roll = rng.random()
        if roll < 0.15:
            prompt = list(group)  # the whole shared prompt again: fully cached
        elif roll < 0.8:
            # Part of the shared prompt (nested prefixes) plus its own tail.
            cut = rng.choice([len(group), len(group), rng.randint(1, len(group))])
            # A long tail after a cached prefix gets chunked, and admission
            # undone when the cut chunk finds no KV: the crash.
            tail = rng.randint(1, 60) if rng.random() < 0.7 else rng.randint(60, 300)
            prompt = group[:cut] + _tokens(rng, tail, vocab_size)
        else:
            prompt = _tokens(rng, rng.randint(1, 300), vocab_size)  # unrelated
        max_new = rng.choice([0, 1, 2]) if rng.random() < 0.1 else rng.randint(1, max_new_tokens)
        # Keep every request admissible on its own (oversized ones are refused up front).
        prompt = prompt[: max(1, limit - max_new - config.page_size)]
        n = rng.choice([1, 1, 1, 2, 3])
        arrivals.append(Arrival(step, f"r{i}", tuple(prompt), _sampling_params(rng, max_new, n)))
        # Bursts (several requests before one step) and gaps; a long gap lets
        # running requests finish, so the next wave finds its prefixes cached
        # but evictable: admission counts them as free room, then locks them.
        step += rng.choice([0, 0, 0, 1, 1, 2, 4]) if rng.random() > 0.06 else rng.randint(20, 60)
    return Workload(seed, config, arrivals, abort_prob=rng.choice([0.0, 0.05, 0.15, 0.3]))


# -- building and checking a scheduler --------------------------------------------------


def build_scheduler(model_path: pathlib.Path | str, config: StressConfig) -> Scheduler:
    runner_config = ModelRunnerConfig(
        model_path=str(model_path),
        dtype="float32",  # greedy outputs must be reproducible across batchings
        page_size=config.page_size,
        max_total_tokens=config.max_total_tokens,
        max_running_requests=config.max_running,
        attention_backend=config.attention_backend,
    )
    sched_config = SchedulerConfig(
        chunked_prefill_size=config.chunk,
        schedule_policy=config.policy,
        enable_overlap=config.overlap,
    )
    return Scheduler(runner_config, sched_config)


def _requests_holding_kv(sched: Scheduler) -> list:
    """Every request that may own a req_to_token row: running, mid chunked
    prefill, or in the batch still in flight (a finished one under overlap,
    a hidden n > 1 warm-up)."""
    reqs = list(sched.running)
    if sched.chunked_req is not None:
        reqs.append(sched.chunked_req)
    if sched.inflight is not None:
        reqs.extend(sched.inflight.batch.reqs)
    unique = {id(r): r for r in reqs if r.req_pool_idx is not None}
    return list(unique.values())


def kv_ownership_errors(sched: Scheduler, held: torch.Tensor | None = None) -> list[str]:
    """Each KV page is exactly one of: free, in the radix cache, or owned by one
    live request (its row past the cache-owned prefix); and a request's cached
    prefix points at pages the cache holds. `held`: slots a test took itself."""
    allocator, page = sched.allocator, sched.page_size
    owner = torch.zeros(allocator.num_pages + 1, dtype=torch.int64)  # claims per page
    owner[allocator.page_is_free] += 1
    if held is not None:
        owner[torch.unique(held.cpu() // page)] += 1
    tree_pages = torch.zeros(allocator.num_pages + 1, dtype=torch.bool)
    cache = sched.tree_cache
    if hasattr(cache, "_iter_nodes"):
        for node in cache._iter_nodes():
            if node is not cache.root_node and node.value.numel():
                pages = torch.unique(node.value.cpu() // page)
                owner[pages] += 1
                tree_pages[pages] = True
    errors = []
    table = sched.req_to_token_pool.req_to_token
    rows = set()
    for req in _requests_holding_kv(sched):
        if req.req_pool_idx in rows:
            errors.append(f"{req.rid}: req_to_token row {req.req_pool_idx} shared by two requests")
        rows.add(req.req_pool_idx)
        shared = len(req.prefix_indices) // page * page
        if req.kv_committed_len < shared:
            errors.append(f"{req.rid}: kv_committed_len {req.kv_committed_len} < cached prefix {shared}")
            continue
        row = table[req.req_pool_idx, : req.kv_committed_len].to(torch.int64).cpu()
        if req.kv_committed_len and int(row.min()) < page:
            errors.append(f"{req.rid}: position without a KV slot below kv_committed_len "
                          f"{req.kv_committed_len}")
            continue
        if not bool(tree_pages[row[:shared] // page].all()) and hasattr(cache, "_iter_nodes"):
            errors.append(f"{req.rid}: cached prefix points at pages the cache does not hold")
        owner[torch.unique(row[shared:] // page)] += 1
    owner[0] = 1  # the padding page is never allocated
    if bool((owner == 0).any()):
        errors.append(f"leaked pages (no owner): {torch.nonzero(owner == 0).flatten().tolist()[:10]}")
    if bool((owner > 1).any()):
        errors.append(f"pages with two owners: {torch.nonzero(owner > 1).flatten().tolist()[:10]}")
    return errors


def leak_errors(sched: Scheduler) -> list[str]:
    """After a round: idle, no request remembered, every slot and row free."""
    errors = []
    if not sched.is_idle():
        errors.append("scheduler not idle")
    if sched.requests or sched.pending_aborts:
        errors.append(f"requests left: {sorted(sched.requests)[:10]}, pending aborts: {len(sched.pending_aborts)}")
    if not sched.flush_cache():
        errors.append("flush_cache refused")
    return errors + sched.kv.leaks()  # the same check as the tests' assert_no_leak


# -- running a round -------------------------------------------------------------


@dataclass
class Outcome:
    output_ids: list[int] = field(default_factory=list)
    finish: object = None
    reports_after_finish: int = 0


@dataclass
class RoundResult:
    outcomes: dict[str, Outcome]
    expected: dict[str, Arrival]  # reported rid -> its request
    aborts_sent: set[str]
    steps: int
    retractions: int
    evicted_tokens: int

    @property
    def aborted(self) -> int:
        return sum(o.finish is not None and o.finish.kind == "abort" for o in self.outcomes.values())


class StressFailure(AssertionError):
    pass


def _collect(outcomes: dict[str, Outcome], out: BatchTokenIDOut) -> None:
    for rid, new, finish in zip(out.rids, out.new_token_ids, out.finished_reasons):
        outcome = outcomes.setdefault(rid, Outcome())
        if outcome.finish is not None:
            outcome.reports_after_finish += 1
        outcome.output_ids.extend(new)
        outcome.finish = finish


def run_round(sched: Scheduler, workload: Workload, check_every_step: bool = True,
              max_steps: int = 5_000) -> RoundResult:
    """Feed the workload (arrivals by step, random aborts) until the scheduler is idle."""
    rng = random.Random(workload.seed ^ 0x5EED)
    arrivals = sorted(workload.arrivals, key=lambda a: a.step)
    expected = {rid: a for a in arrivals for rid in a.child_rids()}
    outcomes: dict[str, Outcome] = {}
    aborts_sent: set[str] = set()
    live: list[str] = []  # reported rids added and not yet seen finished
    next_arrival, step = 0, 0
    while next_arrival < len(arrivals) or not sched.is_idle():
        while next_arrival < len(arrivals) and arrivals[next_arrival].step <= step:
            arrival = arrivals[next_arrival]
            sched.add_request(TokenizedGenerateReq(arrival.rid, list(arrival.input_ids), arrival.params))
            live.extend(arrival.child_rids())
            next_arrival += 1
        live = [rid for rid in live if rid not in outcomes or outcomes[rid].finish is None]
        if live and rng.random() < workload.abort_prob:
            rid = rng.choice(live)
            sched.abort_request(AbortReq(rid))
            aborts_sent.add(rid)
        _collect(outcomes, sched.step())
        if check_every_step and (errors := kv_ownership_errors(sched)):
            raise StressFailure(f"step {step}: KV ownership broken: " + "; ".join(errors))
        step += 1
        if step > max_steps:
            raise StressFailure(f"not idle after {max_steps} steps")
    _collect(outcomes, sched.step())  # anything reported by the last step's processing
    return RoundResult(outcomes, expected, aborts_sent, step, sched.num_retractions,
                       getattr(sched.tree_cache, "evicted_tokens", 0))


def outcome_errors(result: RoundResult) -> list[str]:
    """Each request finished exactly once; unaborted ones with max_new_tokens tokens."""
    errors = []
    for rid, arrival in result.expected.items():
        outcome = result.outcomes.get(rid)
        if outcome is None or outcome.finish is None:
            errors.append(f"{rid}: never finished")
            continue
        if outcome.reports_after_finish:
            errors.append(f"{rid}: reported again after it finished")
        kind, want = outcome.finish.kind, arrival.params.max_new_tokens
        if kind == "abort":
            if rid not in result.aborts_sent:
                errors.append(f"{rid}: aborted without an abort ({outcome.finish.message})")
            elif len(outcome.output_ids) > want:
                errors.append(f"{rid}: aborted with {len(outcome.output_ids)} > {want} tokens")
        elif kind != "length" or len(outcome.output_ids) != want:
            errors.append(f"{rid}: finished {kind} with {len(outcome.output_ids)} tokens, want length {want}")
    for rid in result.outcomes.keys() - result.expected.keys():
        errors.append(f"{rid}: reported but never sent")
    return errors


class AloneReference:
    """Greedy outputs of requests run one at a time: plain loop, no cache, no
    paging. Memoised by prompt; a longer run answers shorter ones (greedy
    output for k tokens is a prefix of the output for more)."""

    def __init__(self, model_path: pathlib.Path | str) -> None:
        runner_config = ModelRunnerConfig(model_path=str(model_path), dtype="float32", page_size=1,
                                          max_total_tokens=4096, max_running_requests=1)
        config = SchedulerConfig(chunked_prefill_size=None, enable_overlap=False, disable_radix_cache=True)
        self.sched = Scheduler(runner_config, config)
        self.memo: dict[tuple, list[int]] = {}
        self.runs = 0

    def output(self, arrival: Arrival) -> list[int]:
        params = arrival.params
        key = (arrival.input_ids, params.repetition_penalty)
        cached = self.memo.get(key)
        if cached is None or len(cached) < params.max_new_tokens:
            alone = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=0.0,
                                   repetition_penalty=params.repetition_penalty)
            self.sched.add_request(TokenizedGenerateReq("alone", list(arrival.input_ids), alone))
            outcomes: dict[str, Outcome] = {}
            for out in self.sched.run_until_idle():
                _collect(outcomes, out)
            cached = self.memo[key] = outcomes["alone"].output_ids
            self.runs += 1
        return cached[: params.max_new_tokens]

    def shutdown(self) -> None:
        self.sched.shutdown()


def greedy_errors(result: RoundResult, reference: AloneReference, fraction: float = 1.0,
                  seed: int = 0) -> list[str]:
    """Greedy outputs (a random `fraction` of the requests) equal those run alone;
    an aborted request's partial output is a prefix of it."""
    rng = random.Random(seed)
    errors = []
    for rid, arrival in sorted(result.expected.items()):
        outcome = result.outcomes.get(rid)
        if not arrival.params.is_greedy or outcome is None or rng.random() >= fraction:
            continue
        want = reference.output(arrival)
        got = outcome.output_ids
        if got != want[: len(got)] or (outcome.finish.kind != "abort" and len(got) != len(want)):
            errors.append(f"{rid}: greedy output {got} differs from alone {want}")
    return errors


def check_round(model_path: pathlib.Path | str, workload: Workload, reference: AloneReference | None,
                fraction: float = 1.0) -> RoundResult:
    """Run one round and raise StressFailure on any broken invariant."""
    sched = build_scheduler(model_path, workload.config)
    try:
        result = run_round(sched, workload)
        errors = leak_errors(sched) + outcome_errors(result)
    finally:
        sched.shutdown()
    if reference is not None:
        errors += greedy_errors(result, reference, fraction, workload.seed)
    if errors:
        raise StressFailure(f"{len(errors)} problems: " + "; ".join(errors[:8]))
    return result


# -- command line ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    parser.add_argument("--page-size", type=int, choices=[1, 16], default=None,
                        help="fix the page size (default: drawn per round)")
    parser.add_argument("--requests", type=int, default=60, help="requests per round")
    # Every backend the server accepts on a CPU (triton there needs TRITON_INTERPRET=1).
    parser.add_argument("--attention-backend", default="torch_native", choices=backends_for_device("cpu"),
                        help="kernels of the scheduler under test (the reference always runs torch_native)")
    parser.add_argument("--reference-fraction", type=float, default=1.0,
                        help="share of greedy requests compared with a run alone")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: a tiny model gains nothing from more, and "
                             "spinning threads crawl on a shared machine)")
    args = parser.parse_args(argv)

    from runtime.demo_model import demo_model_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_path = demo_model_path("qwen3", "tiny")
    reference = AloneReference(model_path)
    vocab, context_len = reference.sched.vocab_size, reference.sched.context_len
    deadline = time.monotonic() + args.minutes * 60
    totals = dict(rounds=0, requests=0, aborted=0, retractions=0, evicted=0, steps=0)
    round_index = 0
    while time.monotonic() < deadline:
        seed = args.seed + round_index
        workload = random_workload(seed, vocab, context_len, args.page_size, args.requests,
                                   attention_backend=args.attention_backend)
        started = time.monotonic()
        try:
            result = check_round(model_path, workload, reference, args.reference_fraction)
        except Exception:
            traceback.print_exc()
            print(f"FAILED: round {round_index} seed {seed} ({workload.config.describe()})\n"
                  f"reproduce: python -m benchmark.stress_scheduler --minutes 0.01 --seed {seed}"
                  + (f" --page-size {args.page_size}" if args.page_size else "")
                  + f" --requests {args.requests} --attention-backend {args.attention_backend}", flush=True)
            return 1
        totals["rounds"] += 1
        totals["requests"] += len(result.expected)
        totals["aborted"] += result.aborted
        totals["retractions"] += result.retractions
        totals["evicted"] += result.evicted_tokens
        totals["steps"] += result.steps
        print(f"round {round_index} seed {seed}: {len(result.expected)} requests, {result.aborted} aborted, "
              f"{result.retractions} retractions, {result.evicted_tokens} tokens evicted, "
              f"{result.steps} steps, {time.monotonic() - started:.1f}s ({workload.config.describe()})",
              flush=True)
        round_index += 1
    reference.shutdown()
    print(f"OK: {totals['rounds']} rounds, {totals['requests']} requests, {totals['aborted']} aborted, "
          f"{totals['retractions']} retractions, {totals['evicted']} tokens evicted, {totals['steps']} steps, "
          f"{reference.runs} reference runs, 0 failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
