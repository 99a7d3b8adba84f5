"""Scheduler: batching, chunking, overlap, paging, prefix sharing, retraction, aborts."""

from __future__ import annotations

import pytest
import torch

from managers.io_struct import AbortReq, TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from model_helpers import make_prompts
from scheduler_helpers import Outcome, assert_no_leak, collect, greedy, make_scheduler, run

VOCAB = 4000


def mixed_workload(n: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (n,), generator=gen).tolist()
    new = torch.randint(1, 20, (n,), generator=gen).tolist()
    prompts = make_prompts(lengths, VOCAB, seed=seed)
    return [(f"r{i}", p, greedy(m)) for i, (p, m) in enumerate(zip(prompts, new))]


@pytest.fixture(scope="module")
def one_at_a_time(tiny_qwen3):
    """Reference: every request alone, plain loop, no cache."""
    sched = make_scheduler(tiny_qwen3, radix=False)
    ref = {}
    for rid, ids, params in mixed_workload():
        ref.update(run(sched, [(rid, ids, params)]))
    assert_no_leak(sched)
    sched.shutdown()
    return {rid: o.output_ids for rid, o in ref.items()}


def _outputs(outcomes):
    return {rid: o.output_ids for rid, o in outcomes.items()}


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(overlap=True),
        dict(chunk=16),
        dict(chunk=16, overlap=True),
        dict(page_size=16),
        dict(page_size=16, chunk=32, overlap=True),
        dict(radix=False, overlap=True),
        dict(policy="fcfs"),
        dict(policy="dfs-weight", overlap=True),
        dict(mixed=False),
        dict(mixed=False, chunk=16, overlap=True),
        dict(mixed=False, page_size=16, chunk=32),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain",
)
def test_continuous_batching_matches_one_at_a_time(tiny_qwen3, one_at_a_time, options):
    sched = make_scheduler(tiny_qwen3, **options)
    outcomes = run(sched, mixed_workload())
    assert _outputs(outcomes) == one_at_a_time
    assert all(o.finish.kind == "length" for o in outcomes.values())
    assert_no_leak(sched)
    sched.shutdown()


def test_requests_arriving_while_others_decode(tiny_qwen3, one_at_a_time):
    """Joins mid-flight; decodes advance every iteration even as prompts keep coming."""
    sched = make_scheduler(tiny_qwen3, chunk=16, overlap=True)
    workload = mixed_workload()
    outcomes: dict[str, Outcome] = {}
    progress = []
    for rid, ids, params in workload:
        sched.add_request(TokenizedGenerateReq(rid, ids, params))
        collect(outcomes, sched.step())
        progress.append(sum(len(o.output_ids) for o in outcomes.values()))
    for out in sched.run_until_idle():
        collect(outcomes, out)
    assert _outputs(outcomes) == one_at_a_time
    # Once something decodes, every iteration yields tokens although a new
    # prompt arrives each time (the MIXED-batch rule).
    started = next(i for i, p in enumerate(progress) if p > 0)
    assert all(b > a for a, b in zip(progress[started + 2 :], progress[started + 3 :]))
    assert_no_leak(sched)
    sched.shutdown()


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill-alone"])
def test_mixed_chunk_decides_whether_decodes_ride_along(tiny_qwen3, mixed):
    """--enable-mixed-chunk: a running decode advances in the step that
    prefills a new prompt; without it the prefill runs alone and the decode
    waits that step. Outputs are the same either way."""
    prompts = make_prompts([20, 30], VOCAB, seed=5)
    sched = make_scheduler(tiny_qwen3, mixed=mixed)
    outcomes: dict[str, Outcome] = {}
    sched.add_request(TokenizedGenerateReq("a", prompts[0], greedy(10)))
    collect(outcomes, sched.step())  # a's prefill (its first token)
    collect(outcomes, sched.step())  # a decodes
    before = len(outcomes["a"].output_ids)
    sched.add_request(TokenizedGenerateReq("b", prompts[1], greedy(4)))
    collect(outcomes, sched.step())  # b's prefill, with or without a
    assert len(outcomes["b"].output_ids) == 1
    assert len(outcomes["a"].output_ids) == before + (1 if mixed else 0)
    for out in sched.run_until_idle():
        collect(outcomes, out)
    assert_no_leak(sched)
    sched.shutdown()
    alone = make_scheduler(tiny_qwen3, radix=False)
    for rid, ids, n in (("a", prompts[0], 10), ("b", prompts[1], 4)):
        assert run(alone, [(rid, ids, greedy(n))])[rid].output_ids == outcomes[rid].output_ids
    alone.shutdown()


