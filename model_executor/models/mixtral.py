"""Mixtral: Mistral's attention, every layer sparse, top-k weights always
renormalised. Its checkpoints call the block `block_sparse_moe` and the
expert projections w1 (gate), w3 (up), w2 (down); transformers' fused layout
calls the block `mlp`, as we do."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from layers.linear import TPContext
from layers.quantization import QuantizationConfig
from model_executor.models.mistral import refuse_sliding_window
from model_executor.models.moe import MoEDecoderForCausalLM, MoESpec


class MixtralForCausalLM(MoEDecoderForCausalLM):
    expert_projections = MappingProxyType({"w1": "gate", "w3": "up", "w2": "down"})
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        every_layer = frozenset(range(config.num_hidden_layers))
        return MoESpec(config.num_local_experts, config.num_experts_per_tok, config.intermediate_size,
                       renormalize=True, sparse_layers=every_layer, dense_intermediate=config.intermediate_size)

    def __init__(self, config: Any, tp: TPContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        refuse_sliding_window(config)
        super().__init__(config, tp, quant_config)
