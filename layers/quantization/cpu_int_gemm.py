"""Weight-only int8 / int4 linear layers on CPU, on the native kernel in
layers/cpu_kernels/int_gemm.inc
(AVX-512 and AVX2 variants, AMX tiles for many rows).

Every integer checkpoint format (GPTQ, AWQ, compressed-tensors, int8 made on
the fly) is first converted to one canonical form: `q` [N, K] int8 (bits 4:
-8..7), `scale` [N, K // G] fp32, `offset` like scale or None, and

    w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G].

`pack_cpu_int_linear` packs that once at load time into the kernel's layout
(scales and offsets travel inside it); the result computes
`y = x @ w.T + bias` for x [M, K] bf16 or fp32, like the dense
`CpuLinearWeight`. It returns None where the native kernels are unavailable
(RADIXSERVE_NO_NATIVE_KERNELS=1, no compiler, a CPU without AVX2): the caller then
dequantizes to a dense weight.

Which kernel runs is the row count's choice. Measured on the small demo
model's shapes (2 cores, Xeon with AMX, bf16 x, 2026-12), microseconds per
call with the weights streamed from memory (rotating over 400 MB of copies);
int8 per channel without offsets, int4 in groups of 128 with offsets:

    [N, K]        rows  bf16 streaming  oneDNN bf16  int8  int4
    [1536, 768]     1        89            120         49    37
                    4        94            121         61    57
                   32       325            140        129   116
    [4096, 768]     1       225            290        126    89
                    4       238            279        150   144
                   32       849            357        357   318
    [32000, 768]    1      1634           1801        917   654
                    4      1778           1879       1158  1093
                   32      7037           2300       2920  2613

- int4 with bf16 x at one or two rows (decode), group sizes a multiple of
  32: integer dot products, x rounded to int8 per 32 inputs (vpmaddubsw, as
  llama.cpp's Q4_0 kernels do). The FMA kernel is bound by its instructions
  there; this one streams at memory speed: on a [4096, 768] g128 layer (AMD
  Zen 4, 2 cores) 49-57 against 99-109 us at the AVX2 level, 54-61 against
  77-89 us at AVX-512. The rounding of x is the only difference from the FMA
  kernel (at most half a step of max |x| / 127 per block of 32, of the order
  of bf16's own rounding; test_cpu_int_gemm.py bounds it).
- up to 6 rows, and any fp32 x: the FMA kernel, which streams the packed
  weight once (int4 is bound by its instructions, not by memory).
- from AMX_MIN_ROWS of bf16 x, where the CPU has AMX: the tile kernel, which
  dequantizes the weight to bf16 once per call and is nearly flat in the row
  count. The two tie at 6-7 rows and tiles win from 8 on every demo-model
  shape ([4096, 768] int4, 6 / 7 / 8 rows: FMA 142 / 178 / 207, tiles 150 /
  149 / 156). With the weights hot in cache oneDNN's bf16 GEMM is 1.2-1.4x
  faster at 32 rows; with the weights streamed from memory int4 is faster
  than it on all but the lm-head-sized layer.

No dequantized bf16 copy is kept, nor made per call for oneDNN: the weight
dequantized per call and multiplied by oneDNN lost to the FMA kernel up to 32
rows and to the tile kernel from 32 to 512 rows (by 1.1-3.5x), and even
oneDNN on a prepacked bf16 weight, which no dequantize-per-call path can
beat, was within 25% of the tile kernel from 32 to 512 rows (int4, hot).
Without AMX (oneDNN limited to AVX512-BF16 to stand in for such CPUs) the FMA
kernel beat oneDNN's bf16 GEMM at 8 to 512 rows, so it runs at every row
count there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from layers.cpu_gemm import NativeLinearForm
from layers.cpu_kernels import native_ops

# Rows of bf16 x from which the AMX tile kernel takes over (where the CPU has
# it): the FMA kernel wins up to 6 rows, tiles from 7-8 (see above).
AMX_MIN_ROWS = 7


def cpu_int_gemm_supported() -> bool:
    """Whether the native int8 / int4 kernels run here (they need AVX2 or AVX-512)."""
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

    def native_form(self) -> NativeLinearForm:
        return NativeLinearForm(self.packed, self.out_features, self.bits, sys.maxsize, self.group_size,
                                self.has_offset, AMX_MIN_ROWS)

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
