"""Drive an in-process Scheduler and collect what it reports; for
speculative decoding, also the same prompts through Engine at tp 1 and 2."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

from managers.io_struct import TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from managers.scheduler import Scheduler
from managers.scheduler_config import SchedulerConfig
from model_executor.model_config import ModelRunnerConfig


@dataclass
class Outcome:
    output_ids: list[int] = field(default_factory=list)
    finish: object = None
    cached_tokens: int = 0
    completion_tokens: int = 0


def make_scheduler(
    path: pathlib.Path | str,
    *,
    overlap: bool = False,
    page_size: int = 1,
    chunk: int | None = None,
    radix: bool = True,
    max_total_tokens: int = 8192,
    max_running: int = 32,
    policy: str = "lpm",
    max_prefill_tokens: int = 16384,
    tokenizer=None,
    eos: frozenset[int] = frozenset(),
    max_queued: int | None = None,
    mixed: bool = True,
    drafter=None,
) -> Scheduler:
    runner_config = ModelRunnerConfig(
        model_path=str(path),
        dtype="float32",
        page_size=page_size,
        max_total_tokens=max_total_tokens,
        max_running_requests=max_running,
    )
    config = SchedulerConfig(
        max_prefill_tokens=max_prefill_tokens,
        chunked_prefill_size=chunk,
        schedule_policy=policy,
        disable_radix_cache=not radix,
        enable_overlap=overlap,
        max_queued_requests=max_queued,
        enable_mixed_chunk=mixed,
    )
    return Scheduler(runner_config, config, tokenizer=tokenizer, eos_token_ids=eos, drafter=drafter)


def collect(outcomes: dict[str, Outcome], out) -> None:
    for rid, new, finish, completion, cached in zip(
        out.rids, out.new_token_ids, out.finished_reasons, out.completion_tokens, out.cached_tokens
    ):
        outcome = outcomes.setdefault(rid, Outcome())
        outcome.output_ids.extend(new)
        outcome.finish = finish
        outcome.cached_tokens = cached
        outcome.completion_tokens = completion


def run(sched: Scheduler, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for rid, ids, params in requests:
        sched.add_request(TokenizedGenerateReq(rid, ids, params))
    for out in sched.run_until_idle():
        collect(outcomes, out)
    return outcomes


def assert_no_leak(sched: Scheduler) -> None:
    assert sched.is_idle()
    # Finished requests are forgotten (hidden n > 1 warm-ups included), so a
    # step's cost does not grow with the number of requests ever served.
    assert not sched.requests and not sched.pending_aborts
    assert sched.flush_cache()
    assert sched.kv.leaks() == []
    assert sched.allocator.available_size() == sched.capacity


def greedy(max_new: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, **kw)


def plain_outputs(path: pathlib.Path | str, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Output ids of `requests` run without speculation (the reference a drafter must match)."""
    sched = make_scheduler(path)
    out = {rid: o.output_ids for rid, o in run(sched, requests).items()}
    sched.shutdown()
    return out


def drafting_workload(prompts: list[list[int]], lengths: list[int], sampled: bool = False):
    """Requests for the speculative-decoding tests: greedy, or sampled with a seed each."""
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, top_k=30, seed=i) if sampled else greedy(n)
              for i, n in enumerate(lengths)]
    return [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]


def speculative_engine_runs(model_path: str, algorithm: str, draft_path: str | None,
                            prompts: list[list[int]]) -> dict[tuple[int, str | None], list[dict]]:
    """Greedy Engine outputs of `prompts`, plain at tp 1 and with `algorithm`
    at tp 1 and 2, keyed (tp_size, algorithm or None)."""
    from runtime.engine import Engine

    params = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    runs = {}
    for tp, spec in ((1, None), (1, algorithm), (2, algorithm)):
        kwargs = dict(speculative_algorithm=spec, speculative_draft_model_path=draft_path) if spec else {}
        engine = Engine(model_path=model_path, dtype="float32", max_total_tokens=4096, tp_size=tp, **kwargs)
        try:
            runs[(tp, spec)] = engine.generate(input_ids=prompts, sampling_params=params)
        finally:
            engine.shutdown()
    return runs
