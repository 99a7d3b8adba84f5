"""Llama-family decoder, shared by the Llama, Qwen2 and Qwen3 architectures.

The three differ only in a few switches read from the config:
- Qwen2: biases on the q/k/v projections;
- Qwen3: RMSNorm on each query and key head before rotary;
- Llama: optional `attention_bias` / `mlp_bias`.

Projections are fused for speed (one GEMM for q/k/v, one for gate/up);
`load_weights` maps the checkpoint's separate tensors into them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layers.activation import SiluAndMul
from layers.fused_attention_input import rope_and_store
from layers.embedding import ParallelLMHead, VocabParallelEmbedding
from layers.layernorm import RMSNorm
from layers.checkpoint_tensor import as_tensor
from layers.linear import Loaded, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TPContext
from layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from layers.radix_attention import RadixAttention
from layers.rotary import RopeTables, RotaryEmbedding, apply_rotary
from model_executor.forward_batch import ForwardBatch
from model_executor.model_config import read_rope_config


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias, tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    # Subclasses flip these; values for plain Llama.
    qk_norm = False

    @staticmethod
    def o_proj_bias(config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def __init__(self, config: Any, layer_id: int, tp: TPContext, qkv_bias: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        head_dim = head_dim_of(config)
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, total_heads, total_kv_heads, qkv_bias, tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            total_heads * head_dim, hidden, self.o_proj_bias(config), tp
        )
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attn = RadixAttention(
            self.num_heads, head_dim, head_dim**-0.5, self.num_kv_heads, layer_id
        )

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


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: Any, layer_id: int, tp: TPContext, qkv_bias: bool) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, tp, qkv_bias)
        self.mlp = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            bool(getattr(config, "mlp_bias", False)),
            tp,
        )
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


class LlamaModel(nn.Module):
    def __init__(self, config: Any, tp: TPContext, layer_cls: type[LlamaDecoderLayer], qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            layer_cls(config, i, tp, qkv_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope = read_rope_config(config)
        # One table for all layers; each step looks its positions up once.
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config), config.max_position_embeddings, rope.theta, rope.rope_type, rope.params
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.lookup(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config: Any, tp: TPContext | None = None) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.config = config
        self.model = LlamaModel(config, tp, self.layer_cls, self.qkv_bias(config))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_processor = LogitsProcessor()

    @staticmethod
    def qkv_bias(config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        hidden = self.model(batch.input_ids, batch.positions, batch)
        return self.logits_processor(hidden, self.lm_head, batch)

    # checkpoint name fragment -> (our parameter fragment, shard id)
    stacked_params = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> set[str]:
        """Copy checkpoint tensors into our (fused, sharded) parameters.

        Returns the checkpoint names that were used, so the loader can name
        any that the checkpoint lacked (see `expected_checkpoint_names`).
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # some exporters save the rope buffer; we rebuild it
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            checkpoint_name = name
            shard_id = None
            for ckpt_part, our_part, sid in self.stacked_params:
                if f".{ckpt_part}." in name:
                    name, shard_id = name.replace(ckpt_part, our_part), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            try:
                if hasattr(owner, "weight_loader"):
                    owner.weight_loader(param, tensor.to(param.dtype), shard_id)
                else:
                    _copy_plain(param, tensor, name)
            except ValueError as err:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r}: {err}") from err
            loaded.add(checkpoint_name)
        return loaded

    def expected_checkpoint_names(self) -> set[str]:
        """Every tensor name a complete checkpoint for this model holds."""
        names: set[str] = set()
        for name, _ in self.named_parameters(remove_duplicate=False):
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            fused = [(c, o) for c, o, _ in self.stacked_params if f".{o}." in name]
            if fused:
                names.update(name.replace(ours, theirs) for theirs, ours in fused)
            else:
                names.add(name)
        return names


def _copy_plain(param: torch.Tensor, tensor: Loaded, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, expected {tuple(param.shape)}"
        )
    param.data.copy_(as_tensor(tensor))
