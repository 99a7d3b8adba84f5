"""Reference attention over the paged KV cache, built on torch SDPA.

Runs on any device; CPU tests and the other backends' parity tests use it.

Every step is one padded SDPA call per layer: the new tokens' queries are
scattered into [B, max_new, H, D]; each sequence's keys/values (cached prefix
and the tokens just written) are gathered from the pool through
`req_to_token` into [B, max_len, H_kv, D]; a boolean mask allows key j for
query i of sequence b iff j <= prefix_len[b] + i and j < seq_len[b]. Decode is
the max_new == 1 case, and reads its keys from `DecodeKVStaging` while the
same batch keeps decoding. Indices and masks are built once per step and
shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from layers.attention.base import AttentionBackend
from layers.attention.decode_staging import DecodeKVStaging

if TYPE_CHECKING:
    from layers.radix_attention import RadixAttention
    from model_executor.forward_batch import ForwardBatch

DEFAULT_STAGING_BYTES = 512 << 20


@dataclass
class _StepMetadata:
    kv_slots: torch.Tensor  # [B, max_len] pool slots, padded with slot 0
    mask: torch.Tensor  # [B, 1, max_new, max_len] bool, True = attend
    token_batch: torch.Tensor  # [num_tokens] which sequence each new token is in
    token_offset: torch.Tensor  # [num_tokens] its index among that sequence's new tokens
    max_len: int
    max_new: int
    decode_bias: torch.Tensor | None = None  # additive form of `mask`, built on first decode use


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, staging_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        self.metadata: _StepMetadata | None = None
        self.staging = DecodeKVStaging(staging_bytes)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        device = batch.seq_lens.device
        max_len = max(batch.seq_lens_cpu)
        max_new = max(batch.extend_seq_lens_cpu)
        assert batch.req_to_token_pool is not None
        columns = torch.arange(max_len, device=device)
        in_sequence = columns.unsqueeze(0) < batch.seq_lens.unsqueeze(1)  # [B, max_len]
        rows = batch.req_to_token_pool.req_to_token[batch.req_pool_indices, :max_len]
        kv_slots = torch.where(in_sequence, rows.to(torch.int64), 0)

        new_index = torch.arange(max_new, device=device)
        query_pos = batch.extend_prefix_lens.unsqueeze(1) + new_index.unsqueeze(0)  # [B, max_new]
        mask = columns.view(1, 1, max_len) <= query_pos.unsqueeze(2)
        mask &= in_sequence.unsqueeze(1)
        # Padding query rows attend to key 0 only, so softmax stays finite;
        # their outputs are never read.
        mask[:, :, 0] = True

        token_batch = torch.repeat_interleave(
            torch.arange(batch.batch_size, device=device), batch.extend_seq_lens
        )
        starts = torch.cumsum(batch.extend_seq_lens, 0) - batch.extend_seq_lens
        token_offset = torch.arange(batch.num_tokens, device=device) - starts[token_batch]
        self.metadata = _StepMetadata(
            kv_slots=kv_slots,
            mask=mask.unsqueeze(1),
            token_batch=token_batch,
            token_offset=token_offset,
            max_len=max_len,
            max_new=max_new,
        )
        if batch.forward_mode.is_decode():
            self.staging.begin_decode_step(
                batch.req_pool_indices_cpu, batch.seq_lens_cpu, batch.seq_lens
            )
        else:
            self.staging.reset()

    def forward_extend(self, q, k, v, layer, batch, save_kv_cache=True):
        meta = self._write_kv(k, v, layer, batch, save_kv_cache)
        keys, values = self._gather(layer, batch)
        head_dim = layer.head_dim
        queries = q.new_zeros(batch.batch_size, meta.max_new, layer.num_heads, head_dim)
        queries[meta.token_batch, meta.token_offset] = q.view(-1, layer.num_heads, head_dim)
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2).to(keys.dtype),
            keys,
            values,
            attn_mask=meta.mask,
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [B, H, max_new, D]
        out = out.transpose(1, 2)[meta.token_batch, meta.token_offset]
        return out.reshape(-1, layer.num_heads * head_dim).to(q.dtype)

    def forward_decode(self, q, k, v, layer, batch, save_kv_cache=True):
        """One query per sequence: each KV head's query heads are folded into
        the query-length axis ([B, H_kv, group, D]) so SDPA needs no GQA
        expansion, with an additive float mask (both measurably faster on CPU)."""
        meta = self._write_kv(k, v, layer, batch, save_kv_cache)
        staged = None
        if save_kv_cache:
            staged = self.staging.layer_kv(
                layer.layer_id,
                lambda: self._gather(layer, batch),
                k.view(-1, layer.num_kv_heads, layer.head_dim),
                v.view(-1, layer.num_kv_heads, layer.head_dim),
                meta.max_len,
            )
        keys, values = staged if staged is not None else self._gather(layer, batch)
        batch_size, group = batch.batch_size, layer.num_heads // layer.num_kv_heads
        queries = q.view(batch_size, layer.num_kv_heads, group, layer.head_dim).to(keys.dtype)
        if meta.decode_bias is None or meta.decode_bias.dtype != keys.dtype:
            meta.decode_bias = torch.zeros(
                meta.mask.shape, dtype=keys.dtype, device=keys.device
            ).masked_fill_(~meta.mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.decode_bias, scale=layer.scaling
        )  # [B, H_kv, group, D]; head h = kv_head * group + g, as GQA defines it
        return out.reshape(batch_size, layer.num_heads * layer.head_dim).to(q.dtype)

    def _write_kv(self, k, v, layer: RadixAttention, batch: ForwardBatch, save: bool) -> _StepMetadata:
        meta = self.metadata
        assert meta is not None and batch.kv_pool is not None
        if save:
            batch.kv_pool.set_kv_buffer(
                layer.layer_id,
                batch.out_cache_loc,
                k.view(-1, layer.num_kv_heads, layer.head_dim),
                v.view(-1, layer.num_kv_heads, layer.head_dim),
            )
        return meta

    def _gather(self, layer: RadixAttention, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's keys and values from the pool: [B, H_kv, max_len, D]."""
        assert self.metadata is not None and batch.kv_pool is not None
        k_cache, v_cache = batch.kv_pool.get_kv_buffer(layer.layer_id)
        return _gather_slots(k_cache, self.metadata.kv_slots), _gather_slots(v_cache, self.metadata.kv_slots)


def _gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_slots, H, D], slots [B, L] -> [B, H, L, D].

    An embedding lookup on the flattened rows: ~3x faster on CPU than
    advanced indexing with a 2-D index.
    """
    num_slots, heads, head_dim = cache.shape
    rows = F.embedding(slots, cache.view(num_slots, heads * head_dim))
    return rows.view(*slots.shape, heads, head_dim).transpose(1, 2)
