"""Qwen2: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def o_proj_bias(config: Any) -> bool:
        return False  # Qwen2 biases q/k/v only, whatever attention_bias says


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer

    @staticmethod
    def qkv_bias(config: Any) -> bool:
        return True
