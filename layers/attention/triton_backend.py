"""Attention backend on our Triton kernels (`triton_kernels.py`).

Per step, `init_forward_metadata` flattens every sequence's pool slots into
`kv_indices` (through `req_to_token`, once for all layers) with `kv_indptr`
marking where each sequence's run starts; extend batches add `qo_indptr`
over the new tokens. Each layer then writes its new K/V into the pool and
runs one kernel (extend) or two (decode: split-KV, then merge).

On CPU this only runs under `TRITON_INTERPRET=1` (slow: for tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from layers.attention.base import AttentionBackend
from layers.attention.kv_indices import build_kv_indices

if TYPE_CHECKING:
    from layers.radix_attention import RadixAttention
    from model_executor.forward_batch import ForwardBatch

# Decode splits each sequence's keys into this many chunks (flash decoding):
# enough programs to fill a GPU at small batch sizes with long contexts.
DEFAULT_NUM_KV_SPLITS = 8


@dataclass
class TritonMetadata:
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [sum(seq_lens)] int64 pool slots
    qo_indptr: torch.Tensor | None  # [B + 1] int32, extend only
    prefix_lens: torch.Tensor | None  # [B] int32, extend only
    max_new_tokens: int


class TritonAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device, num_kv_splits: int = DEFAULT_NUM_KV_SPLITS) -> None:
        # The merge kernel spans the splits with tl.arange, whose length must be a power of two.
        if num_kv_splits < 1 or num_kv_splits & (num_kv_splits - 1):
            raise ValueError(f"num_kv_splits must be a power of two >= 1, got {num_kv_splits}")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "the triton attention backend needs a GPU; on CPU it runs only under "
                "TRITON_INTERPRET=1 (slow, for tests): use --attention-backend torch_native"
            )
        from layers.attention import triton_kernels  # imports triton: only when chosen

        self.kernels = triton_kernels
        self.device = device
        self.num_kv_splits = num_kv_splits
        self.metadata: TritonMetadata | None = None
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph_metadata: TritonMetadata | None = None  # static buffers for captured decode

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        assert batch.req_to_token_pool is not None
        kv_indptr, kv_indices = build_kv_indices(
            batch.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.seq_lens, sum(batch.seq_lens_cpu)
        )
        qo_indptr = prefix_lens = None
        if not batch.forward_mode.is_decode():
            qo_indptr = torch.zeros(batch.batch_size + 1, dtype=torch.int32, device=kv_indptr.device)
            torch.cumsum(batch.extend_seq_lens, 0, out=qo_indptr[1:])
            prefix_lens = batch.extend_prefix_lens.to(torch.int32)
        self.metadata = TritonMetadata(
            kv_indptr, kv_indices, qo_indptr, prefix_lens, max(batch.extend_seq_lens_cpu)
        )

    # -- CUDA graphs: decode, and verify steps (a fixed number of new tokens per sequence)

    supports_cuda_graph = True

    def init_cuda_graph_state(self, max_bs: int, max_kv_tokens: int, num_heads: int, head_dim: int) -> None:
        self._graph_metadata = TritonMetadata(
            kv_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            # int32: sized for every sequence at full context, this is the big one.
            kv_indices=torch.zeros(max_kv_tokens, dtype=torch.int32, device=self.device),
            qo_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            prefix_lens=torch.zeros(max_bs, dtype=torch.int32, device=self.device),
            max_new_tokens=1,
        )
        self._decode_scratch(max_bs, num_heads, head_dim)  # sized once, before any capture

    def init_forward_metadata_capture_cuda_graph(self, batch: ForwardBatch) -> None:
        self.init_forward_metadata_replay_cuda_graph(batch)

    def init_forward_metadata_replay_cuda_graph(self, batch: ForwardBatch) -> None:
        static = self._graph_metadata
        assert static is not None and static.qo_indptr is not None and static.prefix_lens is not None
        assert batch.req_to_token_pool is not None
        total = sum(batch.seq_lens_cpu)
        kv_indptr, kv_indices = build_kv_indices(
            batch.req_to_token_pool.req_to_token, batch.req_pool_indices, batch.seq_lens, total
        )
        bs = batch.batch_size
        static.kv_indptr[: bs + 1].copy_(kv_indptr)
        static.kv_indices[:total].copy_(kv_indices)
        # The graph's kernels were captured reading these very tensors; the
        # batch size is baked into the graph, so the slices only fix shapes.
        if batch.forward_mode.is_decode():
            self.metadata = TritonMetadata(static.kv_indptr[: bs + 1], static.kv_indices, None, None, 1)
            return
        # A verify step: every sequence has the same number of new rows (its
        # padding rows last), so the extend kernel's grid is fixed too.
        torch.cumsum(batch.extend_seq_lens, 0, out=static.qo_indptr[1 : bs + 1])
        static.prefix_lens[:bs].copy_(batch.extend_prefix_lens)
        self.metadata = TritonMetadata(static.kv_indptr[: bs + 1], static.kv_indices, static.qo_indptr[: bs + 1],
                                       static.prefix_lens[:bs], max(batch.extend_seq_lens_cpu))

    def _write_kv(self, k, v, layer: RadixAttention, batch: ForwardBatch, save: bool):
        assert batch.kv_pool is not None
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        if save:
            batch.kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        return batch.kv_pool.get_kv_buffer(layer.layer_id)

    def forward_extend(self, q, k, v, layer, batch, save_kv_cache=True):
        meta = self.metadata
        assert meta is not None and meta.qo_indptr is not None and meta.prefix_lens is not None
        k_pool, v_pool = self._write_kv(k, v, layer, batch, save_kv_cache)
        q3 = q.view(-1, layer.num_heads, layer.head_dim)
        out = torch.empty(q3.shape, dtype=k_pool.dtype, device=q.device)
        self.kernels.extend_attention(
            q3, k_pool, v_pool, out, meta.qo_indptr, meta.kv_indptr, meta.kv_indices,
            meta.prefix_lens, meta.max_new_tokens, layer.scaling,
        )
        return out.view(-1, layer.num_heads * layer.head_dim).to(q.dtype)

    def forward_decode(self, q, k, v, layer, batch, save_kv_cache=True):
        meta = self.metadata
        assert meta is not None
        k_pool, v_pool = self._write_kv(k, v, layer, batch, save_kv_cache)
        q3 = q.view(-1, layer.num_heads, layer.head_dim)
        out = torch.empty(q3.shape, dtype=k_pool.dtype, device=q.device)
        partial_out, partial_lse = self._decode_scratch(q3.shape[0], layer.num_heads, layer.head_dim)
        self.kernels.decode_attention(
            q3, k_pool, v_pool, out, meta.kv_indptr, meta.kv_indices, partial_out, partial_lse, layer.scaling
        )
        return out.view(-1, layer.num_heads * layer.head_dim).to(q.dtype)

    def _decode_scratch(self, batch_size: int, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 buffers for the split-KV partial results, grown (never
        shrunk) and shared by all layers: the merge of one layer finishes
        before the next layer's split kernel runs (same stream)."""
        scratch = self._scratch
        if scratch is None or scratch[1].shape[0] < batch_size or scratch[1].shape[1:] != (heads, self.num_kv_splits) or scratch[0].shape[3] != head_dim:
            size = max(batch_size, 0 if scratch is None else scratch[1].shape[0])
            scratch = (
                torch.empty(size, heads, self.num_kv_splits, head_dim, dtype=torch.float32, device=self.device),
                torch.empty(size, heads, self.num_kv_splits, dtype=torch.float32, device=self.device),
            )
            self._scratch = scratch
        return scratch
