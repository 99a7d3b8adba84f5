"""Logits processors and penalties through the scheduler, with overlap on:
a per-request banned token set (logit_bias -100) honoured in mixed batches,
transformers' no_repeat_ngram_size and repetition_penalty reproduced token
for token, and overlap planning ahead while they run."""

from __future__ import annotations

import torch

from managers.io_struct import TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from model_executor.forward_batch import ForwardMode
from model_helpers import hf_greedy, hf_model, make_prompts
from scheduler_helpers import Outcome, assert_no_leak, collect, greedy, make_scheduler, run

VOCAB = 4000


def run_staggered(sched, requests, arrive_every: int = 3):
    """Requests arrive a few steps apart, so later prefills meet earlier
    decodes (MIXED batches). Returns outcomes and whether a batch was planned
    while another was in flight with a processor or penalty in it."""
    outcomes: dict[str, Outcome] = {}
    modes, ahead = set(), False
    pending = list(requests)
    while pending or not sched.is_idle():
        if pending:
            rid, ids, params = pending.pop(0)
            sched.add_request(TokenizedGenerateReq(rid, ids, params))
        for _ in range(arrive_every if pending else 1):
            collect(outcomes, sched.step())
            if sched.inflight is not None:
                modes.add(sched.inflight.batch.forward_mode)
                ahead |= any(_adjusted(r.sampling_params) for r in sched.running)
    collect(outcomes, sched.step())
    return outcomes, modes, ahead


def _adjusted(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.no_repeat_ngram_size or p.repetition_penalty != 1)


def test_banned_tokens_are_never_sampled_in_mixed_batches_with_overlap(tiny_qwen3):
    prompts = make_prompts([9, 40, 14, 25, 6, 33], VOCAB, seed=81)
    plain = [(f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)]
    reference = {rid: o.output_ids for rid, o in run(make_scheduler(tiny_qwen3, radix=False), plain).items()}
    # Requests 0, 2, 4 ban what they would have said first (and a bit more).
    bans = {f"r{i}": set(reference[f"r{i}"][:4]) for i in (0, 2, 4)}
    requests = [
        (rid, ids, greedy(12, logit_bias={str(t): -100 for t in bans[rid]}) if rid in bans else params)
        for rid, ids, params in plain
    ]
    results = []
    for overlap in (True, False):
        sched = make_scheduler(tiny_qwen3, overlap=overlap, chunk=16, mixed=True)
        outcomes, modes, ahead = run_staggered(sched, requests)
        assert_no_leak(sched)
        sched.shutdown()
        results.append({rid: o.output_ids for rid, o in outcomes.items()})
        if overlap:
            assert ForwardMode.MIXED in modes and ahead
    with_overlap, without = results
    assert with_overlap == without
    for rid, out in with_overlap.items():
        assert len(out) == 12
        if rid in bans:
            assert not bans[rid] & set(out), rid
            assert out != reference[rid]
        else:
            assert out == reference[rid], rid  # neighbours' bans do not leak into other rows


def test_logit_bias_pulls_a_token_in(tiny_qwen3):
    prompt = make_prompts([10], VOCAB, seed=82)[0]
    sched = make_scheduler(tiny_qwen3, overlap=True)
    out = run(sched, [("up", prompt, greedy(6, logit_bias={"77": 100}))])["up"].output_ids
    assert out == [77] * 6
    assert_no_leak(sched)
    sched.shutdown()


def _hf_reference(path, prompts, new_tokens, **options):
    model = hf_model(path, torch.float32)
    return [hf_greedy(model, p, new_tokens, **options) for p in prompts]


def test_no_repeat_ngram_matches_transformers_with_overlap(tiny_qwen3):
    """The processor that reads the output: filled after the previous step's
    token is accepted, while the next forward already runs."""
    prompts = make_prompts([8, 30, 15, 22], VOCAB, seed=83)
    # A short prompt made of one repeated pair: greedy wants to repeat it.
    prompts.append([501, 502] * 6)
    want = _hf_reference(tiny_qwen3, prompts, 16, no_repeat_ngram_size=2)
    sched = make_scheduler(tiny_qwen3, overlap=True, chunk=16)
    requests = [(f"r{i}", p, greedy(16, no_repeat_ngram_size=2)) for i, p in enumerate(prompts)]
    outcomes, _modes, ahead = run_staggered(sched, requests, arrive_every=2)
    assert [outcomes[f"r{i}"].output_ids for i in range(len(prompts))] == want
    assert ahead
    assert_no_leak(sched)
    sched.shutdown()
    # It did ban something: plain greedy differs somewhere.
    plain = _hf_reference(tiny_qwen3, prompts, 16)
    assert plain != want


def test_repetition_penalty_matches_transformers_with_overlap(tiny_qwen3):
    prompts = make_prompts([8, 30, 15], VOCAB, seed=84) + [[600, 601] * 5]
    want = _hf_reference(tiny_qwen3, prompts, 14, repetition_penalty=1.6)
    sched = make_scheduler(tiny_qwen3, overlap=True, chunk=16)
    requests = [(f"r{i}", p, greedy(14, repetition_penalty=1.6)) for i, p in enumerate(prompts)]
    outcomes, _modes, ahead = run_staggered(sched, requests, arrive_every=2)
    assert [outcomes[f"r{i}"].output_ids for i in range(len(prompts))] == want
    assert ahead  # overlap stays on with penalties
    assert_no_leak(sched)
    sched.shutdown()


def test_penalised_request_retracted_and_readmitted_keeps_its_counts(tiny_qwen3):
    """A retraction frees the row; re-admission rebuilds the counts from the
    history, so the output equals the run that was never retracted."""
    prompts = make_prompts([30, 31, 32, 33], VOCAB, seed=85)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, frequency_penalty=1.5, repetition_penalty=1.3)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    roomy = make_scheduler(tiny_qwen3, overlap=True)
    want = {rid: o.output_ids for rid, o in run(roomy, requests).items()}
    roomy.shutdown()
    tight = make_scheduler(tiny_qwen3, overlap=True, max_total_tokens=200)
    got = {rid: o.output_ids for rid, o in run(tight, requests).items()}
    assert tight.num_retractions > 0
    assert got == want
    assert_no_leak(tight)
    tight.shutdown()