def test_shared_prefix_is_cached(tiny_qwen3):
    prefix = make_prompts([200], VOCAB, seed=11)[0]
    suffixes = make_prompts([5, 9, 13, 3], VOCAB, seed=12)
    requests = [(f"s{i}", prefix + s, greedy(6)) for i, s in enumerate(suffixes)]
    results = {}
    for radix in (True, False):
        sched = make_scheduler(tiny_qwen3, radix=radix, overlap=True)
        first = run(sched, requests[:1])
        rest = run(sched, requests[1:])
        results[radix] = {**first, **rest}
        assert_no_leak(sched)
        sched.shutdown()
    assert _outputs(results[True]) == _outputs(results[False])
    sched = make_scheduler(tiny_qwen3)
    run(sched, requests[:2])
    stats = sched.stats()
    assert stats["cache_hit_rate"] > 0.4  # the second request reused ~200 of ~410 prompt tokens
    assert stats["cache_evictable_tokens"] > 200 and stats["cache_protected_tokens"] == 0
    assert stats["running_requests"] == 0 and stats["kv_used_tokens"] == stats["cache_evictable_tokens"]
    assert_no_leak(sched)
    sched.shutdown()
    assert results[True]["s0"].cached_tokens == 0
    assert all(results[True][f"s{i}"].cached_tokens >= 190 for i in (1, 2, 3))
    assert all(o.cached_tokens == 0 for o in results[False].values())


def test_retraction_under_memory_pressure(tiny_qwen3):
    prompts = make_prompts([60 + i for i in range(16)], VOCAB, seed=21)
    requests = [(f"m{i}", p, greedy(40)) for i, p in enumerate(prompts)]
    ample = make_scheduler(tiny_qwen3)
    expected = _outputs(run(ample, requests))
    ample.shutdown()
    for overlap in (False, True):
        # Room for about four of these ~100-token requests at once.
        tight = make_scheduler(tiny_qwen3, max_total_tokens=420, overlap=overlap)
        assert _outputs(run(tight, requests)) == expected
        assert tight.num_retractions > 0
        assert_no_leak(tight)
        tight.shutdown()


def test_too_large_requests_are_rejected_with_reason(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3, max_total_tokens=256)
    outcomes = run(sched, [
        ("big", make_prompts([200], VOCAB)[0], greedy(100)),
        ("empty", [], greedy(4)),
        ("ok", make_prompts([10], VOCAB)[0], greedy(4)),
    ])
    assert outcomes["big"].finish.kind == "abort" and "exceeds" in outcomes["big"].finish.message
    assert outcomes["empty"].finish.kind == "abort" and "empty" in outcomes["empty"].finish.message
    assert outcomes["ok"].finish.kind == "length" and len(outcomes["ok"].output_ids) == 4
    assert_no_leak(sched)
    sched.shutdown()


def test_out_of_vocabulary_ids_are_refused_not_run(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3)
    vocab = sched.vocab_size
    outcomes = run(sched, [
        ("too-big", [1, 2, vocab], greedy(4)),
        ("negative", [5, -1], greedy(4)),
        ("ok", [1, 2, vocab - 1], greedy(4)),
    ])
    for rid, bad in (("too-big", vocab), ("negative", -1)):
        finish = outcomes[rid].finish
        assert finish.kind == "abort" and finish.status_code == 400
        assert f"token id {bad} is outside the vocabulary [0, {vocab})" in finish.message
    assert outcomes["ok"].finish.kind == "length" and len(outcomes["ok"].output_ids) == 4
    assert_no_leak(sched)
    sched.shutdown()


def test_queue_bound_refuses_whole_requests_with_503(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3, max_queued=3)
    prompts = make_prompts([6] * 4, VOCAB, seed=5)
    sched.add_request(TokenizedGenerateReq("a", prompts[0], greedy(3)))
    sched.add_request(TokenizedGenerateReq("b", prompts[1], greedy(3)))
    # Two of three places taken: an n = 3 request is admitted whole, never in part.
    sched.add_request(TokenizedGenerateReq("multi", prompts[2], SamplingParams(max_new_tokens=3, n=3, seed=1)))
    sched.add_request(TokenizedGenerateReq("late", prompts[3], greedy(3)))
    outcomes: dict[str, Outcome] = {}
    for out in sched.run_until_idle():
        collect(outcomes, out)
    assert all(outcomes[f"multi-{i}"].finish.kind == "length" for i in range(3))
    late = outcomes["late"].finish
    assert late.kind == "abort" and late.status_code == 503 and "queue is full" in late.message
    # Once the queue drains, the same request is served.
    assert run(sched, [("again", prompts[3], greedy(3))])["again"].finish.kind == "length"
    assert_no_leak(sched)
    sched.shutdown()


