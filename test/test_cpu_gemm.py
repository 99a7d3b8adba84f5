"""The native streaming bf16 linear against an fp32 reference, and the CPU
linear's choice between it and oneDNN by row count."""

from __future__ import annotations


import pytest
import torch

from layers.cpu_gemm import default_streaming_rows, pack_cpu_linear, prepack_supported
from model_helpers import make_runner
from layers.cpu_features import IsaLevel
from native_helpers import built_native_ops, level_params, requires_native_kernels

pytestmark = requires_native_kernels


@pytest.fixture(scope="module")
def ops():
    """The kernels at this process's level."""
    built = built_native_ops()
    if not built.bf16_gemm_supported():
        pytest.skip("this CPU has no AVX2: the streaming linear does not run")
    return built


@pytest.fixture(scope="module", params=level_params(IsaLevel.AVX2))
def level_ops(request):
    """The kernels at each level that has the streaming linear (AVX2, AVX-512)."""
    return built_native_ops().at(request.param)


def reference(x, weight, bias):
    out = x.float() @ weight.float().T
    return out if bias is None else out + bias.float()


# Outputs not a multiple of 16 (masked tail block), a panel of fewer than 4
# blocks, odd K; rows past one register tile (6: 7, 8 and 32 end in 4+3 or 4+4 tiles) and K past one chunk (256).
@pytest.mark.parametrize("out_features,in_features", [(1, 3), (33, 70), (48, 64), (200, 300), (96, 601)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 13, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_streaming_linear_matches_fp32_reference(level_ops, out_features, in_features, rows, with_bias):
    gen = torch.Generator().manual_seed(out_features * 1000 + rows)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    bias = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    out = level_ops.bf16_linear(x, level_ops.pack_bf16_weight(weight), bias, out_features)
    expected = reference(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    # fp32 accumulation in another order, then one rounding to bf16.
    torch.testing.assert_close(out.float(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())


def test_streaming_linear_refuses_a_mismatched_input(level_ops):
    packed = level_ops.pack_bf16_weight(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="does not fit the packed weight"):
        level_ops.bf16_linear(torch.randn(1, 63).bfloat16(), packed, None, 32)
    with pytest.raises(RuntimeError, match="must be"):
        level_ops.bf16_linear(torch.randn(1, 64), packed, None, 32)


def test_the_portable_level_has_no_streaming_linear():
    generic = built_native_ops().at(IsaLevel.GENERIC)
    assert not generic.bf16_gemm_supported()
    with pytest.raises(RuntimeError, match="needs AVX2 or AVX-512"):
        generic.bf16_linear(torch.randn(1, 64).bfloat16(), generic.pack_bf16_weight(torch.randn(32, 64).bfloat16()),
                            None, 32)


@pytest.mark.parametrize("cpu_level", level_params(IsaLevel.AVX2)[:1], indirect=True)
def test_below_avx512_every_row_count_streams_and_onednn_is_never_asked(cpu_level):
    """An AVX2 CPU: oneDNN's bf16 prepack would refuse there, so the layer
    keeps only the streaming copy and serves every row count from it."""
    weight = torch.randn(80, 96).bfloat16()
    bias = torch.randn(80).bfloat16()
    assert not prepack_supported(torch.device("cpu"), torch.bfloat16)
    packed = pack_cpu_linear(weight, batch_size_hint=16, small_batch_gemv=False)
    assert packed.onednn is None and packed.streaming is not None
    for rows in (1, 3, 7, 64):
        x = torch.randn(rows, 96).bfloat16()
        expected = reference(x, weight, bias)
        torch.testing.assert_close(packed(x, bias).float(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())
    x = torch.randn(2, 5, 96).bfloat16()  # leading dims pass through
    assert torch.equal(packed(x, None), packed(x.reshape(10, 96), None).reshape(2, 5, 80))


@pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16")
def test_cpu_linear_uses_the_streaming_kernel_for_few_rows_only(ops, monkeypatch):
    import layers.cpu_gemm as cpu_gemm

    weight = torch.randn(80, 96).bfloat16()
    packed = pack_cpu_linear(weight, batch_size_hint=16, small_batch_gemv=True)
    assert packed.streaming is not None and packed.streaming_rows == default_streaming_rows()
    limit = packed.streaming_rows
    streamed_rows = []

    class Spy:  # the real kernels, with the streaming linear's calls recorded
        def __getattr__(self, name):
            return getattr(ops, name)

        def bf16_linear(self, x, *args):
            streamed_rows.append(x.shape[0])
            return ops.bf16_linear(x, *args)

    monkeypatch.setattr(cpu_gemm, "native_ops", lambda: Spy())
    for rows in (1, limit, limit + 1, 16):
        x = torch.randn(rows, 96).bfloat16()
        torch.testing.assert_close(packed(x, None).float(), reference(x, weight, None), rtol=1e-2, atol=5e-2)
    assert streamed_rows == [1, limit]
    # A chosen limit (ModelRunnerConfig.cpu_streaming_rows) overrides the CPU's default.
    streamed_rows.clear()
    four = pack_cpu_linear(weight, 16, small_batch_gemv=True, streaming_rows=4)
    for rows in (3, 4, 5):
        four(torch.randn(rows, 96).bfloat16(), None)
    assert streamed_rows == [3, 4]
    assert pack_cpu_linear(weight, 16, small_batch_gemv=False).streaming is None


@pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16")
def test_decode_logits_agree_with_and_without_the_streaming_kernel(ops, tiny_qwen3):
    """A bf16 model decoding one and two sequences: the streaming path's
    logits stay within bf16 noise of oneDNN's."""
    from model_executor.batch_runner import BatchRunner

    logits = []
    for gemv in (True, False):
        runner = make_runner(tiny_qwen3, dtype="bfloat16", attention_backend="cpu", cpu_small_batch_gemv=gemv)
        batch = BatchRunner(runner)
        seqs = [batch.add_sequence() for _ in range(2)]
        batch.extend(seqs, [[5, 9, 11, 40], [7, 3]])
        steps = [batch.extend(seqs, [[17], [23]])[0].next_token_logits.float()]
        steps.append(batch.extend(seqs[:1], [[29]])[0].next_token_logits.float())
        batch.release_all()
        logits.append(steps)
    for ours, theirs in zip(*logits):
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= 0.03 * scale
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
