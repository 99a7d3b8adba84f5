"""compressed-tensors checkpoints, as llm-compressor writes them.

The config's `config_groups` give each group of layers (by `targets`: a
module type "Linear", a name, or "re:<regex>") a weight scheme and optionally
an activation scheme; `ignore` lists layers left dense. Supported:

| format | weights | activations | tensors |
| --- | --- | --- | --- |
| pack-quantized (W4A16, W8A16) | int 4/8, channel or group, sym or asym | none | `weight_packed` int32 [N, K / (32 / bits)] (values + 2^(bits-1), packed along the input dim), `weight_scale` [N, groups], `weight_zero_point` int32 [N / (32 / bits), groups] (asym; packed along the output dim), `weight_shape`, `weight_g_idx` (actorder) |
| int-quantized / naive-quantized (W8A8, W8A16) | int8, channel or tensor, symmetric | int8 per token (dynamic) or per tensor (static) | `weight` int8 [N, K], `weight_scale` [N, 1] (or one per projection), `input_scale` (static) |
| float-quantized (FP8) | e4m3, channel, tensor or block | fp8, dynamic or static | `weight` e4m3 [N, K], `weight_scale` [N, 1], scalar, or blocks, `input_scale` (static) |

Integer W8A8 multiplies int8 by int8 (kernels.Int8ActivationKernel) on every
device, so its results differ from the dequantized weights' by the rounding
of the activations. FP8 activations are quantized only where FP8 runs natively
(CUDA sm89+); elsewhere the weights are dequantized (see kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, QuantizationConfig
from layers.quantization.canonical import Canonical, Fp8Weight, IntWeight, regroup_by_index, scales_per_row, unpack_int32
from layers.quantization.fp8 import add_block_scales, expand_block_scales
from layers.quantization.quantized_method import (
    QuantizedLinearMethod,
    add_param,
    check_pack,
    checkpoint_module_names,
    input_groups,
    left_dense,
    name_matches,
    per_shard_scalar,
)

PACKED_FORMATS = ("pack-quantized",)
INT_FORMATS = ("int-quantized", "naive-quantized")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class Scheme:
    """One config group's weight (and activation) quantization."""

    fmt: str
    weight_type: str  # "int" | "float"
    bits: int
    strategy: str  # "tensor" | "channel" | "group" | "block"
    symmetric: bool
    group_size: int | None
    block: tuple[int, int] | None
    actorder: bool  # group act-order: `weight_g_idx`
    activations: str | None  # None | "dynamic" | "static"

    @classmethod
    def parse(cls, group: dict[str, Any], default_format: str) -> Scheme:
        weights = group.get("weights") or {}
        fmt = group.get("format") or default_format
        kind, bits = weights.get("type", "int"), int(weights.get("num_bits", 8))
        strategy = weights.get("strategy", "tensor")
        acts = group.get("input_activations")
        activations = None
        if acts:
            if acts.get("type", kind) != kind or int(acts.get("num_bits", 8)) != 8:
                raise ValueError(f"compressed-tensors activations {acts} are not supported (8-bit, as the weights)")
            if not acts.get("symmetric", True):
                raise ValueError("asymmetric activation quantization is not supported")
            activations = "dynamic" if acts.get("dynamic", False) else "static"
        block = weights.get("block_structure")
        scheme = cls(fmt, kind, bits, strategy, bool(weights.get("symmetric", True)), weights.get("group_size"),
                     None if block is None else (int(block[0]), int(block[1])),
                     weights.get("actorder") == "group", activations)
        scheme.check()
        return scheme

    def check(self) -> None:
        supported = (
            (self.fmt in PACKED_FORMATS and self.weight_type == "int" and self.bits in (4, 8)
             and self.strategy in ("channel", "group") and self.activations is None)
            or (self.fmt in INT_FORMATS and self.weight_type == "int" and self.bits == 8 and self.symmetric
                and self.strategy in ("channel", "tensor"))
            or (self.fmt in FLOAT_FORMATS and self.weight_type == "float" and self.bits == 8
                and self.strategy in ("channel", "tensor", "block"))
        )
        if not supported:
            raise ValueError(f"compressed-tensors scheme not supported: {self}")
        if self.strategy == "group" and not self.group_size:
            raise ValueError("compressed-tensors group strategy without a group_size")


@dataclass(frozen=True)
class CompressedTensorsConfig(QuantizationConfig):
    # (targets, scheme) in config order; the first group whose targets match wins
    groups: tuple[tuple[tuple[str, ...], Scheme], ...]
    ignore: tuple[str, ...] = ()
    cpu_pack: Any = None
    name: str = field(default="compressed-tensors", init=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], cpu_pack: Any = None) -> CompressedTensorsConfig:
        default_format = config.get("format", "pack-quantized")
        groups = tuple(
            (tuple(group.get("targets") or ("Linear",)), Scheme.parse(group, default_format))
            for group in (config.get("config_groups") or {}).values()
        )
        if not groups:
            raise ValueError("compressed-tensors config has no config_groups")
        return cls(groups, tuple(config.get("ignore") or ()), cpu_pack)

    def scheme_for(self, prefix: str) -> Scheme | None:
        names = checkpoint_module_names(prefix)
        for targets, scheme in self.groups:
            if any(t == "Linear" or name_matches(n, t) for n in names for t in targets):
                return scheme
        return None

    def linear_method(self, prefix: str) -> LinearMethod:
        scheme = self.scheme_for(prefix)
        if scheme is None or left_dense(prefix, self.ignore):
            return self.unquantized_method()
        return CompressedTensorsLinearMethod(scheme, prefix, self.cpu_pack)

    def describe(self) -> dict[str, Any]:
        schemes = [{"format": s.fmt, "weights": f"{s.weight_type}{s.bits}", "strategy": s.strategy,
                    "group_size": s.group_size, "activations": s.activations} for _, s in self.groups]
        return {"quantization": self.name, "schemes": schemes}


