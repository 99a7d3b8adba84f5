"""The running requests' sampling state (sampling/): rows written when a
request joins, gathered per batch, penalty counts updated on the device, and
the logits processors' output."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layers.sampler import Sampler, apply_penalties
from managers.sampling_params import SamplingParams
from managers.schedule_batch import Req
from sampling.batch_info import build_sampling_info, uses_counts
from sampling.logits_processors import LogitAdjustments, LogitBias, NoRepeatNGram, logits_processors_for
from sampling.planner import SamplingPlanner
from sampling.row_state import SamplingRows
from test_sampler import MIX, OUTPUT, PROMPT

CPU = torch.device("cpu")
V = 10
# The mixed batch test_sampler.py also uses: every parameter, penalties on some rows.


class _Batch:
    """What the planner reads of a ScheduleBatch."""

    def __init__(self, reqs: list[Req], partial: list[bool] | None = None) -> None:
        self.reqs = reqs
        self.partial_chunk = partial or [False] * len(reqs)
        self.draft_lens: list[int] = []  # no guesses (speculative decoding)


def make_reqs(rows: list[int]) -> list[Req]:
    reqs = []
    for i, row in enumerate(rows):
        req = Req(f"r{i}", list(PROMPT[i]), MIX[i])
        req.output_ids = list(OUTPUT[i])
        req.req_pool_idx = row
        reqs.append(req)
    return reqs


def gathered(state: SamplingRows, planner: SamplingPlanner, reqs: list[Req]):
    plan = planner.plan(_Batch(reqs), defer_output_readers=False)
    return plan, state.sample_inputs(plan)


def assert_same_inputs(a, b, logits: torch.Tensor) -> None:
    for name in ("temperatures", "top_ps", "top_ks", "min_ps", "greedy_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("is_all_greedy", "need_top_p", "need_top_k", "need_min_p", "seeds", "output_lens"):
        assert getattr(a, name) == getattr(b, name), name
    assert torch.equal(apply_penalties(logits, a), apply_penalties(logits, b))


@pytest.mark.parametrize("keep", [[4, 1], [0, 2], [3], [0, 1, 2, 3, 4], [2, 0, 4]])
def test_rows_gather_what_a_fresh_build_gives(keep: list[int]) -> None:
    """Requests join at scattered rows; any subset, in any order, samples with
    the same inputs as a batch built from scratch from their histories."""
    state, planner = SamplingRows(8, V, CPU), SamplingPlanner(V)
    reqs = make_reqs([5, 1, 7, 0, 3])
    gathered(state, planner, reqs)  # everyone joins
    picked = [reqs[i] for i in keep]
    plan, info = gathered(state, planner, picked)
    assert plan.joins is None  # nobody joins twice
    want = build_sampling_info([MIX[i] for i in keep], V, CPU, [PROMPT[i] for i in keep], [OUTPUT[i] for i in keep])
    logits = torch.randn(len(keep), V, generator=torch.Generator().manual_seed(sum(keep)))
    assert_same_inputs(info, want, logits)


def test_counts_follow_each_steps_tokens_and_skip_partial_chunks() -> None:
    state, planner = SamplingRows(8, V, CPU), SamplingPlanner(V)
    reqs = make_reqs([2, 6, 0, 4, 1])
    rng = random.Random(0)
    for step in range(6):
        batch = _Batch(reqs, partial=[step == 0 and i == 3 for i in range(len(reqs))])
        plan = planner.plan(batch, defer_output_readers=False)
        state.sample_inputs(plan)
        ids = [rng.randrange(V) for _ in reqs]
        state.record_plan(plan, torch.tensor(ids))
        for req, token, partial in zip(reqs, ids, batch.partial_chunk):
            if not partial:  # what the scheduler keeps
                req.output_ids.append(token)
    _plan, info = gathered(state, planner, reqs)
    want = build_sampling_info(MIX, V, CPU, PROMPT, [r.output_ids for r in reqs])
    # Rows without penalties are never read (their penalty is neutral), so
    # their history is not counted in when they join.
    penalised = [i for i, p in enumerate(MIX) if uses_counts(p)]
    assert penalised == [1, 3, 4]
    assert torch.equal(info.output_token_counts[penalised], want.output_token_counts[penalised])
    assert torch.equal(info.seen_tokens[penalised], want.seen_tokens[penalised])
    logits = torch.randn(len(MIX), V, generator=torch.Generator().manual_seed(5))
    assert torch.equal(apply_penalties(logits, info), apply_penalties(logits, want))


def test_a_row_given_back_and_taken_again_starts_afresh() -> None:
    state, planner = SamplingRows(4, V, CPU), SamplingPlanner(V)
    first = Req("a", [1, 1], SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5))
    first.req_pool_idx, first.output_ids = 2, [3, 3, 3]
    gathered(state, planner, [first])
    planner.leave(first)
    second = Req("b", [7], SamplingParams(presence_penalty=0.5, repetition_penalty=1.2))
    second.req_pool_idx, second.output_ids = 2, [8]
    plan, info = gathered(state, planner, [second])
    assert plan.joins is not None
    want = build_sampling_info([second.sampling_params], V, CPU, [[7]], [[8]])
    assert torch.equal(info.output_token_counts, want.output_token_counts)
    assert torch.equal(info.seen_tokens, want.seen_tokens)
    # And the same request again after leaving (a retraction) joins again too.
    planner.leave(second)
    assert planner.plan(_Batch([second]), defer_output_readers=False).joins is not None


def test_no_penalty_state_until_a_penalised_request_joins() -> None:
    state, planner = SamplingRows(4, V, CPU), SamplingPlanner(V)
    plain = Req("a", [1], SamplingParams(top_p=0.9))
    plain.req_pool_idx = 0
    _plan, info = gathered(state, planner, [plain])
    assert state.output_counts is None and info.output_token_counts is None and info.need_top_p


# ---------------------------------------------------------------- logits processors


def test_logit_bias_bans_at_minus_100_and_adds_otherwise() -> None:
    adj = LogitAdjustments()
    LogitBias({2: -100, 3: 5.0, 4: -1.5}).fill(adj, 1)
    info = build_sampling_info([SamplingParams(temperature=0.0)] * 2, 6, CPU)
    adj.apply_to(info, CPU)
    logits = torch.zeros(2, 6)
    logits[1, 2] = 50.0
    ids = Sampler()(logits, info)
    assert ids[1] == 3  # 2 is banned despite its logit, 3 gets +5
    assert info.banned[1].tolist() == [False, False, True, False, False, False]
    assert info.logit_bias[1].tolist() == [0, 0, 0, 5.0, -1.5, 0] and not info.banned[0].any()


def test_a_row_banning_every_token_still_samples() -> None:
    adj = LogitAdjustments()
    adj.ban(0, range(4))
    info = build_sampling_info([SamplingParams(temperature=1.0, seed=1)], 4, CPU)
    adj.apply_to(info, CPU)
    assert 0 <= int(Sampler()(torch.randn(1, 4), info)[0]) < 4


def _repeated_ngram_bans(seq: list[int], n: int) -> set[int]:
    """Brute force: tokens t such that seq + [t] ends with an n-gram seen before in seq."""
    if len(seq) < n - 1:
        return set()
    tail = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == tail}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 4), min_size=0, max_size=12),
       st.lists(st.integers(0, 4), min_size=1, max_size=12))
def test_no_repeat_ngram_bans_what_brute_force_says(n: int, prompt: list[int], output: list[int]) -> None:
    proc = NoRepeatNGram(n, prompt)
    seq = list(prompt)
    for token in output:
        adj = LogitAdjustments()
        proc.fill(adj, 0)
        assert set(adj.ban_ids) == _repeated_ngram_bans(seq, n)
        proc.accept(token)
        seq.append(token)


def test_processors_come_from_the_sampling_params() -> None:
    assert logits_processors_for(SamplingParams(), [1, 2]) == []
    built = logits_processors_for(SamplingParams(logit_bias={"3": -100}, no_repeat_ngram_size=2), [1, 2])
    assert [type(p) for p in built] == [LogitBias, NoRepeatNGram]


@pytest.mark.parametrize(("bias", "message"), [
    ({"x": 1}, "keys must be token ids"), ({"-1": 1}, "keys must be token ids"),
    ({"1": 101}, r"values must be numbers in \[-100, 100\]"), ({"1": True}, "values must be numbers"),
    ({str(i): 1 for i in range(1025)}, "at most 1024"),
])
def test_bad_logit_bias_is_refused(bias: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias).validate()


def test_a_grammar_bitmask_bans_exactly_the_tokens_whose_bit_is_clear():
    from layers.sampler import apply_allowed_bitmask

    vocab = 70  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(11)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)
    logits = torch.randn(3, vocab, generator=gen)
    out = logits.clone()
    apply_allowed_bitmask(out, bitmask)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            assert (out[row, token] == float("-inf")) != bool(allowed)
            if allowed:
                assert out[row, token] == logits[row, token]
