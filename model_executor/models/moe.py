"""Mixture-of-experts decoders: the dense decoder with some layers' MLP
replaced by a sparse block (a router, routed experts, optionally a shared
expert), and the checkpoint names of the experts.

Architectures (qwen3_moe.py, qwen2_moe.py, mixtral.py) say how their config
reads (`moe_spec`), what their expert projections are called and what
checkpoint paths to rename; loading both expert layouts, the expected-name
check and the per-expert load counts are shared here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from layers.linear import Loaded, ReplicatedLinear, TPContext
from layers.moe.layer import FusedMoE
from layers.moe.load_stats import ExpertLoadRecorder
from layers.quantization import DenseConfig, QuantizationConfig
from model_executor.models.blocks import DecoderForCausalLM, GatedMLP
from model_executor.models.weights import load_stacked_weights

# "<layer>.mlp.experts.<e>.<projection>.weight" or the fused "<layer>.mlp.experts.gate_up_proj" / ".down_proj".
EXPERT_TENSOR = re.compile(
    r"^(?P<experts>.+\.experts)\.(?:(?P<expert>\d+)\.(?P<projection>[^.]+)\.weight|(?P<fused>gate_up_proj|down_proj))$"
)


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    expert_intermediate: int
    renormalize: bool  # rescale the top-k weights to sum to 1
    sparse_layers: frozenset[int]  # the others keep a dense MLP of `dense_intermediate`
    dense_intermediate: int
    shared_expert_intermediate: int = 0  # 0: no shared expert

    @classmethod
    def qwen(cls, config: Any) -> MoESpec:
        """Qwen2-MoE / Qwen3-MoE: `mlp_only_layers` and every
        `decoder_sparse_step`-th layer decide which layers are sparse."""
        dense_only = set(getattr(config, "mlp_only_layers", None) or ())
        step = getattr(config, "decoder_sparse_step", 1) or 1
        sparse = frozenset(
            i for i in range(config.num_hidden_layers)
            if i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0
        )
        return cls(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                   bool(getattr(config, "norm_topk_prob", False)), sparse, config.intermediate_size,
                   int(getattr(config, "shared_expert_intermediate_size", 0) or 0))


class SparseMoeBlock(nn.Module):
    """Router, routed experts and (Qwen2-MoE) a shared expert whose output a
    sigmoid gate scales; one all-reduce combines the ranks' experts."""

    def __init__(self, hidden: int, spec: MoESpec, tp: TPContext, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.tp = tp
        # The router stays dense under every format (checkpoints leave it out),
        # packed for the CPU kernels where the model's linears are: a plain
        # bf16 GEMM of 8 outputs costs ~5x the packed one on CPU.
        router_config = DenseConfig(cpu_pack=quant_config.cpu_pack if quant_config is not None else None)
        self.gate = ReplicatedLinear(hidden, spec.num_experts, False, tp, router_config, f"{prefix}.gate")
        self.experts = FusedMoE(spec.num_experts, spec.top_k, hidden, spec.expert_intermediate, spec.renormalize,
                                tp, quant_config, f"{prefix}.experts")
        self.shared_expert = None
        if spec.shared_expert_intermediate:
            self.shared_expert = GatedMLP(hidden, spec.shared_expert_intermediate, False, tp, quant_config,
                                          f"{prefix}.shared_expert")
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, False, tp, router_config,
                                                       f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.reduce(self.experts(x, self.gate(x)))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoEDecoderForCausalLM(DecoderForCausalLM):
    # checkpoint projection name -> ours (gate / up / down)
    expert_projections: Mapping[str, str] = MappingProxyType({"gate_proj": "gate", "up_proj": "up",
                                                               "down_proj": "down"})
    # (checkpoint path fragment, ours), applied before anything else
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        return MoESpec.qwen(config)

    def make_mlp(self, config: Any, layer_id: int, tp: TPContext, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        spec = self.moe_spec(config)
        if layer_id in spec.sparse_layers:
            return SparseMoeBlock(config.hidden_size, spec, tp, quant_config, prefix)
        return GatedMLP(config.hidden_size, spec.dense_intermediate, False, tp, quant_config, prefix)

    def __init__(self, config: Any, tp: TPContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config, tp, quant_config)
        self.moe_layers = {name: module for name, module in self.named_modules() if isinstance(module, FusedMoE)}
        layers = [(i, layer.mlp.experts) for i, layer in enumerate(self.model.layers)
                  if isinstance(layer.mlp, SparseMoeBlock)]
        self.expert_load = ExpertLoadRecorder(layers) if layers else None

    # -- checkpoint names --------------------------------------------------------

    def _renamed(self, name: str) -> str:
        for theirs, ours in self.checkpoint_renames:
            name = name.replace(theirs, ours)
        return name

    def _expert_names(self, experts: str, projections: Iterable[str]) -> set[str]:
        total = self.moe_layers[experts].placement.total
        theirs = [name for name, ours in self.expert_projections.items() if ours in projections]
        return {f"{experts}.{e}.{name}.weight" for e in range(total) for name in theirs}

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> set[str]:
        """Expert tensors (either layout) go to their `FusedMoE`; the rest load
        as in a dense model. Returns the names used, a fused tensor counting as
        every per-expert tensor it holds."""
        used: set[str] = set()

        def not_experts() -> Iterator[tuple[str, Loaded]]:
            for checkpoint_name, tensor in weights:
                name = self._renamed(checkpoint_name)
                match = EXPERT_TENSOR.match(name)
                if match is None:
                    yield name, tensor
                    continue
                try:
                    used.update(self._load_expert(match, tensor))
                except ValueError as err:
                    raise ValueError(f"checkpoint tensor {checkpoint_name!r}: {err}") from err

        return load_stacked_weights(self, not_experts(), self.stacked_params, self._skipped) | used

    def _load_expert(self, match: re.Match, tensor: Loaded) -> set[str]:
        moe = self.moe_layers.get(match["experts"])
        if moe is None:
            raise ValueError("has no matching model parameter (no MoE layer there)")
        if match["fused"] == "gate_up_proj":
            moe.load_fused_tensor("gate_up", tensor)
            return self._expert_names(match["experts"], ("gate", "up"))
        if match["fused"] == "down_proj":
            moe.load_fused_tensor("down", tensor)
            return self._expert_names(match["experts"], ("down",))
        projection = self.expert_projections.get(match["projection"])
        if projection is None:
            raise ValueError(f"unknown expert projection {match['projection']!r}; expected one of "
                             f"{', '.join(self.expert_projections)}")
        moe.load_expert_tensor(int(match["expert"]), projection, tensor)
        return {match.string}

    def expected_checkpoint_names(self) -> set[str]:
        names = {name for name in super().expected_checkpoint_names()
                 if not any(name.startswith(f"{experts}.") for experts in self.moe_layers)}
        for experts in self.moe_layers:
            names |= self._expert_names(experts, ("gate", "up", "down"))
        return names
