from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layers.sampler import Sampler, SamplingBatchInfo, apply_penalties
from managers.sampling_params import SamplingParams
from sampling.batch_info import build_sampling_info, record_tokens

CPU = torch.device("cpu")
FAST = settings(max_examples=40, deadline=None)


def build(
    params: list[SamplingParams],
    vocab: int,
    prompt: list[list[int]] | None = None,
    output: list[list[int]] | None = None,
) -> SamplingBatchInfo:
    return build_sampling_info(params, vocab, CPU, prompt_ids=prompt, output_ids=output)


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> torch.Tensor:
    return Sampler()(logits, build(params, logits.shape[-1], **kw))


def logits_from_probs(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().expand(rows, -1).contiguous()


# --------------------------------------------------------------------------- greedy


@FAST
@given(
    b=st.integers(1, 6),
    v=st.integers(2, 300),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(["temp0", "topk1", "temp07_topk1"]),
)
def test_greedy_rows_equal_argmax(b: int, v: int, seed: int, mode: str) -> None:
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 5
    p = {
        "temp0": SamplingParams(temperature=0.0),
        "topk1": SamplingParams(top_k=1),
        "temp07_topk1": SamplingParams(temperature=0.7, top_k=1),
    }[mode]
    info = build([p] * b, v)
    assert info.is_all_greedy and info.frequency_penalties is None
    out = Sampler()(logits, info)
    assert out.dtype == torch.int64 and out.shape == (b,)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_rows_in_mixed_batch_equal_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=1)] * 2
    info = build(params, 50)
    assert not info.is_all_greedy
    out = Sampler()(logits, info)
    for row in (0, 2, 3, 5):
        assert out[row] == logits[row].argmax()


# ------------------------------------------------------------------------ penalties


def expected_penalised(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt: list[list[int]],
    output: list[list[int]],
) -> torch.Tensor:
    """The documented semantics, element by element in float32 arithmetic."""
    f32 = np.float32
    result = logits.clone()
    for i, p in enumerate(params):
        rp, fp, pp = f32(p.repetition_penalty), f32(p.frequency_penalty), f32(p.presence_penalty)
        for t in range(logits.shape[1]):
            x = f32(logits[i, t].item())
            if p.repetition_penalty != 1.0 and (t in prompt[i] or t in output[i]):
                x = x / rp if x > 0 else x * rp
            count = output[i].count(t)
            x = f32(x - f32(fp * f32(count)))
            x = f32(x - f32(pp * f32(count > 0)))
            result[i, t] = float(x)
    return result


penalty_values = st.sampled_from([-2.0, -0.7, 0.0, 0.0, 0.3, 1.1, 2.0])


@FAST
@given(data=st.data(), b=st.integers(1, 4), v=st.integers(1, 9))
def test_penalties_exact(data: st.DataObject, b: int, v: int) -> None:
    ids = st.lists(st.integers(0, v - 1), max_size=6)
    prompt = [data.draw(ids) for _ in range(b)]
    output = [data.draw(ids) for _ in range(b)]
    params = [
        SamplingParams(
            repetition_penalty=data.draw(st.sampled_from([1.0, 1.0, 0.5, 1.3, 2.0])),
            frequency_penalty=data.draw(penalty_values),
            presence_penalty=data.draw(penalty_values),
        )
        for _ in range(b)
    ]
    values = st.sampled_from([0.0, -0.0, 1.5, -1.5, 3.3, -7.1, 0.123456789])
    logits = torch.tensor([[data.draw(values) for _ in range(v)] for _ in range(b)])
    before = logits.clone()
    got = apply_penalties(logits, build(params, v, prompt, output))
    assert torch.equal(logits, before), "input must be untouched"
    assert got.dtype == torch.float32
    want = expected_penalised(logits, params, prompt, output)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_repetition_uses_prompt_frequency_presence_only_generated() -> None:
    logits = torch.tensor([[2.0, 2.0, 2.0, -2.0, 2.0]])
    only_rp = build([SamplingParams(repetition_penalty=2.0)], 5, [[0, 3]], [[1]])
    assert apply_penalties(logits, only_rp).tolist() == [[1.0, 1.0, 2.0, -4.0, 2.0]]
    fp_pp_params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    fp_pp = build([fp_pp_params], 5, [[0, 3]], [[1, 1, 2]])
    # Prompt tokens 0 and 3 are not penalised; 1 was generated twice, 2 once.
    assert apply_penalties(logits, fp_pp).tolist() == [[2.0, 0.75, 1.25, -2.0, 2.0]]


