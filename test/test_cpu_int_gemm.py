"""The native int8 / int4 linear (layers/cpu_kernels/int_gemm.inc, wrapped by
layers/quantization/cpu_int_gemm.py) against an fp32 reference, through both
of its kernels, and its None answer where the native kernels are off.

Tolerances. fp32 x: the FMA kernel sums exact small-integer products in fp32
and scales per group, so it agrees with the dequantized fp32 reference to
1e-4 of the output's magnitude (fp32 summation order only). bf16 x, FMA
kernel: the same sums, rounded to bf16 once, so within one bf16 rounding
(2^-8 relative) of the reference. bf16 x, AMX kernel: the weight is rounded
to bf16 once (as a dequantized checkpoint would be), so on top of that each
product may be off by 2^-8 of itself: within 2^-8 * (|x| @ |w|.T). bf16 x
times int4 at one or two rows: integer dot products on x rounded to int8 in
blocks of 32 (`int8_blocks` does the same rounding here), so against the
reference on those rounded x, the bf16 bound again; and against x itself
within the rounding's worst case, half a step per input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import layers.quantization.cpu_int_gemm as cpu_int_gemm
from layers.quantization.cpu_int_gemm import AMX_MIN_ROWS, CpuIntLinearWeight, pack_cpu_int_linear
from layers.cpu_features import IsaLevel
from native_helpers import built_native_ops, level_params, requires_native_kernels

ROWS = (1, 2, 3, 7, 32, 65)  # one FMA tile and less, two tiles, AMX passes of 32 rows and a tail


@pytest.fixture(scope="module", params=level_params(IsaLevel.AVX2))
def ops(request):
    """The kernels at each level that has them (AVX2, AVX-512, AMX)."""
    return built_native_ops().at(request.param)


@pytest.fixture(autouse=True)
def layers_at_the_level(request, monkeypatch):
    """The packed layer (`CpuIntLinearWeight`) calls the same level's kernels."""
    if "ops" in request.fixturenames:
        ops = request.getfixturevalue("ops")
        monkeypatch.setattr(cpu_int_gemm, "native_ops", lambda: ops)


def canonical(gen, n, k, group, bits, with_offset):
    """A random weight in the canonical form: q, scale, offset."""
    low, high = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=gen) + 0.5) * (0.1 if bits == 4 else 0.01)
    offset = torch.randn(n, k // group, generator=gen) * 0.05 if with_offset else None
    return q, scale, offset


def offset_share(q, offset, group):
    return None if offset is None else offset.repeat_interleave(group, dim=1)


def dequantize(q, scale, offset, group):
    w = q.float() * scale.repeat_interleave(group, dim=1)
    return w if offset is None else w + offset.repeat_interleave(group, dim=1)


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the integer kernel sees it (int8 per block of 32 inputs, scale
    max |x| / 127, round half to even), and half a step per input."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # Tensor by tensor: true divisions, as the kernel's (`127.0 / t` would
    # multiply by a reciprocal, and move a tie by an ulp).
    full_scale = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, full_scale / amax, torch.zeros_like(amax))
    rounded = torch.round(blocks * inv) * (amax / full_scale)
    return rounded.view(x.shape), (amax / full_scale / 2).expand_as(blocks).reshape(x.shape)


def int_dot_runs(ops, bits, group, rows, x) -> bool:
    """Whether int_linear takes the integer kernel (int4 x bf16, 1-2 rows)."""
    return bits == 4 and x.dtype == torch.bfloat16 and rows <= 2 and group % 32 == 0


def check(out, x, w, bias, amx, int_dot=False, w_offset=None):
    """`out` against x.float() @ w.T + bias, within the tolerance above for its
    dtype and kernel. `w_offset`: the offsets' share of w (the integer kernel
    multiplies them with the sums of x itself, not of its rounding)."""
    assert out.dtype == x.dtype
    if not int_dot:
        within(out, x.float(), w, bias, amx)
        return
    rounded, half_step = int8_blocks(x)
    w_offset = torch.zeros_like(w) if w_offset is None else w_offset
    offsets_exact = x.float() @ w_offset.T + (0 if bias is None else bias.float())
    within(out, rounded, w - w_offset, offsets_exact, amx=False)
    expected = x.float() @ w.T + (0 if bias is None else bias.float())
    bound = 2**-8 * expected.abs() + 1e-4 * (x.float().abs() @ w.abs().T) + half_step @ w.abs().T
    assert (out.float() - expected).abs().le(bound).all()


def within(out, x, w, bias, amx):
    """out against fp32 x @ w.T + bias."""
    expected = x @ w.T
    if bias is not None:
        expected = expected + bias.float()
    assert out.shape == expected.shape
    magnitude = x.abs() @ w.abs().T  # sum of |products| per output
    if out.dtype == torch.float32:
        bound = 1e-4 * (expected.abs().max() + magnitude.max())
    else:
        bound = 2**-8 * expected.abs() + 1e-4 * magnitude
        if amx:
            bound = bound + 2**-8 * magnitude
    excess = (out.float() - expected).abs() - bound
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


