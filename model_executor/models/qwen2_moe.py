"""Qwen2-MoE: Qwen2's attention (q/k/v biases), routed experts plus a shared
expert scaled by a sigmoid gate."""

from __future__ import annotations

from typing import Any

from model_executor.models.blocks import AttentionOptions
from model_executor.models.moe import MoEDecoderForCausalLM


class Qwen2MoeForCausalLM(MoEDecoderForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        return AttentionOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)))