class CompressedTensorsLinearMethod(QuantizedLinearMethod):
    def __init__(self, scheme: Scheme, prefix: str, cpu_pack: Any) -> None:
        super().__init__(prefix, cpu_pack)
        self.scheme = scheme
        self.int8_activations = scheme.weight_type == "int" and scheme.activations is not None

    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        s = self.scheme
        if s.fmt in PACKED_FORMATS:
            self._create_packed(layer, in_features, out_features)
        else:
            dtype = torch.int8 if s.weight_type == "int" else torch.float8_e4m3fn
            add_param(layer, "weight", (out_features, in_features), dtype, output_dim=0, input_dim=1)
            self._create_scale(layer, in_features, out_features)
        if s.activations == "static":
            per_shard_scalar(layer, "input_scale")

    def _create_scale(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        s = self.scheme
        if s.strategy == "tensor":
            per_shard_scalar(layer, "weight_scale")
        elif s.strategy == "channel":
            add_param(layer, "weight_scale", (out_features, 1), torch.float32, output_dim=0)
        else:
            add_block_scales(layer, self.prefix, "weight_scale", in_features, out_features, s.block)

    def _create_packed(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        s = self.scheme
        per_word = 32 // s.bits
        groups = input_groups(layer, self.prefix, in_features, s.group_size if s.strategy == "group" else -1,
                              s.actorder)
        check_pack(self.prefix, "input features", in_features, per_word)
        group_dims = {"output_dim": 0, "input_dim": 1} if groups.sharded else {"output_dim": 0}
        add_param(layer, "weight_packed", (out_features, in_features // per_word), torch.int32,
                  output_dim=0, input_dim=1)
        add_param(layer, "weight_scale", (out_features, groups.count), torch.float32, **group_dims)
        # each projection's full [N, K], checked against what was loaded
        add_param(layer, "weight_shape", (len(layer.output_shard_sizes), 2), torch.int64, shard_scalar=True)
        if not s.symmetric:
            for shard in layer.output_shard_sizes:
                check_pack(self.prefix, "output features of a projection", shard, per_word)
            add_param(layer, "weight_zero_point", (out_features // per_word, groups.count), torch.int32,
                      **group_dims)
        if s.actorder:
            add_param(layer, "weight_g_idx", (in_features,), torch.int32, input_dim=0)
        layer.ct_group_size = groups.size

    def random_form(self, layer: nn.Module) -> tuple[str, int, int]:
        s = self.scheme
        if s.fmt in PACKED_FORMATS:
            return "int", s.bits, min(layer.ct_group_size, layer.in_features)
        group = s.block[1] if s.strategy == "block" else layer.in_features
        return ("int" if s.weight_type == "int" else "fp8"), 8, group

    def canonical(self, layer: nn.Module) -> Canonical:
        s = self.scheme
        if s.fmt in PACKED_FORMATS:
            return self._packed_canonical(layer)
        weight = layer.weight.data
        n, k = weight.shape
        if s.strategy == "tensor":
            scale = scales_per_row(layer.weight_scale.data, layer.output_shard_sizes)
        elif s.strategy == "channel":
            scale = layer.weight_scale.data.float()
        else:
            bn, bk = s.block
            return Fp8Weight(weight, expand_block_scales(layer.weight_scale.data, bn, bk, n, k), bk)
        if s.weight_type == "float":
            return Fp8Weight(weight, scale.contiguous(), k)
        return IntWeight(weight.contiguous(), scale.contiguous(), None, k, 8)

    def _packed_canonical(self, layer: nn.Module) -> Canonical:
        s = self.scheme
        center = 1 << (s.bits - 1)
        q = (unpack_int32(layer.weight_packed.data, s.bits, dim=1) - center).to(torch.int8)
        n = q.shape[0]
        shapes = layer.weight_shape.data.tolist()
        expected_k = q.shape[1] * (layer.tp.size if layer.input_sharded else 1)
        # (TP shards' rows are checked by the loaders; at tp 1 they are these.)
        rows_ok = layer.tp.size > 1 or [rows for rows, _ in shapes] == layer.output_shard_sizes
        if any(cols != expected_k for _, cols in shapes) or not rows_ok:
            raise ValueError(f"{self.prefix}: weight_shape {shapes} does not match the packed weight "
                             f"({layer.output_shard_sizes} rows, {expected_k} columns)")
        scale = layer.weight_scale.data.float()
        offset = None
        if not s.symmetric:
            zero = unpack_int32(layer.weight_zero_point.data, s.bits, dim=0)[:n] - center
            offset = -zero.float() * scale
        if s.actorder:
            return regroup_by_index(q, scale, offset, layer.weight_g_idx.data, s.bits)
        return IntWeight(q.contiguous(), scale.contiguous(), offset, layer.ct_group_size, s.bits)

    def input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        if self.scheme.activations != "static":
            return None
        return layer.input_scale.data.max().float()