def test_many_parallel_sample_requests_leave_nothing_behind(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3)
    prompts = make_prompts([5] * 20, VOCAB, seed=9)
    for i, prompt in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"m{i}", prompt, SamplingParams(max_new_tokens=2, n=2, seed=i)))
        if i % 3 == 0:
            sched.abort_request(AbortReq(f"m{i}-1"))
    sched.run_until_idle()
    assert_no_leak(sched)  # checks the request table is empty too
    sched.shutdown()


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_in_every_state_frees_everything(tiny_qwen3, overlap):
    sched = make_scheduler(tiny_qwen3, chunk=16, overlap=overlap, max_running=2)
    prompts = make_prompts([8, 100, 8, 8], VOCAB, seed=31)
    sched.add_request(TokenizedGenerateReq("decoding", prompts[0], greedy(200)))
    sched.add_request(TokenizedGenerateReq("chunked", prompts[1], greedy(5)))
    sched.add_request(TokenizedGenerateReq("waiting", prompts[2], greedy(5)))
    outcomes: dict[str, Outcome] = {}
    for _ in range(3):
        collect(outcomes, sched.step())
    assert sched.chunked_req is not None and sched.chunked_req.rid == "chunked"
    assert any(r.rid == "decoding" for r in sched.running)
    assert any(r.rid == "waiting" for r in sched.waiting)
    for rid in ("decoding", "chunked", "waiting", "unknown"):
        sched.abort_request(AbortReq(rid))
    for out in sched.run_until_idle():
        collect(outcomes, out)
    for rid in ("decoding", "chunked", "waiting"):
        assert outcomes[rid].finish.kind == "abort", rid
    assert len(outcomes["decoding"].output_ids) < 200
    assert_no_leak(sched)
    sched.shutdown()


def test_lpm_admits_longest_cached_prefix_first(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3, policy="lpm", max_running=1)
    base = make_prompts([64], VOCAB, seed=41)[0]
    run(sched, [("warm", base + [5, 6], greedy(1))])
    other = make_prompts([40], VOCAB, seed=42)[0]
    for rid, ids in (("cold", other), ("short", base[:16] + [7, 8]), ("long", base[:60] + [9])):
        sched.add_request(TokenizedGenerateReq(rid, ids, greedy(1)))
    order = []
    for out in sched.run_until_idle():
        order.extend(rid for rid, fin in zip(out.rids, out.finished_reasons) if fin is not None)
    assert order == ["long", "short", "cold"]
    assert_no_leak(sched)
    sched.shutdown()


def test_overlap_matches_plain_for_sampled_and_penalised_requests(tiny_qwen3):
    prompts = make_prompts([7, 30, 12, 50, 9, 21], VOCAB, seed=61)
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.8, seed=5),
        SamplingParams(max_new_tokens=9, temperature=1.2, top_k=20, seed=6),
        SamplingParams(max_new_tokens=15, temperature=0.0, repetition_penalty=1.4),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8, frequency_penalty=0.5, seed=7),
        SamplingParams(max_new_tokens=8, temperature=0.0, presence_penalty=1.0),
        SamplingParams(max_new_tokens=11, temperature=1.0, min_p=0.1, seed=8),
    ]
    requests = [(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    results = []
    for overlap in (False, True):
        sched = make_scheduler(tiny_qwen3, overlap=overlap, chunk=16)
        results.append(_outputs(run(sched, requests)))
        assert_no_leak(sched)
        sched.shutdown()
    assert results[0] == results[1]


def test_parallel_samples_share_the_prompt(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3, overlap=True)
    prompt = make_prompts([120], VOCAB, seed=71)[0]
    outcomes = run(sched, [("multi", prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=4))])
    assert sorted(outcomes) == [f"multi-{i}" for i in range(4)]  # the shared prefill is not reported
    assert all(o.cached_tokens >= 119 for o in outcomes.values())
    assert len({tuple(o.output_ids) for o in outcomes.values()}) > 1  # different seeds, different samples
    assert_no_leak(sched)
    sched.shutdown()


def test_iteration_timings_are_reported(tiny_qwen3):
    sched = make_scheduler(tiny_qwen3, overlap=True)
    run(sched, mixed_workload(8))
    stats = sched.stats()
    assert stats["iterations"] > 0
    assert all(stats[f"{p}_ms_per_iter"] > 0 for p in ("schedule", "prepare", "forward", "process"))
    assert 0 < stats["overhead_fraction"] < 1
    assert_no_leak(sched)
    sched.shutdown()
