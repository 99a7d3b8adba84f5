"""The attention backend interface.

A backend is created once per model runner. Per step, the runner calls
`init_forward_metadata(batch)` once; then every `RadixAttention` layer calls
`forward(q, k, v, layer, batch)`, which writes the new K/V into the paged pool
(at `batch.out_cache_loc`) and attends over the sequence's whole KV
(prefix + new), found through `req_to_token`.

Shapes: q [num_tokens, num_heads * head_dim]; k, v [num_tokens, num_kv_heads
* head_dim]; output [num_tokens, num_heads * head_dim].

CUDA-graph hooks exist for backends that support captured steps (decode,
and verify steps: a fixed number of new tokens per sequence on a cached
prefix, forward_mode EXTEND); the defaults say they do not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from layers.radix_attention import RadixAttention
    from model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build what every layer of this step shares (indices, masks)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        if batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, batch, save_kv_cache)
        return self.forward_extend(q, k, v, layer, batch, save_kv_cache)

    @abstractmethod
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor: ...

    # True when forward(q, None, None, ..., save_kv_cache=False) works because
    # the model already wrote this step's K/V into the pool itself (the fused
    # CPU rope + store kernel, layers/fused_attention_input.py): the backend
    # reads K/V only from the pool.
    accepts_stored_kv: bool = False

    # CUDA-graph hooks: backends that can replay captured steps override these.
    supports_cuda_graph: bool = False

    def init_cuda_graph_state(self, max_bs: int, max_kv_tokens: int, num_heads: int, head_dim: int) -> None:
        """Allocate the static metadata buffers every captured graph reads:
        up to `max_bs` sequences whose contexts add up to at most
        `max_kv_tokens` tokens (shared prefixes counted once per sequence)."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_capture_cuda_graph(self, batch: ForwardBatch) -> None:
        """Like init_forward_metadata, but into the static buffers."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_replay_cuda_graph(self, batch: ForwardBatch) -> None:
        """Refill the static buffers for `batch` (already padded to a
        captured size; DECODE, or EXTEND with the same number of new tokens
        for every sequence) without reallocating them."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")
