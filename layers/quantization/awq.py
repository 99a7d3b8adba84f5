"""AWQ checkpoints, 4-bit GEMM layout (llm-awq / AutoAWQ `version: gemm`).

Per linear layer of K inputs and N outputs:
- `qweight` int32 [K, N / 8]: eight outputs per word, in AWQ's interleaved
  order (word slot i holds output 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]);
- `qzeros` int32 [groups, N / 8], packed the same way; `scales` [groups, N].
w[n, k] = (q[k, n] - zero[g, n]) * scale[g, n], g = k // group_size.

TP cuts the output dim (column-parallel) or the input dim and its groups
(row-parallel), refused where that splits a group or an int32 word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, QuantizationConfig
from layers.quantization.canonical import Canonical, IntWeight, unpack_int32
from layers.quantization.quantized_method import (
    QuantizedLinearMethod,
    add_param,
    check_groups,
    check_pack,
    left_dense,
)

# Slot of each of a word's eight outputs: output j sits in slot AWQ_SLOTS[j].
AWQ_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4
PER_WORD = 32 // BITS


@dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    group_size: int
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()
    cpu_pack: Any = None
    name: str = field(default="awq", init=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], cpu_pack: Any = None) -> AWQConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != BITS:
            raise ValueError(f"AWQ with {bits} bits is not supported (4)")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        return cls(
            group_size=int(config.get("group_size", config.get("q_group_size", 128))),
            zero_point=bool(config.get("zero_point", True)),
            modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()),
            cpu_pack=cpu_pack,
        )

    def linear_method(self, prefix: str) -> LinearMethod:
        if left_dense(prefix, self.modules_to_not_convert):
            return self.unquantized_method()
        return AWQLinearMethod(self, prefix)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.name, "bits": BITS, "group_size": self.group_size}


class AWQLinearMethod(QuantizedLinearMethod):
    def __init__(self, config: AWQConfig, prefix: str) -> None:
        super().__init__(prefix, config.cpu_pack)
        self.config = config

    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        group = self.config.group_size
        check_groups(layer, self.prefix, in_features, group)
        for shard in layer.output_shard_sizes:
            check_pack(self.prefix, "output features of a projection", shard, PER_WORD)
        groups = in_features // group
        add_param(layer, "qweight", (in_features, out_features // PER_WORD), torch.int32, output_dim=1, input_dim=0)
        add_param(layer, "qzeros", (groups, out_features // PER_WORD), torch.int32, output_dim=1, input_dim=0)
        add_param(layer, "scales", (groups, out_features), torch.float32, output_dim=1, input_dim=0)

    def random_form(self, layer: nn.Module) -> tuple[str, int, int]:
        return "int", BITS, self.config.group_size

    def canonical(self, layer: nn.Module) -> Canonical:
        q = unpack_int32(layer.qweight.data, BITS, dim=1, order=AWQ_SLOTS).t()  # [N, K]
        zeros = unpack_int32(layer.qzeros.data, BITS, dim=1, order=AWQ_SLOTS).t()  # [N, groups]
        scale = layer.scales.data.t().float()
        center = 1 << (BITS - 1)
        offset = None if bool((zeros == center).all()) else (center - zeros).float() * scale
        return IntWeight((q - center).to(torch.int8).contiguous(), scale.contiguous(),
                         None if offset is None else offset.contiguous(), self.config.group_size, BITS)
