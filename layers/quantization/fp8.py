"""FP8 (e4m3) checkpoints, `quant_method: fp8`, and FP8 weights in general.

Two scale layouts:
- per tensor (vLLM / older llm-compressor output): `weight_scale`, one fp32
  scalar per checkpoint projection (a fused q/k/v layer holds three);
- block-wise (Qwen3-*-FP8, DeepSeek-V3; `weight_block_size` [bn, bk]):
  `weight_scale_inv` fp32 [ceil(N / bn), ceil(K / bk)], one per block.
w = weight * scale. `activation_scheme: static` adds `input_scale` scalars
(one activation scale per projection; a fused layer uses their maximum, so
no input overflows); dynamic scales activations per token at run time.

TP cuts the weight and, for blocks, the block scales; a split that cuts a
block is refused. See kernels.py for which device runs what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, QuantizationConfig
from layers.quantization.canonical import Canonical, Fp8Weight, scales_per_row
from layers.quantization.quantized_method import QuantizedLinearMethod, add_param, left_dense, per_shard_scalar


def add_block_scales(layer: nn.Module, prefix: str, name: str, in_features: int, out_features: int,
                     block: tuple[int, int]) -> None:
    """Register one fp32 scale per [bn, bk] weight block. One projection on
    one rank may end in a partial block; anything cut (fused projections, TP
    shards) must cut at block edges."""
    bn, bk = block
    sizes = layer.output_shard_sizes
    on_tp = f" (tp_size {layer.tp.size})" if layer.tp.size > 1 else ""
    if (len(sizes) > 1 or layer.tp.size > 1) and any(s % bn for s in sizes):
        raise ValueError(f"{prefix}: output sizes {sizes} per rank are not multiples of the FP8 block {bn}{on_tp}")
    if in_features % bk:
        raise ValueError(f"{prefix}: {in_features} input features per rank are not a multiple of "
                         f"the FP8 block {bk}{on_tp}")
    add_param(layer, name, (-(-out_features // bn), in_features // bk), torch.float32, output_dim=0, input_dim=1)


def expand_block_scales(scale_inv: torch.Tensor, block_n: int, block_k: int, n: int, k: int) -> torch.Tensor:
    """[ceil(N / bn), ceil(K / bk)] block scales -> [N, K // bk] row-group scales."""
    if k % block_k:
        raise ValueError(f"{k} input features do not split into FP8 blocks of {block_k}")
    return scale_inv.float().repeat_interleave(block_n, dim=0)[:n, : k // block_k].contiguous()


@dataclass(frozen=True)
class Fp8Config(QuantizationConfig):
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    cpu_pack: Any = None
    name: str = field(default="fp8", init=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], cpu_pack: Any = None) -> Fp8Config:
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"FP8 activation_scheme must be dynamic or static, got {scheme!r}")
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"FP8 format {fmt!r} is not supported (e4m3)")
        block = config.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(block) <= 0):
            raise ValueError(f"weight_block_size must be two positive sizes, got {block!r}")
        if block is not None and scheme == "static":
            raise ValueError("block-wise FP8 with static activation scales is not a known format")
        ignored = config.get("modules_to_not_convert") or config.get("ignored_layers") or ()
        return cls(scheme, None if block is None else (int(block[0]), int(block[1])), tuple(ignored), cpu_pack)

    def linear_method(self, prefix: str) -> LinearMethod:
        if left_dense(prefix, self.modules_to_not_convert):
            return self.unquantized_method()
        return Fp8LinearMethod(self, prefix)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.name, "activation_scheme": self.activation_scheme,
                "weight_block_size": None if self.weight_block_size is None else list(self.weight_block_size)}


class Fp8LinearMethod(QuantizedLinearMethod):
    def __init__(self, config: Fp8Config, prefix: str) -> None:
        super().__init__(prefix, config.cpu_pack)
        self.config = config

    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        add_param(layer, "weight", (out_features, in_features), torch.float8_e4m3fn, output_dim=0, input_dim=1)
        block = self.config.weight_block_size
        if block is None:
            per_shard_scalar(layer, "weight_scale")
        else:
            add_block_scales(layer, self.prefix, "weight_scale_inv", in_features, out_features, block)
        if self.config.activation_scheme == "static":
            per_shard_scalar(layer, "input_scale")

    def random_form(self, layer: nn.Module) -> tuple[str, int, int]:
        block = self.config.weight_block_size
        return "fp8", 8, layer.in_features if block is None else block[1]

    def canonical(self, layer: nn.Module) -> Canonical:
        weight = layer.weight.data
        n, k = weight.shape
        if self.config.weight_block_size is None:
            return Fp8Weight(weight, scales_per_row(layer.weight_scale.data, layer.output_shard_sizes), k)
        bn, bk = self.config.weight_block_size
        return Fp8Weight(weight, expand_block_scales(layer.weight_scale_inv.data, bn, bk, n, k), bk)

    def input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        if self.config.activation_scheme != "static":
            return None
        return layer.input_scale.data.max().float()
