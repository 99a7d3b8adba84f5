"""A Triton dequantize-GEMM for quantized linear layers: y = x @ w.T (+ bias).

Every quantized checkpoint format is converted (elsewhere) to one canonical
form per linear layer, which this kernel reads as is:

- weight storage, by `kind`:
  - "int8": int8 [N, K], q in [-128, 127];
  - "int4": uint8 [N, K // 2], two 4-bit values per byte along K: byte j of
    row n holds k = 2j in its low nibble and k = 2j + 1 in its high nibble,
    each stored as u = q + 8 (q in [-8, 7]; `pack_int4` builds it);
  - "fp8": torch.float8_e4m3fn [N, K], q = the fp8 value;
- `scale` fp32 [N, K // G], `offset` fp32 [N, K // G] or None, G = group_size;
- w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G].

Why the kernel is shaped this way
---------------------------------
One program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K
steps, with BLOCK_K a power of two that divides G. So a K tile never
straddles a group: each of its weight rows has ONE scale (and offset), and
the scaling moves out of the dot:

    sum_k x[m, k] (q[n, k] s[n] + o[n]) = s[n] (x . q)[m, n] + o[n] sum_k x[m, k]

The weight tile is dequantized in registers only as far as the dot needs:
q (int8, int4 after unpacking, fp8) converted to the dot's input dtype, which
for bf16/fp16 activations is x's own dtype. That conversion is EXACT (int8 and
e4m3 values fit bf16's and fp16's mantissas and ranges), so the tensor-core
products x * q are exact and the sums accumulate in fp32; the per-group scale
then multiplies the BLOCK_M x BLOCK_N partial (fp32), and the offset adds
o[n] times the tile's row sums of x. Dequantizing to q * s + o first would
cost BLOCK_N x BLOCK_K multiply-adds per tile instead of BLOCK_M x BLOCK_N,
and would round every real weight to bf16 before the dot. fp32 activations
(the parity reference) get full fp32 ("ieee") dots.

int4: the two nibbles of a byte belong to k = 2j and 2j + 1, so rather than
interleave them back into one [BLOCK_K, BLOCK_N] tile, the kernel does two
dots of depth BLOCK_K / 2: x[:, even k] against the low nibbles and x[:, odd k]
against the high ones. Each weight byte is loaded once (weight bytes are
what decode is bound by); the cheap, small x tile is read with stride 2.
tl.dot needs depth >= 16, so BLOCK_K >= 16 (32 for int4): G must be a
multiple of 16 (32 for int4). G = K (per-channel) is fine when K is one.

Tiles (see `_config`), for H100/H200:
- decode (M <= 16): BLOCK_M = 16 (tl.dot's minimum), BLOCK_N = 64, BLOCK_K up
  to 128, 4 pipeline stages. This is a weight-streaming GEMV: what matters is
  keeping every SM loading weights. With few N tiles (N / 64 < SM count),
  the K loop is split across programs (split-K, `_split_k`): each writes
  an fp32 partial to a [SPLIT_K, M, N] workspace that torch sums, in a
  fixed order (deterministic, no atomics), before bias and cast;
- M <= 32 / <= 64: BLOCK_M = 32 / 64, same N and K tiles;
- prefill (M > 64): 128 x 128 x 64, 8 warps, 3 stages (compute bound),
  with grouped tile order (GROUP_M) so programs running together share x
  and weight tiles in L2. fp32 x uses 64 x 64 x 32 (fp32 FMA dots, reference
  only).

Under Triton's CPU interpreter (TRITON_INTERPRET=1, how the tests run without
a GPU) bf16 dots are wrong, so for CPU tensors bf16 x is cast to fp32 right
after its load and the dot runs in fp32; since the products are exact either
way, the only difference from the GPU's bf16 dot is summation order. fp16 dots
work in the interpreter and run in fp16 there too.

Offsets into x, w and y are formed in int64 (row index times stride).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

KINDS = ("int8", "int4", "fp8")
_WEIGHT_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
GROUP_M = 8  # grouped tile order for prefill (L2 reuse)


@triton.jit
def _quant_gemm_kernel(
    X, W, Scale, Offset, Bias, Y,
    M, N,
    k_tiles, k_tiles_per_split,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sn, stride_sg,
    stride_on, stride_og,
    stride_ys, stride_ym, stride_yn,
    INT4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive M tiles walk the N tiles together.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N read row 0 (wrapped) instead of masking the loads: their
    # results land only in output rows / columns that the store masks off.
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    x_rows = X + rows_m[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = W + rows_n[None, :] * stride_wn  # [1, BLOCK_N]: the weight tile is read as [K, N]
    s_ptrs = Scale + rows_n * stride_sn
    o_ptrs = Offset + rows_n * stride_on

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_start = split * k_tiles_per_split
    t_end = tl.minimum(t_start + k_tiles_per_split, k_tiles)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        if INT4:
            offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of the tile: k = k0 + 2j (low), k0 + 2j + 1 (high)
            b = tl.load(w_cols + (k0 // 2 + offs_j)[:, None] * stride_wk)
            lo = ((b & 0xF).to(tl.int32) - 8).to(DOT_DTYPE)
            hi = ((b >> 4).to(tl.int32) - 8).to(DOT_DTYPE)
            x_even = tl.load(x_rows + (k0 + 2 * offs_j)[None, :] * stride_xk)
            x_odd = tl.load(x_rows + (k0 + 2 * offs_j + 1)[None, :] * stride_xk)
            x_even = x_even.to(DOT_DTYPE)
            x_odd = x_odd.to(DOT_DTYPE)
            part = tl.dot(x_even, lo, input_precision=DOT_PRECISION)
            part = tl.dot(x_odd, hi, part, input_precision=DOT_PRECISION)
            if HAS_OFFSET:
                x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_cols + offs_k[:, None] * stride_wk).to(DOT_DTYPE)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk).to(DOT_DTYPE)
            part = tl.dot(x, q, input_precision=DOT_PRECISION)
            if HAS_OFFSET:
                x_sum = tl.sum(x.to(tl.float32), axis=1)
        g = k0 // GROUP_SIZE  # the tile's one group (BLOCK_K divides GROUP_SIZE)
        s = tl.load(s_ptrs + g * stride_sg)
        acc += part * s[None, :]
        if HAS_OFFSET:
            o = tl.load(o_ptrs + g * stride_og)
            acc += x_sum[:, None] * o[None, :]

    if HAS_BIAS:
        acc += tl.load(Bias + rows_n).to(tl.float32)[None, :]
    y_ptrs = Y + split * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] with values in [-8, 7] -> uint8 [..., K // 2]: byte j holds
    k = 2j in its low nibble and k = 2j + 1 in its high one, each as q + 8."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 wants int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def expand_block_scales(scale_inv: torch.Tensor, block_n: int, block_k: int, n: int, k: int) -> torch.Tensor:
    """Block-wise fp8 scales (DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv`,
    [ceil(N / block_n), ceil(K / block_k)], w = q * scale_inv[n // bn, k // bk])
    -> per-row group scales fp32 [N, K // block_k], to run the layer through
    `quant_gemm(..., group_size=block_k, kind="fp8")`."""
    if k % block_k:
        raise ValueError(
            f"K = {k} is not a multiple of the scale block's K size {block_k}: quant_gemm's groups "
            f"(group_size = {block_k}) must divide K, so this block-quantized weight cannot run through it"
        )
    expected = (triton.cdiv(n, block_n), k // block_k)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"block scales for a [{n}, {k}] weight with [{block_n}, {block_k}] blocks should be "
            f"{list(expected)}, got {list(scale_inv.shape)}"
        )
    return scale_inv.to(torch.float32).repeat_interleave(block_n, dim=0)[:n].contiguous()


def _block_k(group_size: int, cap: int) -> int:
    """The largest power of two <= cap that divides the group size."""
    block_k = cap
    while block_k > 1 and group_size % block_k:
        block_k //= 2
    return block_k


def _config(m: int, dot_fp32: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K cap, num_warps, num_stages) by M: see the module docstring."""
    if dot_fp32 and m > 64:
        return 64, 64, 32, 4, 3
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 32:
        return 32, 64, 128, 4, 4
    if m <= 64:
        return 64, 64, 128, 4, 3
    return 128, 128, 64, 8, 3


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(x: torch.Tensor, tiles: int, k_tiles: int) -> int:
    """Split K across programs when the output tiles alone leave SMs idle
    (decode); each split keeps at least 4 K tiles to pipeline over."""
    if not x.is_cuda:
        return 1
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), k_tiles // 4, 16))


def quant_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
    kind: str,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ w.T (+ bias) for a quantized weight in the canonical form (see
    the module docstring). x [..., K] bf16/fp16/fp32; y [..., N] in x's dtype,
    accumulated in fp32. `split_k` overrides the split-K heuristic (tests,
    tuning); the K tiles are divided as evenly as possible among the splits."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if weight.dtype != _WEIGHT_DTYPES[kind]:
        raise TypeError(f"a {kind} weight must be {_WEIGHT_DTYPES[kind]}, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {list(weight.shape)}")
    n = weight.shape[0]
    k = weight.shape[1] * (2 if kind == "int4" else 1)
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} != the weight's K {k}")
    int4 = kind == "int4"
    min_block_k = 32 if int4 else 16
    if group_size <= 0 or k % group_size or group_size % min_block_k:
        raise ValueError(
            f"group_size {group_size} must divide K = {k} and be a multiple of {min_block_k} "
            f"(tl.dot's minimum depth{', twice over for int4' if int4 else ''})"
        )
    groups = k // group_size
    for name, t in (("scale", scale), ("offset", offset)):
        if t is None:
            continue
        if t.dtype != torch.float32 or tuple(t.shape) != (n, groups):
            raise ValueError(f"{name} must be fp32 [{n}, {groups}], got {t.dtype} {list(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    for t in (weight, scale, offset, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, found one on {t.device}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()

    # bf16 dots are wrong in Triton's CPU interpreter: there, dot in fp32 (same exact products).
    dot_dtype = torch.float32 if (x.dtype == torch.bfloat16 and not x.is_cuda) else x.dtype
    dot_fp32 = dot_dtype == torch.float32
    block_m, block_n, k_cap, num_warps, num_stages = _config(m, dot_fp32)
    block_k = _block_k(group_size, k_cap)
    k_tiles = k // block_k
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits = _split_k(x2, tiles, k_tiles) if split_k is None else split_k
    splits = max(1, min(splits, k_tiles))
    per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, per_split)  # no empty splits

    if splits == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        stride_ys = 0
    else:
        out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        stride_ys = out.stride(0)
    fused_bias = bias is not None and splits == 1
    _quant_gemm_kernel[(tiles, splits)](
        x2, weight, scale,
        offset if offset is not None else scale,  # not read without HAS_OFFSET
        bias if fused_bias else scale,  # not read without HAS_BIAS
        out,
        m, n,
        k_tiles, per_split,
        x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1),
        scale.stride(0), scale.stride(1),
        offset.stride(0) if offset is not None else 0, offset.stride(1) if offset is not None else 0,
        stride_ys, out.stride(-2), out.stride(-1),
        INT4=int4,
        GROUP_SIZE=group_size,
        HAS_OFFSET=offset is not None,
        HAS_BIAS=fused_bias,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=GROUP_M,
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        DOT_PRECISION="ieee" if dot_fp32 else "tf32",  # "tf32" is ignored for half operands
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        y = out.sum(0)
        if bias is not None:
            y += bias.to(torch.float32)
        out = y.to(x.dtype)
    return out.reshape(*lead, n)
