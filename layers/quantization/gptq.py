"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4 or 8 bits.

Per linear layer of K inputs and N outputs, with `pack` = 32 // bits:
- `qweight` int32 [K / pack, N]: values packed along the input dim;
- `qzeros` int32 [groups, N / pack]: zero points packed along the output
  dim, stored minus one in the original ("v1") convention;
- `scales` [groups, N]; `g_idx` int32 [K]: each input column's group, which
  `desc_act` (act-order) checkpoints permute.
w[n, k] = (q[k, n] - zero[g, n]) * scale[g, n], g = g_idx[k].

TP: column-parallel layers cut the output dim of every tensor; row-parallel
layers cut the input dim (`qweight`, `g_idx`, and the groups of `scales` and
`qzeros`), refused where that splits a group. With `desc_act` a row shard's
columns may belong to any group, so it keeps every group's scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, QuantizationConfig
from layers.quantization.canonical import Canonical, IntWeight, regroup_by_index, unpack_int32
from layers.quantization.quantized_method import (
    QuantizedLinearMethod,
    add_param,
    check_pack,
    input_groups,
    left_dense,
)


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    bits: int
    group_size: int  # -1: one group over the whole input dim
    desc_act: bool
    zero_point_minus_one: bool = True  # the v1 convention; gptq_v2 stores zeros as they are
    modules_to_not_convert: tuple[str, ...] = ()
    cpu_pack: Any = None
    name: str = field(default="gptq", init=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], cpu_pack: Any = None) -> GPTQConfig:
        bits = int(config.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits} bits is not supported (4 or 8)")
        return cls(
            bits=bits,
            group_size=int(config.get("group_size", 128)),
            desc_act=bool(config.get("desc_act", False)),
            zero_point_minus_one=config.get("checkpoint_format", "gptq") != "gptq_v2",
            modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()),
            cpu_pack=cpu_pack,
        )

    def linear_method(self, prefix: str) -> LinearMethod:
        if left_dense(prefix, self.modules_to_not_convert):
            return self.unquantized_method()
        return GPTQLinearMethod(self, prefix)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.name, "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act}


class GPTQLinearMethod(QuantizedLinearMethod):
    def __init__(self, config: GPTQConfig, prefix: str) -> None:
        super().__init__(prefix, config.cpu_pack)
        self.config = config

    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        bits, pack = self.config.bits, 32 // self.config.bits
        groups = input_groups(layer, self.prefix, in_features, self.config.group_size, self.config.desc_act)
        check_pack(self.prefix, "input features", in_features, pack)
        check_pack(self.prefix, "output features", out_features, pack)
        for shard in layer.output_shard_sizes:
            check_pack(self.prefix, "output features of a fused projection", shard, pack)
        group_dims = {"output_dim": 1, "input_dim": 0} if groups.sharded else {"output_dim": 1}
        add_param(layer, "qweight", (in_features // pack, out_features), torch.int32, output_dim=1, input_dim=0)
        add_param(layer, "qzeros", (groups.count, out_features // pack), torch.int32, **group_dims)
        add_param(layer, "scales", (groups.count, out_features), torch.float32, **group_dims)
        add_param(layer, "g_idx", (in_features,), torch.int32, input_dim=0)
        layer.gptq_group_size = groups.size
        layer.gptq_bits = bits

    def random_form(self, layer: nn.Module) -> tuple[str, int, int]:
        return "int", layer.gptq_bits, min(layer.gptq_group_size, layer.in_features)

    def canonical(self, layer: nn.Module) -> Canonical:
        bits = layer.gptq_bits
        q = unpack_int32(layer.qweight.data, bits, dim=0).t()  # [N, K], 0 .. 2^bits - 1
        zeros = unpack_int32(layer.qzeros.data, bits, dim=1).t()  # [N, groups]
        if self.config.zero_point_minus_one:
            # v1 stored zero - 1, and its 4-bit packing wrapped 0 - 1 to 15.
            zeros = (zeros + 1) & ((1 << bits) - 1)
        scale = layer.scales.data.t().float()
        center = 1 << (bits - 1)
        signed = (q - center).to(torch.int8)
        offset = None if bool((zeros == center).all()) else (center - zeros).float() * scale
        if self.config.desc_act:
            return regroup_by_index(signed, scale, offset, layer.g_idx.data, bits)
        return IntWeight(signed.contiguous(), scale.contiguous(),
                         None if offset is None else offset.contiguous(), layer.gptq_group_size, bits)
