"""A mixture-of-experts layer's experts, split over the TP group.

`FusedMoE` holds this rank's experts (`ExpertPlacement`, from the group's
`ep_size`), each cut along its intermediate dim over the `moe_tp_size` ranks
that share it, and returns this rank's part of the output; the caller
all-reduces, as after a dense MLP. The router runs outside (its weight is
the model's `gate`), so the layer takes the router logits.

Checkpoints store the experts two ways, both loaded here:
- one tensor per expert and projection (`experts.3.gate_proj.weight`, ...):
  `load_expert_tensor`;
- all experts fused, as newer transformers saves them
  (`experts.gate_up_proj` [E, 2I, H], gate rows first; `experts.down_proj`
  [E, H, I]): `load_fused_tensor`.
"""

from __future__ import annotations

import torch
from torch import nn

from layers.activation import SiluAndMul
from layers.checkpoint_tensor import as_tensor
from layers.linear import Loaded, TPContext
from layers.moe.dispatch import ExpertPlacement
from layers.moe.router import select_experts
from layers.quantization import DenseConfig, QuantizationConfig

PROJECTIONS = ("gate", "up", "down")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool,
                 tp: TPContext, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if intermediate % tp.moe_tp_size:
            raise ValueError(f"the expert intermediate size {intermediate} does not divide evenly over "
                             f"{tp.moe_tp_size} ranks per expert (tp_size {tp.size} / ep_size {tp.ep_size})")
        self.placement = ExpertPlacement.for_rank(num_experts, tp.ep_rank, tp.ep_size)
        self.tp = tp
        self.top_k = top_k
        self.renormalize = renormalize
        self.hidden = hidden
        self.full_intermediate = intermediate
        self.intermediate = intermediate // tp.moe_tp_size
        self.act_fn = SiluAndMul()
        self.moe_method = (quant_config or DenseConfig()).moe_method(prefix)
        self.moe_method.create_weights(self, self.num_local_experts, hidden, self.intermediate,
                                       torch.get_default_dtype())
        # Tokens routed to each (global) expert since the last step ended;
        # an ExpertLoadRecorder may replace it with a row of its own table.
        self.step_counts = torch.zeros(num_experts, dtype=torch.int64)

    @property
    def num_local_experts(self) -> int:
        return self.placement.count

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's part of the output (to be all-reduced over the TP group)."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        # scatter_add_, not bincount: no host sync, so CUDA graphs can capture it.
        self.step_counts.scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
        return self.moe_method.apply(self, hidden, weights, self.placement.to_local(ids))

    # -- loading ---------------------------------------------------------------

    def _rows(self, projection: str) -> tuple[str, int]:
        """(parameter, first row there) of a projection's shard in each expert."""
        if projection == "down":
            return "w2_weight", 0
        return "w13_weight", 0 if projection == "gate" else self.intermediate

    def _shard(self, loaded: Loaded, projection: str, dim_offset: int) -> torch.Tensor:
        """This rank's slice of one expert's projection (`dim_offset`: 1 when
        `loaded` still has the expert dim in front)."""
        # gate/up [I, H]: rows are the intermediate dim; down [H, I]: columns.
        dim = dim_offset + (1 if projection == "down" else 0)
        size = self.intermediate
        if loaded.shape[dim] != self.full_intermediate:
            raise ValueError(f"expected {self.full_intermediate} intermediate features along dim {dim}, "
                             f"got shape {tuple(loaded.shape)}")
        return loaded.narrow(dim, self.tp.moe_tp_rank * size, size)

    def _check_hidden(self, piece: torch.Tensor, projection: str) -> None:
        hidden_dim = -1 if projection != "down" else -2
        if piece.shape[hidden_dim] != self.hidden:
            raise ValueError(f"expected hidden size {self.hidden}, got shape {tuple(piece.shape)}")

    def load_expert_tensor(self, expert: int, projection: str, loaded: Loaded) -> None:
        """One expert's gate / up / down weight, [I, H] or [H, I] (global expert id)."""
        if not 0 <= expert < self.placement.total:
            raise ValueError(f"expert {expert} is out of range: the model has {self.placement.total}")
        if not self.placement.holds(expert):
            return  # another rank's expert
        if loaded.dim() != 2:
            raise ValueError(f"expected a 2-D expert weight, got shape {tuple(loaded.shape)}")
        piece = as_tensor(self._shard(loaded, projection, 0))
        self._check_hidden(piece, projection)
        name, first = self._rows(projection)
        target = getattr(self, name).data[expert - self.placement.first]
        if projection != "down":
            target = target[first : first + self.intermediate]
        target.copy_(piece)

    def load_fused_tensor(self, projection: str, loaded: Loaded) -> None:
        """All experts at once: "gate_up" [E, 2I, H] or "down" [E, H, I]."""
        if loaded.dim() != 3 or loaded.shape[0] != self.placement.total:
            raise ValueError(f"expected [{self.placement.total}, ...] fused expert weights, got shape "
                             f"{tuple(loaded.shape)}")
        mine = as_tensor(loaded.narrow(0, self.placement.first, self.placement.count))  # reads only ours
        if projection == "down":
            parts = {"down": mine}
        else:
            if mine.shape[1] != 2 * self.full_intermediate:
                raise ValueError(f"expected {2 * self.full_intermediate} gate+up rows, got shape "
                                 f"{tuple(loaded.shape)}")
            parts = {"gate": mine[:, : self.full_intermediate], "up": mine[:, self.full_intermediate :]}
        for part, value in parts.items():
            piece = self._shard(value, part, 1)
            self._check_hidden(piece, part)
            name, first = self._rows(part)
            target = getattr(self, name).data
            if part != "down":
                target = target[:, first : first + self.intermediate]
            target.copy_(piece)
