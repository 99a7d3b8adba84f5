"""Dense linear methods: plain weights (any device, any dtype), and the CPU
bf16 path whose weights are packed once after loading (layers/cpu_gemm.py:
oneDNN's blocked layout, plus the streaming kernel's for 1-2 row decodes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.cpu_gemm import NativeLinearForm, pack_cpu_linear
from layers.quantization.base import LinearMethod, QuantizationConfig, set_weight_attrs


class DenseLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


@dataclass(frozen=True)
class CpuPackOptions:
    batch_size_hint: int  # rows oneDNN tunes its layout for
    small_batch_gemv: bool  # also keep the streaming kernel's copy (for a few rows)
    streaming_rows: int | None = None  # up to how many rows it serves; None: this CPU's default (layers/cpu_gemm.py)


class CpuPackedLinearMethod(DenseLinearMethod):
    """Loads like dense; after loading the weight is packed and the plain copy
    dropped, unless the layer shares it (`layer.weight_is_shared`: a tied LM
    head keeps the embedding's tensor)."""

    def __init__(self, options: CpuPackOptions) -> None:
        self.options = options

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = pack_cpu_linear(layer.weight, self.options.batch_size_hint, self.options.small_batch_gemv,
                                              self.options.streaming_rows)
        if not getattr(layer, "weight_is_shared", False):
            layer.weight.data = torch.empty(0, dtype=layer.weight.dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.packed_weight(x, bias)

    def native_form(self, layer: nn.Module) -> NativeLinearForm | None:
        return layer.packed_weight.native_form()


@dataclass(frozen=True)
class DenseConfig(QuantizationConfig):
    """No quantization. `cpu_pack` set: every linear packs for the CPU kernels
    (the model runner sets it for CPU bf16, where packing pays)."""

    cpu_pack: CpuPackOptions | None = None
    name: str = "dense"

    def linear_method(self, prefix: str) -> LinearMethod:
        return self.unquantized_method()

    def moe_method(self, prefix: str):
        return self.unquantized_moe_method()

    def describe(self) -> dict:
        return {"quantization": None}
