"""Rotary position embedding (neox / "rotate half" layout) with a cos/sin cache.

Supported `rope_type`s: "default", "linear" and "llama3". The inverse
frequencies and the cos/sin table are computed in float32 exactly as
transformers does, then cast to the activation dtype at use, so parity holds
in fp32 and bf16 rounding matches too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1 long-context scaling: high frequencies kept, low frequencies
    # divided by `factor`, a smooth blend between the two wavelength bounds.
    factor = float(params["factor"])
    low_freq_factor = float(params.get("low_freq_factor", 1.0))
    high_freq_factor = float(params.get("high_freq_factor", 4.0))
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(
    rotary_dim: int, theta: float, rope_type: str, params: dict[str, Any]
) -> torch.Tensor:
    inv_freq = _default_inv_freq(rotary_dim, theta)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    raise ValueError(
        f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        rope_type: str = "default",
        params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, theta, rope_type, params or {})
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        half = head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin | sin]: folding the
        # sign into the table saves a negation and a concat per use.
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        # Not parameters: rebuilt from the config, never loaded or saved.
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("signed_sin_cache", signed_sin, persistent=False)
        self._cast_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._cast_cache.get(dtype)
        if tables is None or tables[0].device != self.cos_cache.device:
            tables = (self.cos_cache.to(dtype), self.signed_sin_cache.to(dtype))
            self._cast_cache[dtype] = tables
        return tables

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos/sin rows for `positions` ([T]), shaped to broadcast over heads.

        Done once per step by the model and shared by every layer.
        """
        cos_table, sin_table = self._tables(dtype)
        return RopeTables(cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (queries and keys may be stacked along H), positions: [T]."""
        return apply_rotary(x, self.lookup(positions, x.dtype))


class RopeTables(NamedTuple):
    cos: torch.Tensor  # [T, 1, D]
    signed_sin: torch.Tensor  # [T, 1, D], first half negated


def apply_rotary(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate x [T, H, D]. Pass q and k stacked along H to rotate both in one go."""
    tokens, heads, dim = x.shape
    swapped = x.view(tokens, heads, 2, dim // 2).flip(2).view(tokens, heads, dim)
    return x * tables.cos + swapped * tables.signed_sin
