"""The forms every quantized checkpoint format is converted to after loading.

Formats differ in how they pack the same few things (GPTQ packs along the
input dim, AWQ along the output dim in its own order, compressed-tensors
along the input dim with an offset), so each format's method only unpacks its
tensors into one of these, and the kernels (layers/quantization/kernels.py)
know only these:

- `IntWeight`: signed integers with per-group scales and optional offsets,
  w[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G] over the input
  columns in kernel order; `perm` says which original column each one is
  (GPTQ's act-order), so a kernel multiplies x[:, perm];
- `Fp8Weight`: e4m3 values with per-group scales (per-tensor and per-channel
  are groups of the whole input dim, block-wise scales are repeated along
  the output rows of their block); a static checkpoint's activation scale
  goes to the kernel beside it (`QuantizedLinearMethod.input_scale`);
- a plain float tensor, for what is kept dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IntWeight:
    q: torch.Tensor  # int8 [N, K], values in [-2^(bits-1), 2^(bits-1) - 1]
    scale: torch.Tensor  # fp32 [N, K // group_size]
    offset: torch.Tensor | None  # fp32 [N, K // group_size]; None: symmetric
    group_size: int
    bits: int
    perm: torch.Tensor | None = None  # int64 [K]: original column of each kernel column

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.bits not in (4, 8):
            raise ValueError(f"{self.bits}-bit integer weights are not supported (4 or 8)")
        if k % self.group_size or self.scale.shape != (n, k // self.group_size):
            raise ValueError(
                f"scales {tuple(self.scale.shape)} do not fit a [{n}, {k}] weight in groups of {self.group_size}"
            )
        if self.offset is not None and self.offset.shape != self.scale.shape:
            raise ValueError(f"zero points {tuple(self.offset.shape)} do not match scales {tuple(self.scale.shape)}")

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] in the original column order."""
        groups = self.scale.repeat_interleave(self.group_size, dim=1)
        w = self.q.float() * groups
        if self.offset is not None:
            w += self.offset.repeat_interleave(self.group_size, dim=1)
        if self.perm is None:
            return w
        original = torch.empty_like(w)
        original[:, self.perm] = w
        return original


@dataclass
class Fp8Weight:
    q: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # fp32 [N, K // group_size]
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.repeat_interleave(self.group_size, dim=1)

    @property
    def per_row(self) -> bool:
        """One scale per output row (per-tensor or per-channel)."""
        return self.scale.shape[1] == 1


Canonical = IntWeight | Fp8Weight | torch.Tensor


# ---- helpers the formats share ------------------------------------------


def regroup_by_index(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, g_idx: torch.Tensor,
                     bits: int) -> Canonical:
    """Weights whose columns name their group (GPTQ's g_idx, `desc_act`).

    Sorting the columns by group makes every group contiguous; when each
    group then holds the same number of columns (true of a whole GPTQ layer)
    the result is an `IntWeight` with `perm`. A TP shard of a row-parallel
    layer holds an arbitrary subset of columns, whose groups are uneven:
    that shard is dequantized instead (correct, without the memory saving).
    """
    k = q.shape[1]
    perm = torch.argsort(g_idx, stable=True)
    counts = torch.bincount(g_idx.long())
    used = counts[counts > 0]
    if bool((used == used[0]).all()) and k % used.numel() == 0:
        groups = g_idx[perm].long().unique_consecutive()
        return IntWeight(
            q[:, perm].contiguous(),
            scale[:, groups].contiguous(),
            None if offset is None else offset[:, groups].contiguous(),
            k // groups.numel(),
            bits,
            None if bool((perm == torch.arange(k)).all()) else perm,
        )
    w = q.float() * scale[:, g_idx.long()]
    if offset is not None:
        w += offset[:, g_idx.long()]
    return w


def scales_per_row(scalars: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-shard scalars of a fused layer (q/k/v or gate/up each quantized
    with one scale) as one scale per output row, [N, 1]."""
    return torch.repeat_interleave(scalars.float(), torch.tensor(sizes)).unsqueeze(1)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned `bits`-wide values packed into int32 words along `dim`, value
    i of a word in bits [i * bits, (i + 1) * bits). `order[j]` names the
    value slot holding element j of each word's run (AWQ interleaves); by
    default element j is slot j. Returns int32 with `dim` 32 // bits times longer."""
    per_word = 32 // bits
    slots = order or tuple(range(per_word))
    shifts = torch.tensor([bits * s for s in slots], dtype=torch.int32, device=packed.device)
    moved = packed.movedim(dim, -1).unsqueeze(-1)  # [..., words, 1]
    values = torch.bitwise_right_shift(moved, shifts) & ((1 << bits) - 1)
    return values.flatten(-2).movedim(-1, dim)
