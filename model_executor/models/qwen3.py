"""Qwen3: the Llama decoder with an RMSNorm on every query and key head."""

from __future__ import annotations

from typing import Any

from model_executor.models.blocks import AttentionOptions, DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
