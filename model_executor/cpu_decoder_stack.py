"""A dense Llama-family decoder's layers in one native call on CPU.

At small batches a CPU decode step is bound by streaming the weights, and
the Python between the kernels (module calls, linear methods, argument
conversion: ~9 kernel calls per layer) is time the second OpenMP thread sits
idle. `CpuDecoderStack` hands the whole layer loop to C++
(layers/cpu_kernels/decoder_stack.cpp), which runs the very kernels the
modules would, in their order and with their roundings: the hidden states
are bit-identical to the module path (tests/test_cpu_decoder_stack.py).

It is built once, after loading, where every layer lines up with what the
kernels cover: CPU bf16 weights, activations and KV cache, the native `cpu`
attention backend with the fused rope + KV store, one TP rank, a gated MLP
(not a mixture of experts), and every projection run by a native kernel
(`LinearMethod.native_form`). Anything else keeps the module path, as does a
step with more rows than some projection's native kernel serves (on AVX-512
oneDNN takes over above a few rows; below AVX-512 there is no such limit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from layers.attention.cpu_backend import CpuAttnBackend
from layers.cpu_gemm import NativeLinearForm
from layers.cpu_kernels import native_ops
from layers.linear import LinearBase
from model_executor.models.blocks import DecoderLayer, DecoderModel, GatedMLP

if TYPE_CHECKING:
    from layers.rotary import RopeTables
    from mem_cache.memory_pool import KVPool
    from model_executor.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


@dataclass
class CpuDecoderStack:
    native: object  # radixserve_cpu_kernels.DecoderStack
    backend: CpuAttnBackend  # whose per-step metadata the kernels read
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    max_rows: int  # the most rows every projection's native kernel serves
    isa: int  # the kernels' instruction-set mask

    def applies(self, batch: ForwardBatch) -> bool:
        return batch.attn_backend is self.backend and batch.input_ids.shape[0] <= self.max_rows

    def __call__(self, hidden: torch.Tensor, rope: RopeTables,
                 batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after the last layer, as the module loop leaves them."""
        assert batch.req_to_token_pool is not None
        backend = self.backend
        return self.native.forward(
            hidden, rope.cos[:, 0], rope.signed_sin[:, 0], batch.out_cache_loc, self.k_caches, self.v_caches,
            batch.req_to_token_pool.req_to_token, backend.rows, backend.prefix_lens, backend.extend_lens, self.isa,
        )


def build_cpu_decoder_stack(model: nn.Module, kv_pool: KVPool, attn_backend: object) -> CpuDecoderStack | None:
    """The native stack for `model`'s decoder, or None (with the reason at
    debug level) where some layer is not covered."""
    decoder = getattr(model, "model", None)
    why = _not_covered(decoder, kv_pool, attn_backend)
    if why is not None:
        logger.debug("CPU decoder stack off: %s", why)
        return None
    assert isinstance(decoder, DecoderModel) and isinstance(attn_backend, CpuAttnBackend)
    ops = native_ops()
    assert ops is not None
    built = [_layer_weights(ops, layer) for layer in decoder.layers]
    if any(layer is None for layer in built):
        logger.debug("CPU decoder stack off: a projection has no native kernel")
        return None
    first = decoder.layers[0].self_attn
    native = ops.DecoderStack([weights for weights, _ in built], first.num_heads, first.num_kv_heads,
                              first.head_dim, first.attn.scaling)
    buffers = [kv_pool.get_kv_buffer(layer.self_attn.attn.layer_id) for layer in decoder.layers]
    return CpuDecoderStack(native, attn_backend, [k for k, _ in buffers], [v for _, v in buffers],
                           min(rows for _, rows in built), ops.isa.kernel_mask)


def _not_covered(decoder: object, kv_pool: KVPool, attn_backend: object) -> str | None:
    if not isinstance(decoder, DecoderModel) or type(decoder).forward is not DecoderModel.forward:
        return "not a plain DecoderModel"
    if not isinstance(attn_backend, CpuAttnBackend) or not attn_backend.accepts_stored_kv:
        return "needs the native cpu attention backend with the fused rope + KV store"
    if native_ops() is None:
        return "native kernels unavailable"
    if kv_pool.dtype != torch.bfloat16 or decoder.embed_tokens.weight.dtype != torch.bfloat16:
        return "needs bf16 weights and KV cache"
    for layer in decoder.layers:
        if type(layer) is not DecoderLayer or type(layer.mlp) is not GatedMLP:
            return "a layer is not a dense decoder layer"
        if not layer.mlp.act_fn.use_native:
            return "fused ops are off"
        if layer.input_layernorm.variance_epsilon != layer.post_attention_layernorm.variance_epsilon:
            return "the layer's two norms differ in eps (the stack keeps one per layer)"
        attention = layer.self_attn
        if attention.qkv_proj.tp.size != 1:
            return "tensor parallel (the reduce runs between the kernels)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if attention.qk_norm:
            norms += [attention.q_norm, attention.k_norm]
        if any(norm.weight.dtype != torch.bfloat16 for norm in norms):
            return "needs bf16 norm weights"
    return None


def _native_linear(ops, linear: LinearBase) -> tuple[object, int] | None:
    form: NativeLinearForm | None = linear.linear_method.native_form(linear)
    if form is None:
        return None
    native = ops.NativeLinear(form.packed, form.out_features, form.bits, form.group_size, form.has_offset,
                              form.amx_min_rows)
    return native, form.max_rows


def _layer_weights(ops, layer: DecoderLayer) -> tuple[object, int] | None:
    attention, mlp = layer.self_attn, layer.mlp
    linears = [_native_linear(ops, linear)
               for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(linear is None for linear in linears):
        return None
    (qkv, qkv_rows), (o, o_rows), (gate_up, gate_up_rows), (down, down_rows) = linears
    weights = ops.DecoderLayerWeights(
        layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
        attention.q_norm.weight if attention.qk_norm else None,
        attention.k_norm.weight if attention.qk_norm else None,
        qkv, o, gate_up, down,
        attention.qkv_proj.bias, attention.o_proj.bias, mlp.gate_up_proj.bias, mlp.down_proj.bias,
        layer.input_layernorm.variance_epsilon,
        attention.q_norm.variance_epsilon if attention.qk_norm else 0.0,
    )
    return weights, min(qkv_rows, o_rows, gate_up_rows, down_rows)
