"""Qwen3-MoE: Qwen3's attention (q/k norm), routed experts without a shared
one; `mlp_only_layers` / `decoder_sparse_step` keep some layers dense."""

from __future__ import annotations

from model_executor.models.moe import MoEDecoderForCausalLM
from model_executor.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(MoEDecoderForCausalLM):
    attention_options = staticmethod(Qwen3ForCausalLM.attention_options)
