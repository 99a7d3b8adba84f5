"""The attention input of a Llama-family layer in one native call on CPU.

From the fused qkv projection's output, `qk_norm_rope_store` applies Qwen3's
per-head q/k RMSNorm (when the model has it) and the rotary embedding, writes
k and v into the paged KV cache at this step's slots, and returns the
queries (layers/cpu_kernels/rope.inc). Unfused that is ~11 torch ops per
layer, which at batch 1 cost more in dispatch than in arithmetic. Rounding
matches the unfused bf16 path, so greedy tokens do not move.

It applies only where everything lines up: CPU, bf16 activations, weights and
KV cache, the native kernels built, and an attention backend that reads this
step's K/V from the pool (`accepts_stored_kv`). Anything else returns None
and the caller runs the torch ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from layers.cpu_kernels import native_ops

if TYPE_CHECKING:
    from layers.layernorm import RMSNorm
    from layers.radix_attention import RadixAttention
    from layers.rotary import RopeTables
    from model_executor.forward_batch import ForwardBatch


def rope_and_store(
    qkv: torch.Tensor,
    rope: RopeTables,
    layer: RadixAttention,
    batch: ForwardBatch,
    q_norm: RMSNorm | None,
    k_norm: RMSNorm | None,
) -> torch.Tensor | None:
    """Queries [T, Hq * D] with this step's K/V already stored, or None when
    the fused kernel does not apply here."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.bfloat16 or qkv.dim() != 2:
        return None
    backend = batch.attn_backend
    if backend is None or not backend.accepts_stored_kv or batch.kv_pool is None:
        return None
    ops = native_ops()
    if ops is None:
        return None
    k_cache, v_cache = batch.kv_pool.get_kv_buffer(layer.layer_id)
    if k_cache.dtype != torch.bfloat16:
        return None
    if q_norm is not None and (q_norm.weight.dtype != torch.bfloat16 or k_norm.weight.dtype != torch.bfloat16):
        return None
    return ops.qk_norm_rope_store(
        qkv,
        None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight,
        q_norm.variance_epsilon if q_norm is not None else 0.0,
        rope.cos[:, 0],
        rope.signed_sin[:, 0],
        k_cache.view(k_cache.shape[0], layer.num_kv_heads, layer.head_dim),
        v_cache.view(v_cache.shape[0], layer.num_kv_heads, layer.head_dim),
        batch.out_cache_loc,
        layer.num_heads,
        layer.num_kv_heads,
    )
