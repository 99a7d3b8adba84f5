"""Llama: the plain decoder (model_executor/models/blocks.py), with the
optional `attention_bias` (on q/k/v and o) and `mlp_bias`."""

from __future__ import annotations

from typing import Any

from model_executor.models.blocks import AttentionOptions, DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)
