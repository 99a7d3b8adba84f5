"""Scheduler under KV pressure: a regression test for undone admissions and a
short randomised stress run (the long one: `python -m benchmark.stress_scheduler`)."""

from __future__ import annotations

import pytest
import torch

from benchmark.stress_scheduler import (
    AloneReference,
    build_scheduler,
    greedy_errors,
    kv_ownership_errors,
    outcome_errors,
    random_workload,
    run_round,
)
from managers.io_struct import TokenizedGenerateReq
from model_helpers import make_prompts
from scheduler_helpers import Outcome, assert_no_leak, collect, greedy, make_scheduler, run

VOCAB = 4000


def test_prefill_undone_for_lack_of_kv_keeps_the_whole_prompt(tiny_qwen3):
    """A prompt cut to its first chunk, whose batch then finds too few KV slots
    (its cached prefix was counted as evictable, then locked by the admission
    itself), goes back to the queue with its WHOLE prompt. It used to keep the
    cut one: readmitted, it "finished" its prefill at the cut, sampled from the
    wrong position and decoded past positions that never had KV (alloc_extend:
    "last_locs do not match prefix_lens for a prefix that ends mid-page")."""
    page, chunk = 16, 64
    system = make_prompts([128], VOCAB, seed=81)[0]  # 8 pages, shared
    warm_tail = make_prompts([33], VOCAB, seed=82)[0]  # 2 more cached pages (+1 token left out)
    question = make_prompts([100], VOCAB, seed=83)[0]  # > chunk: cut, and 228 ends mid-page
    prompt = system + question
    alone = make_scheduler(tiny_qwen3)
    expected = run(alone, [("q", prompt, greedy(4))])["q"].output_ids
    alone.shutdown()

    sched = make_scheduler(tiny_qwen3, page_size=page, chunk=chunk, max_total_tokens=1024)
    run(sched, [("warm", system + warm_tail, greedy(1))])  # caches 160 tokens, all evictable
    assert sched.tree_cache.evictable_size() == 160
    # KV held elsewhere (as other requests would): one free page left. Admission
    # budgets free + evictable = 16 + 160 >= 100 + 4, but locking the 128-token
    # match leaves 16 + 32 < the 64 slots of the first chunk.
    held = sched.allocator.alloc(sched.allocator.available_size() - page)
    sched.add_request(TokenizedGenerateReq("q", prompt, greedy(4)))
    outcomes: dict[str, Outcome] = {}
    collect(outcomes, sched.step())
    assert sched.waiting and sched.waiting[0].rid == "q", "the chunk's batch should have been undone"
    waiting = sched.waiting[0]
    assert waiting.fill_ids == prompt and waiting.req_pool_idx is None
    assert kv_ownership_errors(sched, held) == []

    sched.allocator.free(held)
    for out in sched.run_until_idle():
        collect(outcomes, out)
        assert kv_ownership_errors(sched) == []
    assert outcomes["q"].finish.kind == "length"
    assert outcomes["q"].output_ids == expected
    assert outcomes["q"].cached_tokens == 128
    assert_no_leak(sched)
    sched.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model gains nothing from a second thread, and on a busy 2-core
    # machine spinning threads made a round take 5x longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    ref = AloneReference(tiny_qwen3)
    yield ref
    ref.shutdown()


# Rounds of the benchmark's generator (its default size) that together cover
# page sizes 1 and 16, chunked and whole prefills, overlap on and off,
# aborts, retractions, eviction, and admissions undone for lack of KV, of
# chunked prompts too. Before the fixes each of them failed: the issue's
# ValueError (5/16), pages owned twice (15/16, 20/1, 25/1), no progress (14/16).
STRESS_ROUNDS = [(5, 16), (15, 16), (20, 1), (25, 1), (14, 16)]


# The same rounds through the native CPU attention kernel (paged, ragged
# batches), checked against the torch-native reference run alone.
ROUNDS = [(s, p, "torch_native") for s, p in STRESS_ROUNDS] + [(5, 16, "cpu"), (20, 1, "cpu")]


@pytest.mark.parametrize("seed,page_size,backend", ROUNDS, ids=[f"seed{s}-page{p}-{b}" for s, p, b in ROUNDS])
def test_random_workload_keeps_every_invariant(tiny_qwen3, reference, seed, page_size, backend):
    """KV ownership checked after every step; afterwards nothing leaks, every
    request finished once with max_new_tokens tokens unless aborted, and half
    of the greedy outputs equal the same request's run alone."""
    workload = random_workload(
        seed, reference.sched.vocab_size, reference.sched.context_len, page_size, attention_backend=backend
    )
    sched = build_scheduler(tiny_qwen3, workload.config)
    result = run_round(sched, workload, max_steps=3000)  # raises on broken KV ownership
    assert_no_leak(sched)
    sched.shutdown()
    assert outcome_errors(result) == []
    assert greedy_errors(result, reference, fraction=0.5, seed=seed) == []
    assert result.retractions or result.aborted or result.evicted_tokens  # it was under pressure


def test_prefill_that_cannot_get_kv_shrinks_instead_of_retrying_forever(tiny_qwen3):
    """Two waiting requests fit admission's budget (their cached prefixes
    count as evictable), but admitting them locks those prefixes and leaves
    too few slots for both. With nothing running, nothing would ever free
    KV: retrying the same batch each step never made progress. The batch
    must shrink to what fits."""
    page = 16
    prefixes = make_prompts([400, 400], VOCAB, seed=91)
    tails = make_prompts([150, 150], VOCAB, seed=92)
    prompts = [prefix + tail for prefix, tail in zip(prefixes, tails)]
    alone = make_scheduler(tiny_qwen3)
    expected = {f"q{i}": run(alone, [(f"q{i}", p, greedy(3))])[f"q{i}"].output_ids for i, p in enumerate(prompts)}
    alone.shutdown()

    sched = make_scheduler(tiny_qwen3, page_size=page, max_total_tokens=1024)
    run(sched, [(f"warm{i}", prefix + [7], greedy(1)) for i, prefix in enumerate(prefixes)])
    assert sched.tree_cache.evictable_size() == 800 and sched.allocator.available_size() == 224
    for i, prompt in enumerate(prompts):
        sched.add_request(TokenizedGenerateReq(f"q{i}", prompt, greedy(3)))
    outcomes: dict[str, Outcome] = {}
    for out in sched.run_until_idle(max_steps=50):
        collect(outcomes, out)
        assert kv_ownership_errors(sched) == []
    assert {rid: o.output_ids for rid, o in outcomes.items()} == expected
    assert all(o.cached_tokens == 400 for o in outcomes.values())
    assert_no_leak(sched)
    sched.shutdown()
