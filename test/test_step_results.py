"""Step results with several tokens for one request: a decoding request
feeds guesses at its next tokens (a DraftProposer), the model verifies them
in the same forward, the step returns the accepted run plus one, and the KV
of rejected guesses goes back at once. Outputs equal the plain run's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from managers.io_struct import TokenizedGenerateReq
from managers.sampling_params import SamplingParams
from managers.step_result import StepResult
from sampling.verify import accept_drafts
from model_helpers import make_prompts
from scheduler_helpers import Outcome, assert_no_leak, collect, greedy, make_scheduler, run

VOCAB = 4000


class ReplayDrafter:
    """Guesses from a known continuation (a plain run's output); every
    `wrong_every`-th proposal has its last guess wrong, so some are rejected."""

    def __init__(self, continuations: dict[str, list[int]], k: int, wrong_every: int = 0) -> None:
        self.continuations, self.k, self.wrong_every = continuations, k, wrong_every
        self.proposals = 0

    def propose(self, req, max_tokens: int) -> list[int]:
        done = len(req.output_ids)
        guesses = list(self.continuations.get(req.rid, [])[done : done + min(self.k, max_tokens)])
        self.proposals += 1
        if guesses and self.wrong_every and self.proposals % self.wrong_every == 0:
            guesses[-1] = (guesses[-1] + 1) % VOCAB
        return guesses


def reference(path, requests) -> dict[str, Outcome]:
    sched = make_scheduler(path)
    out = run(sched, requests)
    sched.shutdown()
    return out


def own_slots(sched) -> int:
    """Slots the running requests hold beyond what the prefix cache owns."""
    return sum(r.kv_committed_len - len(r.prefix_indices) for r in sched.running)


def test_a_step_returns_two_tokens_for_one_request_with_exact_kv(tiny_qwen3):
    prompt = make_prompts([11], VOCAB, seed=91)[0]
    requests = [("one", prompt, greedy(9))]
    want = reference(tiny_qwen3, requests)["one"].output_ids
    sched = make_scheduler(tiny_qwen3, drafter=ReplayDrafter({"one": want}, k=1))
    sched.add_request(TokenizedGenerateReq("one", prompt, greedy(9)))
    outcomes: dict[str, Outcome] = {}
    per_step = []
    while not sched.is_idle():
        out = sched.step()
        collect(outcomes, out)
        per_step += [len(ids) for ids in out.new_token_ids]
        for req in sched.running:
            # KV for every token but the newest; the pool holds exactly that.
            assert req.kv_committed_len == len(req.origin_input_ids) + len(req.output_ids) - 1
        used = sched.capacity - sched.allocator.available_size()
        assert used == sched.tree_cache.total_size() + own_slots(sched)
    assert outcomes["one"].output_ids == want
    # Prefill gives 1 token, then each verify step 2 (the guess and the bonus).
    assert per_step == [1, 2, 2, 2, 2]
    assert_no_leak(sched)
    sched.shutdown()


@pytest.mark.parametrize("options", [dict(page_size=1), dict(page_size=16, chunk=16), dict(overlap=True)],
                         ids=["page1", "page16-chunked", "overlap"])
def test_partly_rejected_guesses_leave_outputs_and_kv_exact(tiny_qwen3, options):
    prompts = make_prompts([7, 40, 19, 26], VOCAB, seed=92)
    requests = [(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, [13, 20, 9, 17]))]
    # One asks for logprobs, one stops on a token its run would produce mid-way.
    plain = reference(tiny_qwen3, requests)
    stop_at = plain["r3"].output_ids[6]
    requests[3] = ("r3", prompts[3], greedy(17, stop_token_ids=[stop_at]))
    logprob_req = ("r1", prompts[1], greedy(20))
    want = reference(tiny_qwen3, requests)
    continuations = {rid: o.output_ids for rid, o in plain.items()}
    drafter = ReplayDrafter(continuations, k=3, wrong_every=2)
    sched = make_scheduler(tiny_qwen3, drafter=drafter, **options)
    for rid, ids, params in requests:
        sched.add_request(TokenizedGenerateReq(rid, ids, params, return_logprob=rid == logprob_req[0],
                                               top_logprobs_num=2))
    outcomes: dict[str, Outcome] = {}
    logprobs, lengths = [], set()
    steps = 0
    while not sched.is_idle():
        out = sched.step()
        steps += 1
        collect(outcomes, out)
        for rid, lps in zip(out.rids, out.new_token_logprobs):
            if rid == "r1":
                logprobs += lps
        lengths.update(len(ids) for ids in out.new_token_ids)
        used = sched.capacity - sched.allocator.available_size()
        if options.get("page_size", 1) == 1 and sched.inflight is None:
            assert used == sched.tree_cache.total_size() + own_slots(sched)
    collect(outcomes, sched.step())
    assert {rid: o.output_ids for rid, o in outcomes.items()} == {rid: o.output_ids for rid, o in want.items()}
    assert outcomes["r3"].output_ids[-1] == stop_at and outcomes["r3"].finish.kind == "stop"
    assert len(logprobs) == 20 and [t for _, t in logprobs] == outcomes["r1"].output_ids
    assert steps < sum(len(o.output_ids) for o in want.values())  # several tokens per step
    assert {3, 4} <= lengths  # all 3 guesses held (+1), and the wrong last one was replaced
    # Only accepted tokens, with their right KV, reached the prefix cache:
    # r1's whole sequence comes back as a cache hit and continues as a
    # fresh run of that sequence does.
    page = options.get("page_size", 1)
    sequence = prompts[1] + outcomes["r1"].output_ids
    again = run(sched, [("again", sequence, greedy(4))])["again"]
    assert again.cached_tokens == (len(sequence) - 1) // page * page
    assert again.output_ids == reference(tiny_qwen3, [("again", sequence, greedy(4))])["again"].output_ids
    assert_no_leak(sched)
    sched.shutdown()


def test_logprobs_of_accepted_tokens_equal_the_plain_runs(tiny_qwen3):
    prompt = make_prompts([15], VOCAB, seed=93)[0]
    params = greedy(10)
    plain_sched = make_scheduler(tiny_qwen3)
    plain_sched.add_request(TokenizedGenerateReq("x", prompt, params, return_logprob=True, top_logprobs_num=3))
    plain = {}
    for out in plain_sched.run_until_idle():
        for rid, lps in zip(out.rids, out.new_token_logprobs):
            plain.setdefault(rid, []).extend(lps or [])
    plain_sched.shutdown()
    want_ids = [t for _, t in plain["x"]]
    sched = make_scheduler(tiny_qwen3, drafter=ReplayDrafter({"x": want_ids}, k=4, wrong_every=3))
    sched.add_request(TokenizedGenerateReq("x", prompt, params, return_logprob=True, top_logprobs_num=3))
    got = []
    for out in sched.run_until_idle():
        for rid, lps in zip(out.rids, out.new_token_logprobs):
            got.extend(lps or [])
    assert [t for _, t in got] == want_ids
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in plain["x"]], abs=1e-4)
    assert_no_leak(sched)
    sched.shutdown()


def test_penalised_and_processed_requests_get_no_guesses(tiny_qwen3):
    prompt = make_prompts([9], VOCAB, seed=94)[0]
    asked = []

    class Recording:
        def propose(self, req, max_tokens):
            asked.append(req.rid)
            return [5] * max_tokens

    sched = make_scheduler(tiny_qwen3, drafter=Recording())
    run(sched, [("sampled", prompt, SamplingParams(max_new_tokens=4, temperature=0.9, seed=1)),
                ("penalised", prompt, greedy(4, repetition_penalty=1.2)),
                ("banning", prompt, greedy(4, logit_bias={"5": -100}))])
    # Sampled requests verify by sampling each position (sampling/verify.py);
    # penalties and logits processors would change between positions.
    assert set(asked) == {"sampled"}
    assert_no_leak(sched)
    sched.shutdown()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(0, 2**31))
def test_acceptance_is_the_longest_agreeing_run_plus_one(draft_lens: list[int], seed: int):
    """accept_drafts against a one-row-at-a-time reading of the rule."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 3  # small, so guesses often agree
    extend_lens = [1 + d for d in draft_lens]
    input_ids = torch.randint(0, vocab, (sum(extend_lens),), generator=gen)
    verify_logits = torch.randn(sum(draft_lens), vocab, generator=gen)
    next_ids = torch.randint(0, vocab, (len(draft_lens),), generator=gen)
    tokens, counts, _sources = accept_drafts(verify_logits.argmax(-1), input_ids, extend_lens, draft_lens, next_ids)
    want, start, k = [], 0, 0
    for row, d in enumerate(draft_lens):
        choices = verify_logits[k : k + d].argmax(-1).tolist() + [int(next_ids[row])]
        guesses = input_ids[start + 1 : start + 1 + d].tolist()
        kept = []
        for j, choice in enumerate(choices):
            kept.append(choice)
            if j == d or guesses[j] != choice:
                break
        want.append(kept)
        start, k = start + 1 + d, k + d
    result = StepResult(tokens, counts)
    assert result.rows() == want
    assert result.last_token_ids().tolist() == [w[-1] for w in want]
