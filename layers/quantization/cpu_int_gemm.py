"""Weight-only int8 / int4 linear layers on CPU, on the native kernel in
layers/cpu_kernels/int_gemm.cpp.

Every integer checkpoint format (GPTQ, AWQ, compressed-tensors, int8 made on
the fly) is first converted to one canonical form: `q` [N, K] int8 (bits 4:
-8..7), `scale` [N, K // G] fp32, `offset` like scale or None, and

    w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G].

`pack_cpu_int_linear` packs that once at load time into the kernel's layout
(scales and offsets travel inside it); the result computes
`y = x @ w.T + bias` for x [M, K] bf16 or fp32, like the dense
`CpuLinearWeight`. It returns None where the native kernels are unavailable
(RADIXSERVE_NO_NATIVE_KERNELS=1, no compiler, no AVX-512): the caller then
dequantizes to a dense weight.

Which kernel runs is the row count's choice (microseconds per call, 2 cores,
Xeon with AMX, weights hot in cache, group size 128 with offsets, 2026-12):

- up to 6 rows, and any fp32 x: the FMA kernel. It streams the packed weight
  once; at one row int8 is 1.5-1.9x and int4 2.5-3x faster than the bf16
  streaming kernel (gemm.cpp), e.g. [4096, 768]: bf16 128, int8 83, int4 64;
  its cost grows by about a 6-row tile's FMAs per 6 rows.
- from 7 rows of bf16 x, where the CPU has AMX: the tile kernel, which
  dequantizes the weight to bf16 once per call and is nearly flat in the row
  count ([4096, 768], int4: FMA 152 at 6 rows, 217 at 8; tiles 176, 182; int8
  alike). At 32 rows it is about level with oneDNN's bf16 AMX GEMM on a
  prepacked bf16 weight, and it reads a weight 2-4x smaller.

So no dequantized bf16 copy is kept, nor made per call for oneDNN: with a
bf16 chunk dequantized per call, oneDNN on an unpacked weight lost to both
kernels up to 256 rows and to the tile kernel at 512 as well. Without AMX
(oneDNN limited to AVX512-BF16 to stand in for such CPUs) the FMA kernel
beat oneDNN's bf16 GEMM at every row count measured (8-512).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.cpu_kernels import native_ops

# Rows of bf16 x from which the AMX tile kernel takes over (where the CPU has
# it): the FMA kernel wins up to 6, the two tie around 6-7, tiles win from 8
# on every demo-model shape (see above).
AMX_MIN_ROWS = 7


def cpu_int_gemm_supported() -> bool:
    """Whether the native int8 / int4 kernels are built (they need AVX-512)."""
    ops = native_ops()
    return ops is not None and ops.int_gemm_supported()


@dataclass
class CpuIntLinearWeight:
    """An int8 / int4 weight packed for the native CPU kernels."""

    packed: torch.Tensor  # uint8: per 16 outputs and group, fp32 scales (and offsets) then the integers
    out_features: int
    in_features: int
    group_size: int
    bits: int  # as packed: 4, or 8 (int4 with a group size that is not a multiple of 8 is packed as int8)
    has_offset: bool

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = native_ops()
        assert ops is not None
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), bias).reshape(*x.shape[:-1], self.out_features)
        return ops.int_linear(
            x, self.packed, bias, self.out_features, self.group_size, self.bits, self.has_offset, AMX_MIN_ROWS
        )

    @property
    def nbytes(self) -> int:
        """Bytes held: the integers, scales and offsets (for the weight-memory log)."""
        return self.packed.numel() * self.packed.element_size()


def pack_cpu_int_linear(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int, bits: int
) -> CpuIntLinearWeight | None:
    """Packs the canonical quantized weight for `CpuIntLinearWeight`; None where
    the native kernels are unavailable."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"q must be [N, K] int8, not {tuple(q.shape)} {q.dtype}")
    out_features, in_features = q.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide K = {in_features}")
    groups = in_features // group_size
    if tuple(scale.shape) != (out_features, groups):
        raise ValueError(f"scale must be [{out_features}, {groups}], not {tuple(scale.shape)}")
    if offset is not None and tuple(offset.shape) != (out_features, groups):
        raise ValueError(f"offset must be [{out_features}, {groups}], not {tuple(offset.shape)}")
    if not cpu_int_gemm_supported():
        return None
    ops = native_ops()
    assert ops is not None
    # The int4 layout takes 8 inputs of a group at a time; a group size that
    # is not a multiple of 8 (unseen in practice) is packed as int8 instead.
    packed_bits = 4 if bits == 4 and group_size % 8 == 0 else 8
    scale = scale.detach().to(device="cpu", dtype=torch.float32)
    offset = None if offset is None else offset.detach().to(device="cpu", dtype=torch.float32)
    packed = ops.pack_int_weight(q.detach().cpu(), scale, offset, group_size, packed_bits)
    return CpuIntLinearWeight(packed, out_features, in_features, group_size, packed_bits, offset is not None)
