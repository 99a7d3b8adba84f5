"""CPU attention on the paged KV cache through the native kernel.

One call per layer covers any batch: prefill chunks, decodes and mixed
batches alike (layers/cpu_kernels/attention.inc). Its cost follows the real
tokens: no query padding, no per-layer gather of every sequence's KV, no
staging to rebuild when the batch changes.

When the kernels cannot be built here (no compiler) or are disabled
(RADIXSERVE_NO_NATIVE_KERNELS=1), the backend says so once and runs the
torch-native one instead, so `cpu` is always a safe choice on a CPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from layers.attention.base import AttentionBackend
from layers.cpu_kernels import native_ops

if TYPE_CHECKING:
    from layers.radix_attention import RadixAttention
    from model_executor.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


class CpuAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"the cpu attention backend runs on the CPU, not {device}")
        self.ops = native_ops()
        self.fallback: AttentionBackend | None = None
        if self.ops is None:
            from layers.attention.torch_native import TorchNativeAttnBackend

            logger.warning("cpu attention backend: native kernels unavailable, running torch_native")
            self.fallback = TorchNativeAttnBackend()
        self.accepts_stored_kv = self.fallback is None
        # Per-step host tensors the kernel reads (it schedules on the CPU anyway).
        self.rows: torch.Tensor | None = None
        self.prefix_lens: torch.Tensor | None = None
        self.extend_lens: torch.Tensor | None = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if self.fallback is not None:
            self.fallback.init_forward_metadata(batch)
            return
        # The batch's own int64 tensors: on this backend's device (the CPU)
        # they are the host copies the kernel wants, with no new tensors per step.
        self.rows = batch.req_pool_indices
        self.prefix_lens = batch.extend_prefix_lens
        self.extend_lens = batch.extend_seq_lens

    def forward(self, q, k, v, layer, batch, save_kv_cache=True):
        if self.fallback is not None:
            return self.fallback.forward(q, k, v, layer, batch, save_kv_cache)
        return self._attend(q, k, v, layer, batch, save_kv_cache)

    def forward_extend(self, q, k, v, layer, batch, save_kv_cache=True):
        return self.forward(q, k, v, layer, batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, batch, save_kv_cache=True):
        return self.forward(q, k, v, layer, batch, save_kv_cache)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        save_kv_cache: bool,
    ) -> torch.Tensor:
        assert batch.kv_pool is not None and batch.req_to_token_pool is not None
        heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        if save_kv_cache:
            batch.kv_pool.set_kv_buffer(
                layer.layer_id,
                batch.out_cache_loc,
                k.view(-1, kv_heads, head_dim),
                v.view(-1, kv_heads, head_dim),
            )
        k_cache, v_cache = batch.kv_pool.get_kv_buffer(layer.layer_id)
        queries = q.view(-1, heads, head_dim).to(k_cache.dtype).contiguous()
        out = torch.empty_like(queries)
        self.ops.paged_attention(
            queries,
            k_cache,
            v_cache,
            batch.req_to_token_pool.req_to_token,
            self.rows,
            self.prefix_lens,
            self.extend_lens,
            layer.scaling,
            out,
        )
        return out.view(-1, heads * head_dim).to(q.dtype)
