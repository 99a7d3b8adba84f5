"""Qwen2: the Llama decoder with biases on the q/k/v projections (never on o)."""

from __future__ import annotations

from typing import Any

from model_executor.models.blocks import AttentionOptions, DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True)
