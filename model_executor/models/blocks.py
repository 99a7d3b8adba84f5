"""Building blocks of a pre-norm decoder-only transformer (Llama, Qwen2/3, and
the MoE models that swap the MLP).

- `Attention`: fused q/k/v projection, optional per-head q/k RMSNorm (Qwen3),
  rotary, paged attention, output projection; what varies between
  architectures is an `AttentionOptions`.
- `GatedMLP`: SwiGLU with a fused gate/up projection. A model can give any
  decoder layer another MLP block (`DecoderForCausalLM.make_mlp`), e.g. a
  mixture of experts, without touching the rest.
- `DecoderLayer`, `DecoderModel` (embedding, layers, final norm, one rotary
  table), `DecoderForCausalLM` (the model plus LM head and weight loading).

Every linear layer gets its name (`prefix`) and the quantization config, which
picks its `LinearMethod` (layers/quantization).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layers.activation import SiluAndMul
from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.fused_attention_input import rope_and_store
from layers.layernorm import RMSNorm
from layers.linear import Loaded, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TPContext
from layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from layers.quantization import QuantizationConfig
from layers.radix_attention import RadixAttention
from layers.rotary import RopeTables, RotaryEmbedding, apply_rotary
from model_executor.forward_batch import ForwardBatch
from model_executor.model_config import read_rope_config
from model_executor.models.weights import StackedParam, expected_checkpoint_names, load_stacked_weights


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class AttentionOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each query and key head before rotary (Qwen3)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TPContext,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [intermediate] * 2, bias, tp, quant_config, f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, tp, quant_config, f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int, tp: TPContext, options: AttentionOptions,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        head_dim = head_dim_of(config)
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.qkv_proj = QKVParallelLinear(
            hidden, head_dim, total_heads, total_kv_heads, options.qkv_bias, tp, quant_config, f"{prefix}.qkv_proj"
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            total_heads * head_dim, hidden, options.o_bias, tp, quant_config, f"{prefix}.o_proj"
        )
        self.qk_norm = options.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attn = RadixAttention(self.num_heads, head_dim, head_dim**-0.5, self.num_kv_heads, layer_id)

    def _stacked_qk_norm_weight(self) -> torch.Tensor:
        """[Hq + Hkv, D]: q_norm's weight for query heads, k_norm's for key heads.

        Cached; rebuilt if either weight is written again (its version moves).
        """
        versions = (self.q_norm.weight._version, self.k_norm.weight._version)
        cached = getattr(self, "_qk_weight_cache", None)
        if cached is None or cached[0] != versions:
            stacked = torch.cat(
                (
                    self.q_norm.weight.expand(self.num_heads, -1),
                    self.k_norm.weight.expand(self.num_kv_heads, -1),
                )
            )
            cached = (versions, stacked)
            self._qk_weight_cache = cached
        return cached[1]

    def forward(self, rope: RopeTables, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        q = rope_and_store(qkv, rope, self.attn, batch, *norms)
        if q is not None:  # the native kernel did all of the below, K/V stored
            return self.o_proj(self.attn(q, None, None, batch, save_kv_cache=False))
        tokens = qkv.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        # q and k are rotated as one [T, Hq + Hkv, D] tensor: half the ops.
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, heads + self.num_kv_heads, head_dim)
        v = qkv[:, self.q_size + self.kv_size :]
        if self.qk_norm:
            # One norm over all q and k heads, then each head's own weight.
            qk = F.rms_norm(qk, (head_dim,), None, self.q_norm.variance_epsilon)
            qk = qk * self._stacked_qk_norm_weight()
        qk = apply_rotary(qk, rope)
        q = qk[:, :heads].reshape(tokens, self.q_size)
        k = qk[:, heads:].reshape(tokens, self.kv_size)
        return self.o_proj(self.attn(q, k, v, batch))


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, tp: TPContext, options: AttentionOptions, mlp: nn.Module,
                 quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_id, tp, options, quant_config, f"{prefix}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: RopeTables,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: Any, tp: TPContext, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope = read_rope_config(config)
        # One table for all layers; each step looks its positions up once.
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config), config.max_position_embeddings, rope.theta, rope.rope_type, rope.params
        )
        # The layers as one native call where the CPU kernels cover them
        # (model_executor/cpu_decoder_stack.py; the model runner sets it).
        self.native_stack = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.lookup(positions, hidden.dtype)
        stack = self.native_stack
        if stack is not None and stack.applies(batch):
            hidden, residual = stack(hidden, rope, batch)
        else:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(rope, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module):
    """A decoder-only LM. Architectures subclass it and override what differs:
    `attention_options` (biases, q/k norm), `make_mlp` (another MLP block,
    e.g. mixture of experts), `stacked_params` (checkpoint names fused into
    one of our parameters)."""

    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params: tuple[StackedParam, ...] = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    @staticmethod
    def attention_options(config: Any) -> AttentionOptions:
        return AttentionOptions()

    @staticmethod
    def make_mlp(config: Any, layer_id: int, tp: TPContext, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        bias = bool(getattr(config, "mlp_bias", False))
        return GatedMLP(config.hidden_size, config.intermediate_size, bias, tp, quant_config, prefix)

    def __init__(self, config: Any, tp: TPContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.config = config
        options = self.attention_options(config)
        layers = [
            DecoderLayer(config, i, tp, options, self.make_mlp(config, i, tp, quant_config, f"model.layers.{i}.mlp"),
                         quant_config, f"model.layers.{i}")
            for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, tp, layers)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp, quant_config)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_processor = LogitsProcessor()

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        hidden = self.model(batch.input_ids, batch.positions, batch)
        out = self.logits_processor(hidden, self.lm_head, batch)
        if batch.capture_hidden:
            out.hidden_states = hidden
        return out

    def _skipped(self, name: str) -> bool:
        # Some exporters save the rope buffer (we rebuild it); a tied head has no tensor of its own.
        return "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight")

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> set[str]:
        """Copy checkpoint tensors into our (fused, sharded) parameters; returns
        the checkpoint names used (see `expected_checkpoint_names`)."""
        return load_stacked_weights(self, weights, self.stacked_params, self._skipped)

    def expected_checkpoint_names(self) -> set[str]:
        """Every tensor name a complete checkpoint for this model holds."""
        return expected_checkpoint_names(self, self.stacked_params, self._skipped)
