"""An EAGLE draft head (EAGLE-1/2) for a Llama-shaped target: one decoder
layer that reads, per position, the target's final hidden state there and
the embedding of the token that followed, and predicts the target's next
hidden state; the target's LM head turns that into a guess.

    h = fc(cat(embed(token[p + 1]), target_hidden[p]))   # [2H] -> [H]
    out = decoder_layer(h)   (no input norm in front of it, no final norm after)

Checkpoints name tensors as EAGLE's own (`fc.weight`, `layers.0...`) or with a
`model.` prefix (SGLang's); `config.json` says `LlamaForCausalLMEagle`. They
usually lack the embedding and the LM head: the loader takes the target's
(`ModelRunnerConfig.fallback_weight_paths`). Input hidden states arrive in
`ForwardBatch.spec_hidden`; the output always carries the head's own hidden
states (the next chained step's input).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.linear import Loaded, ReplicatedLinear, TPContext
from layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from layers.quantization import QuantizationConfig
from model_executor.forward_batch import ForwardBatch
from model_executor.model_config import read_rope_config
from model_executor.models.blocks import AttentionOptions, DecoderForCausalLM, DecoderLayer, GatedMLP, head_dim_of
from model_executor.models.weights import expected_checkpoint_names, load_stacked_weights
from layers.rotary import RotaryEmbedding


class EagleModel(nn.Module):
    def __init__(self, config: Any, tp: TPContext, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, tp)
        self.fc = ReplicatedLinear(2 * hidden, hidden, bool(getattr(config, "eagle_fc_bias", True)), tp,
                                   quant_config, "model.fc")
        mlp = GatedMLP(hidden, config.intermediate_size, False, tp, quant_config, "model.layers.0.mlp")
        layer = DecoderLayer(config, 0, tp, AttentionOptions(), mlp, quant_config, "model.layers.0")
        layer.input_layernorm = nn.Identity()  # EAGLE feeds fc's output to attention as is
        self.layers = nn.ModuleList([layer])
        rope = read_rope_config(config)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, rope.theta,
                                          rope.rope_type, rope.params)


class LlamaForCausalLMEagle(nn.Module):
    stacked_params = DecoderForCausalLM.stacked_params
    # Every forward reads ForwardBatch.spec_hidden (CUDA graphs give it a static buffer).
    takes_spec_hidden = True

    def __init__(self, config: Any, tp: TPContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"an EAGLE head has one decoder layer, this config says {config.num_hidden_layers}")
        tp = tp or TPContext()
        self.config = config
        # The quantization config carries the CPU packing of dense linears
        # (layers/cpu_gemm.py): an unpacked bf16 LM head costs ~3x at one row.
        self.model = EagleModel(config, tp, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, quant_config)
        self.logits_processor = LogitsProcessor()

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        if batch.spec_hidden is None:
            raise ValueError("an EAGLE head needs the target's hidden states (ForwardBatch.spec_hidden)")
        embedded = self.model.embed_tokens(batch.input_ids)
        hidden = self.model.fc(torch.cat([embedded, batch.spec_hidden.to(embedded.dtype)], dim=-1))
        rope = self.model.rotary_emb.lookup(batch.positions, hidden.dtype)
        hidden, residual = self.model.layers[0](rope, hidden, None, batch)
        hidden = hidden + residual
        out = self.logits_processor(hidden, self.lm_head, batch)
        out.hidden_states = hidden
        return out

    @staticmethod
    def _ours(name: str) -> str:
        return name if name.startswith(("model.", "lm_head.")) else f"model.{name}"

    def _skipped(self, name: str) -> bool:
        # Layer 0 has no input norm (some exports still ship its weight) and no rope buffer.
        return "rotary_emb.inv_freq" in name or name.endswith("layers.0.input_layernorm.weight")

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> set[str]:
        renamed = ((self._ours(name), tensor) for name, tensor in weights)
        return load_stacked_weights(self, renamed, self.stacked_params, self._skipped)

    def expected_checkpoint_names(self) -> set[str]:
        return expected_checkpoint_names(self, self.stacked_params, self._skipped)
