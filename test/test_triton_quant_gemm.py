"""The Triton dequantize-GEMM (layers/quantization/triton_quant_gemm.py)
matches a torch reference: dequantize the weight in fp32, then matmul.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1,
set before the kernel module is imported); with CUDA, on the GPU.

Tolerances, as |y - ref| <= RTOL * |ref| + ATOL * max|ref| (ref in fp32):
- fp32 x: RTOL 0, ATOL 1e-5: both sides accumulate in fp32, in different
  orders (the kernel scales per K tile; seen: under 1e-6);
- bf16 x: RTOL 2^-7, one bf16 ulp: the products are exact and accumulate in
  fp32, so the error is y's rounding to bf16, which the GPU does to nearest
  (half an ulp) but the interpreter by truncation (up to one ulp);
- fp16 x: RTOL 2^-10, one fp16 ulp, for the same reason.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from layers.quantization.triton_quant_gemm import expand_block_scales, pack_int4, quant_gemm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = 1e-5  # times max|ref|


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K], written independently of the kernel."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def _make_weight(kind: str, n: int, k: int, gen: torch.Generator):
    """(stored weight, q as fp32) for a random weight of the given kind."""
    if kind == "int8":
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        return q, q.float()
    if kind == "int4":
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
        return pack_int4(q), q.float()
    # fp8: random bit patterns cover the whole e4m3 range (subnormals, +-448);
    # e4m3fn's only NaNs are 0x7F and 0xFF.
    bits = torch.randint(0, 256, (n, k), dtype=torch.int32, generator=gen)
    bits = torch.where((bits & 0x7F) == 0x7F, bits - 1, bits).to(torch.uint8)
    w = bits.view(torch.float8_e4m3fn)
    return w, w.float()


def _reference(x, q, scale, offset, group_size, bias):
    w = q * scale.repeat_interleave(group_size, dim=1)
    if offset is not None:
        w = w + offset.repeat_interleave(group_size, dim=1)
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    bound = RTOL[dtype] * ref.abs() + ATOL * ref.abs().max()
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"max error exceeds the bound by {excess}"


def _case(kind, n, k, m, group_size, dtype, with_offset, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, q = _make_weight(kind, n, k, gen)
    # fp8 values reach 448: keep the products' sizes comparable across kinds.
    q_size = 64.0 if kind == "fp8" else 1.0
    scale = (torch.rand(n, k // group_size, generator=gen) + 0.5) * 0.01 / q_size
    offset = torch.randn(n, k // group_size, generator=gen) * 0.05 if with_offset else None
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = _reference(x, q, scale, offset, group_size, bias)
    to = dict(device=DEVICE)
    args = (
        x.to(**to), w.to(**to), scale.to(**to),
        None if offset is None else offset.to(**to),
    )
    return args, None if bias is None else bias.to(**to), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("extras", ["plain", "offset", "bias", "offset+bias"])
@pytest.mark.parametrize("group_size", [32, 64, 256], ids=["g32", "g64", "gK"])
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quant_gemm_matches_dequantized_matmul(kind, group_size, extras, m, dtype):
    n, k = 80, 256  # N not a multiple of BLOCK_N (64): a partial N tile
    (x, w, scale, offset), bias, ref = _case(
        kind, n, k, m, group_size, dtype, with_offset="offset" in extras, with_bias="bias" in extras
    )
    y = quant_gemm(x, w, scale, offset, group_size, kind, bias=bias)
    _check(y.cpu(), ref, dtype)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("m", [5, 130], ids=["m5", "m130"])
def test_quant_gemm_fp16_and_prefill_tiles(kind, m):
    """fp16 x (native fp16 dots, also in the interpreter), and M > 64 (the
    prefill tile, 128 x 128 for half x, 64 x 64 for fp32 dots)."""
    for dtype in (torch.float16, torch.float32):
        (x, w, scale, offset), bias, ref = _case(kind, 48, 128, m, 64, dtype, True, True, seed=1)
        y = quant_gemm(x, w, scale, offset, 64, kind, bias=bias)
        _check(y.cpu(), ref, dtype)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_split_k_matches(kind):
    """K split over programs (fp32 partials summed by torch; bias after the
    sum): 8 K tiles of 32 in 3 splits of 3, 3 and 2 tiles."""
    (x, w, scale, offset), bias, ref = _case(kind, 96, 256, 3, 32, torch.bfloat16, True, True, seed=2)
    y = quant_gemm(x, w, scale, offset, 32, kind, bias=bias, split_k=3)
    _check(y.cpu(), ref, torch.bfloat16)
    y1 = quant_gemm(x, w, scale, offset, 32, kind, bias=bias, split_k=1)
    _check(y1.cpu(), ref, torch.bfloat16)


def test_strided_and_batched_x():
    """x may be a strided view, and have leading dims ([B, T, K] -> [B, T, N])."""
    (x, w, scale, offset), bias, ref = _case("int4", 64, 128, 6, 32, torch.float32, True, False, seed=3)
    wide = torch.zeros(6, 3 * 128, device=x.device)
    wide[:, 1::3] = x
    y = quant_gemm(wide[:, 1::3], w, scale, offset, 32, "int4")
    _check(y.cpu(), ref, torch.float32)
    y = quant_gemm(x.view(2, 3, 128), w, scale, offset, 32, "int4")
    assert y.shape == (2, 3, 64)
    _check(y.reshape(6, 64).cpu(), ref, torch.float32)
    assert quant_gemm(x[:0], w, scale, offset, 32, "int4").shape == (0, 64)


def test_bad_arguments_are_refused():
    (x, w, scale, _), _, _ = _case("int4", 64, 128, 2, 32, torch.float32, False, False)
    with pytest.raises(ValueError, match="kind"):
        quant_gemm(x, w, scale, None, 32, "int2")
    with pytest.raises(TypeError, match="int4 weight must be torch.uint8"):
        quant_gemm(x, w.view(torch.int8), scale, None, 32, "int4")
    with pytest.raises(ValueError, match="multiple of 32"):  # int4 needs G % 32 == 0
        quant_gemm(x, w, torch.ones(64, 8, device=x.device), None, 16, "int4")
    with pytest.raises(ValueError, match="scale must be fp32"):
        quant_gemm(x, w, scale[:, :2], None, 32, "int4")
    with pytest.raises(ValueError, match="last dim"):
        quant_gemm(x[:, :64], w, scale, None, 32, "int4")


def test_pack_int4_round_trip_and_layout():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert torch.equal(_unpack_int4(packed), q)
    # byte j: k = 2j in the low nibble, k = 2j + 1 in the high one, each as q + 8
    assert pack_int4(torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)).tolist() == [[0xF0, 0x78]]
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("n,k,bn,bk", [(300, 512, 128, 128), (256, 256, 128, 64), (5, 128, 2, 128)])
def test_expand_block_scales(n, k, bn, bk):
    blocks = torch.rand(-(-n // bn), k // bk)
    got = expand_block_scales(blocks, bn, bk, n, k)
    want = torch.empty(n, k // bk)
    for row in range(n):
        for g in range(k // bk):
            want[row, g] = blocks[row // bn, g]
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_block_fp8_through_quant_gemm():
    """A DeepSeek-style block-quantized fp8 weight (128 x 128 scale blocks,
    N = 200 not a multiple of 128) against w = q * scale_inv[n // 128, k // 128]."""
    n, k, block = 200, 256, 128
    gen = torch.Generator().manual_seed(4)
    w, q = _make_weight("fp8", n, k, gen)
    scale_inv = torch.rand(2, 2, generator=gen) * 1e-3 + 1e-4
    x = torch.randn(4, k, generator=gen).to(torch.bfloat16)
    rows = torch.arange(n) // block
    cols = torch.arange(k) // block
    ref = x.float() @ (q * scale_inv[rows[:, None], cols[None, :]]).T
    scale = expand_block_scales(scale_inv, block, block, n, k)
    y = quant_gemm(x.to(DEVICE), w.to(DEVICE), scale.to(DEVICE), None, block, "fp8")
    _check(y.cpu(), ref, torch.bfloat16)


def test_expand_block_scales_refuses_ragged_k_and_wrong_shape():
    with pytest.raises(ValueError, match="not a multiple of the scale block"):
        expand_block_scales(torch.ones(1, 2), 128, 128, 128, 200)
    with pytest.raises(ValueError, match="should be"):
        expand_block_scales(torch.ones(1, 2), 128, 128, 200, 256)
