"""The attention layer models call: a thin handle onto the step's backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from model_executor.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    def __init__(
        self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int, layer_id: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        """k and v may be None only with save_kv_cache=False: this step's K/V
        are already in the pool (see `AttentionBackend.accepts_stored_kv`)."""
        assert batch.attn_backend is not None, "the model runner sets the attention backend"
        return batch.attn_backend.forward(q, k, v, self, batch, save_kv_cache)