def test_update_bookkeeping() -> None:
    params = [
        SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5),
        SamplingParams(presence_penalty=0.5),
    ]
    info = build(params, 6, prompt=[[5], [0]], output=[[1], []])
    assert info.output_lens == [1, 0]
    record_tokens(info, torch.tensor([1, 3]))
    record_tokens(info, torch.tensor([2, 3]))
    assert info.output_lens == [3, 2]
    assert info.output_token_counts is not None and info.seen_tokens is not None
    assert info.output_token_counts.tolist() == [[0, 2, 1, 0, 0, 0], [0, 0, 0, 2, 0, 0]]
    assert info.seen_tokens.tolist() == [
        [False, True, True, False, False, True],
        [True, False, False, True, False, False],
    ]


def test_no_penalty_state_on_fast_path() -> None:
    info = build([SamplingParams(), SamplingParams(top_p=0.9)], 10, [[1], []], [[2], [3]])
    assert info.frequency_penalties is None and info.presence_penalties is None
    assert info.repetition_penalties is None
    assert info.output_token_counts is None and info.seen_tokens is None
    assert info.need_top_p and not info.need_top_k and not info.need_min_p
    record_tokens(info, torch.tensor([3, 4]))  # must not fail without state
    assert info.output_lens == [2, 2]
    with pytest.raises(ValueError, match="output_ids"):
        build([SamplingParams()], 10, None, [[1], [2]])


# -------------------------------------------------------------------------- seeds


def run_steps(logits: torch.Tensor, info: SamplingBatchInfo, steps: int) -> torch.Tensor:
    out = []
    for _ in range(steps):
        ids = Sampler()(logits, info)
        record_tokens(info, ids)
        out.append(ids)
    return torch.stack(out, dim=1)


def test_same_seed_reproduces_regardless_of_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 40, generator=gen)
    target = SamplingParams(temperature=0.9, top_k=20, seed=42)
    alone = run_steps(row, build([target], 40), 30)[0]

    others = torch.randn(3, 40, generator=gen)
    logits = torch.cat([others[:2], row, others[2:]])
    params = [
        SamplingParams(),
        SamplingParams(seed=7, top_p=0.5),
        target,
        SamplingParams(temperature=0.0),
    ]
    torch.manual_seed(99)  # unseeded rows use different default-generator draws
    in_batch = run_steps(logits, build(params, 40), 30)[2]
    assert torch.equal(alone, in_batch)
    assert len(set(alone.tolist())) > 5  # it really samples


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 100)
    seqs = {
        tuple(run_steps(logits, build([SamplingParams(seed=s)], 100), 40)[0].tolist())
        for s in range(5)
    }
    assert len(seqs) == 5


# ------------------------------------------------------------------------ filters

BASE_PROBS = [0.5, 0.3, 0.15, 0.05]


def support(probs: list[float], p: SamplingParams, rows: int = 4000) -> set[int]:
    torch.manual_seed(0)
    return set(sample(logits_from_probs(probs, rows), [p] * rows).tolist())


def test_top_k_restricts_to_top_k() -> None:
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).expand(4000, -1)
    torch.manual_seed(0)
    got = set(sample(logits, [SamplingParams(top_k=3, temperature=2.0)] * 4000).tolist())
    assert got == set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.05, {0}), (0.5, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_nucleus(top_p: float, kept: set[int]) -> None:
    assert support(BASE_PROBS, SamplingParams(top_p=top_p)) == kept


def test_top_p_that_underflows_float32_keeps_the_top_token() -> None:
    # 1e-46 is 0 in float32; the most likely token (not token 0) must survive.
    assert support([0.1, 0.6, 0.2, 0.1], SamplingParams(top_p=1e-46)) == {1}


@pytest.mark.parametrize("temperature", [1e-38, 1e-6])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature)
    assert params.temperature == 0.0 and params.is_greedy
    assert support([0.1, 0.6, 0.2, 0.1], params) == {1}
    assert SamplingParams(temperature=1e-4).temperature == 1e-4  # small but real: still sampled


def test_top_p_applies_to_top_k_renormalised() -> None:
    # After top_k=2 the distribution is [4/7, 3/7]; top_p=0.5 keeps only the first.
    assert support([0.4, 0.3, 0.2, 0.1], SamplingParams(top_k=2, top_p=0.5)) == {0}
    assert support([0.4, 0.3, 0.2, 0.1], SamplingParams(top_k=3, top_p=0.6)) == {0, 1}


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.35, {0, 1}), (1.0, {0})]
)
def test_min_p_drops_low_prob(min_p: float, kept: set[int]) -> None:
    assert support(BASE_PROBS, SamplingParams(min_p=min_p)) == kept