# N not a multiple of 16 (a masked tail block) nor of 64 (a short panel);
# group sizes 32-128 and per channel (G = K), with and without offsets.
@requires_native_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(72, 128), (200, 384)])
def test_int_linear_matches_fp32_reference(ops, bits, group, with_offset, out_features, in_features):
    group = group or in_features
    gen = torch.Generator().manual_seed(out_features + in_features + group + bits + with_offset)
    q, scale, offset = canonical(gen, out_features, in_features, group, bits, with_offset)
    weight = pack_cpu_int_linear(q, scale, offset, group, bits)
    assert isinstance(weight, CpuIntLinearWeight)
    assert (weight.out_features, weight.in_features, weight.bits) == (out_features, in_features, bits)
    w = dequantize(q, scale, offset, group)
    amx = ops.int_gemm_amx_supported()
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen)
        for bias in (None, torch.randn(out_features, generator=gen)):
            # The layer: fp32 x always on the FMA kernel, bf16 x on AMX from AMX_MIN_ROWS.
            check(weight(x, bias), x, w, bias, amx=False)
            xb, bb = x.bfloat16(), None if bias is None else bias.bfloat16()
            int_dot = int_dot_runs(ops, weight.bits, group, rows, xb)
            w_off = offset_share(q, offset, group)
            check(weight(xb, bb), xb, w, bb, amx=amx and rows >= AMX_MIN_ROWS, int_dot=int_dot, w_offset=w_off)
            # Each kernel at every row count.
            args = (weight.packed, bb, out_features, group, weight.bits, weight.has_offset)
            check(ops.int_linear(xb, *args, 0), xb, w, bb, amx=False, int_dot=int_dot, w_offset=w_off)
            if amx:
                check(ops.int_linear(xb, *args, 1), xb, w, bb, amx=True)


@requires_native_kernels
def test_int4_with_a_group_size_off_the_int4_layout_is_packed_as_int8(ops):
    gen = torch.Generator().manual_seed(7)
    q, scale, offset = canonical(gen, 40, 96, 12, 4, True)
    weight = pack_cpu_int_linear(q, scale, offset, 12, 4)
    assert weight.bits == 8
    x = torch.randn(5, 96, generator=gen)
    check(weight(x, None), x, dequantize(q, scale, offset, 12), None, amx=False)


@requires_native_kernels
def test_packed_weight_is_smaller_and_leading_dims_pass_through(ops):
    gen = torch.Generator().manual_seed(3)
    q, scale, offset = canonical(gen, 256, 512, 128, 4, True)
    int4 = pack_cpu_int_linear(q, scale, offset, 128, 4)
    int8 = pack_cpu_int_linear(q, scale, offset, 128, 8)
    bf16_bytes = 256 * 512 * 2
    assert bf16_bytes / 4 < int4.nbytes < bf16_bytes / 3.5  # 4 bits a weight, plus scales and offsets
    assert bf16_bytes / 2 < int8.nbytes < bf16_bytes / 1.8
    x = torch.randn(2, 3, 512, generator=gen).bfloat16()
    out = int4(x, None)
    assert out.shape == (2, 3, 256)
    assert torch.equal(out, int4(x.reshape(6, 512), None).reshape(2, 3, 256))


@requires_native_kernels
def test_packing_refuses_malformed_weights(ops):
    q = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="does not divide"):
        pack_cpu_int_linear(q, torch.ones(32, 3), None, 24, 8)
    with pytest.raises(ValueError, match="scale must be"):
        pack_cpu_int_linear(q, torch.ones(32, 1), None, 32, 8)
    with pytest.raises(RuntimeError, match="int4 weights must lie in"):
        pack_cpu_int_linear(q + 8, torch.ones(32, 2), None, 32, 4)
    weight = pack_cpu_int_linear(q, torch.ones(32, 2), None, 32, 8)
    with pytest.raises(RuntimeError, match="does not fit the packed weight"):
        weight(torch.zeros(1, 96), None)


def test_no_native_kernels_means_no_packed_weight(monkeypatch):
    """The caller dequantizes to a dense weight when packing answers None:
    with RADIXSERVE_NO_NATIVE_KERNELS=1 (a fresh process: native_ops() is
    cached per process), and wherever the build failed."""
    code = (
        "import torch;"
        "from layers.quantization.cpu_int_gemm import cpu_int_gemm_supported, pack_cpu_int_linear;"
        "q = torch.zeros(16, 32, dtype=torch.int8);"
        "print(cpu_int_gemm_supported(), pack_cpu_int_linear(q, torch.ones(16, 1), None, 32, 4))"
    )
    env = {**os.environ, "RADIXSERVE_NO_NATIVE_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "None"]

    monkeypatch.setattr(cpu_int_gemm, "native_ops", lambda: None)
    assert pack_cpu_int_linear(torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, 1), None, 32, 4) is None
