"""Mistral: the Llama decoder without biases. Sliding-window attention is not
implemented, so a checkpoint whose window is shorter than its context is
refused rather than silently attended in full past the window."""

from __future__ import annotations

from typing import Any

from layers.linear import TPContext
from layers.quantization import QuantizationConfig
from model_executor.models.blocks import DecoderForCausalLM


def refuse_sliding_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(
            f"sliding-window attention is not supported (sliding_window={window} < "
            f"max_position_embeddings={config.max_position_embeddings})"
        )


class MistralForCausalLM(DecoderForCausalLM):
    def __init__(self, config: Any, tp: TPContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        refuse_sliding_window(config)
        super().__init__(config, tp, quant_config)