def test_mixed_params_each_row_as_if_alone() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 30, generator=gen) * 2
    prompt = [[1, 2], [3], [4, 5, 6], [7], [8]]
    output = [[], [9], [10, 10], [], [1]]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=2),
        SamplingParams(seed=11, temperature=0.8),
        SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.6),
        SamplingParams(seed=12, top_p=0.6, min_p=0.1, presence_penalty=1.5),
    ]
    batch = run_steps(logits, build(params, 30, prompt, output), 20)
    for i, p in enumerate(params):
        if i == 1:  # unseeded: check the support only
            assert set(batch[i].tolist()) <= set(logits[i].topk(2).indices.tolist())
            continue
        alone = run_steps(logits[i : i + 1], build([p], 30, [prompt[i]], [output[i]]), 20)[0]
        assert torch.equal(batch[i], alone), f"row {i}"


# ------------------------------------------------------------------- distribution


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_distribution_matches_softmax(seeded: bool) -> None:
    v, n, temp = 8, 20000 if not seeded else 6000, 0.8
    logits = torch.randn(1, v, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits[0] / temp, -1)
    seeds = range(n) if seeded else [None] * n
    torch.manual_seed(1234)
    params = [SamplingParams(temperature=temp, seed=s) for s in seeds]
    samples = sample(logits.expand(n, -1), params)
    # df = 7; 30 is far in the tail (p ~ 1e-4), yet a wrong temperature blows past it.
    assert chi_square(samples, probs) < 30
    assert chi_square(samples, torch.softmax(logits[0], -1)) > 30


# ---------------------------------------------------------------------- bf16 etc.


def test_bf16_logits() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 4)
    assert torch.equal(greedy, logits.float().argmax(-1))
    params = [SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.8), SamplingParams(min_p=0.2),
              SamplingParams(temperature=0.0, repetition_penalty=1.2)]  # fmt: skip
    info = build(params, 100, [[1, 2]] * 4, [[3]] * 4)
    out = Sampler()(logits, info)
    assert out.dtype == torch.int64 and ((0 <= out) & (out < 100)).all()
    assert out[3] == apply_penalties(logits.float(), info)[3].argmax()
    seeded_f32 = Sampler()(logits.float()[:1], build(params[:1], 100, [[1, 2]], [[3]]))
    assert out[0] == seeded_f32[0]


# ------------------------------------------------------------------- mixed batch

MIX = [
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=3, frequency_penalty=0.5),
    SamplingParams(top_p=0.7, seed=4),
    SamplingParams(min_p=0.1, repetition_penalty=1.4),
    SamplingParams(presence_penalty=-1.0, temperature=0.5),
]
PROMPT = [[0], [1, 2], [3], [4, 4], [5]]
OUTPUT = [[6], [], [7, 7], [8], [9, 1]]


# -------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.1}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"n": 0}, "n"),
    ],
)
def test_validate_rejects(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**kwargs).validate()


def test_validate_accepts_and_normalises() -> None:
    p = SamplingParams(
        top_k=0, temperature=0.0, max_new_tokens=0, min_p=1.0, repetition_penalty=2.0
    )
    p.validate()
    assert p.top_k == -1 and p.is_greedy
    assert SamplingParams(top_k=1).is_greedy and not SamplingParams().is_greedy


# --------------------------------------------------------------------------- cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_semantics() -> None:
    cuda = torch.device("cuda")
    logits = torch.randn(len(MIX), 10, generator=torch.Generator().manual_seed(4))
    on_cpu = build(MIX, 10, PROMPT, OUTPUT)
    on_gpu = build_sampling_info(MIX, 10, cuda, PROMPT, OUTPUT)
    torch.testing.assert_close(
        apply_penalties(logits.to(cuda, torch.bfloat16), on_gpu).cpu(),
        apply_penalties(logits.to(torch.bfloat16), on_cpu),
    )
    out = Sampler()(logits.to(cuda), on_gpu)
    assert out.device.type == "cuda" and out[0] == logits[0].argmax()
    target = SamplingParams(seed=9, top_k=5)
    alone = Sampler()(logits[2:3].to(cuda), build_sampling_info([target], 10, cuda))
    pair = build_sampling_info([SamplingParams(), target], 10, cuda)
    assert alone[0] == Sampler()(logits[1:3].to(cuda), pair)[1]
