"""Quantizing a dense checkpoint while it loads (`--quantization int8 | fp8`),
and a loaded model's LM head (`--quantize-lm-head int8`).

For users without pre-quantized weights: the layer loads its dense weight
as usual, then `process_weights_after_loading` rounds it, one scale per
output row (absmax over the row):
- int8: weight-only, w ~ q * scale with q in [-127, 127]; on CPU decode then
  streams half of bf16's bytes through the native int8 kernel;
- fp8: e4m3 with w ~ q * scale; on sm89+ GPUs through `torch._scaled_mm`
  with per-token activation scales; on CPU the rounded weights are
  dequantized again (same values, no saving: see kernels.py).

Every format keeps the LM head dense (it may be the embedding's weight), as
checkpoints ship it. At decode it is often the biggest single weight a step
reads (the small demo model's bf16 head is 49 MB beside 38 MB of int4
layers; llama-quantize stores a GGUF's output tensor as Q6_K or Q8_0).
`quantize_lm_head` rounds a loaded head per row to int8 and runs it on the
int kernel, leaving the embedding as it is: an opt-in trade of logit
precision (per-row int8, well below the gaps greedy decoding acts on;
test_lm_head_quantization.py) for decode speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, QuantizationConfig
from layers.quantization.canonical import Canonical, Fp8Weight, IntWeight
from layers.cpu_gemm import NativeLinearForm
from layers.quantization.kernels import QuantKernel, build_kernel
from layers.quantization.quantized_method import QuantizedLinearMethod, add_param

ONLINE_KINDS = ("int8", "fp8")


def quantize_per_row(weight: torch.Tensor, kind: str) -> Canonical:
    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    k = w.shape[1]
    if kind == "int8":
        scale = absmax / 127.0
        return IntWeight(torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale, None, k, 8)
    scale = absmax / torch.finfo(torch.float8_e4m3fn).max
    return Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale, k)


@dataclass(frozen=True)
class OnlineQuantConfig(QuantizationConfig):
    kind: str = "int8"
    cpu_pack: Any = None
    name: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.kind not in ONLINE_KINDS:
            raise ValueError(f"on-the-fly quantization is one of {', '.join(ONLINE_KINDS)}, not {self.kind!r}")
        object.__setattr__(self, "name", self.kind)

    def linear_method(self, prefix: str) -> LinearMethod:
        return OnlineQuantLinearMethod(self.kind, prefix, self.cpu_pack)

    def describe(self) -> dict[str, Any]:
        return {"quantization": self.kind, "source": "quantized at load, one scale per output row"}


class OnlineQuantLinearMethod(QuantizedLinearMethod):
    def __init__(self, kind: str, prefix: str, cpu_pack: Any) -> None:
        super().__init__(prefix, cpu_pack)
        self.kind = kind

    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        add_param(layer, "weight", (out_features, in_features), layer.compute_dtype, output_dim=0, input_dim=1)

    def canonical(self, layer: nn.Module) -> Canonical:
        return quantize_per_row(layer.weight.data, self.kind)


LM_HEAD_KINDS = ("int8",)


class QuantizedLmHeadMethod(LinearMethod):
    """A loaded LM head's weight rounded per row (`quantize_lm_head`)."""

    def __init__(self, kernel: QuantKernel) -> None:
        self.kernel = kernel

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        raise TypeError("QuantizedLmHeadMethod replaces a loaded LM head's method (quantize_lm_head)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel(x, bias)

    def native_form(self, layer: nn.Module) -> NativeLinearForm | None:
        return self.kernel.native_form()


def quantize_lm_head(head: nn.Module, kind: str, cpu_pack: Any) -> None:
    """Round the loaded LM head `head` (a ParallelLMHead: this rank's vocab
    rows) per row and compute its logits on the matching kernel. Its plain
    weight stays (it may be the embedding's); any bf16 copies packed for the
    CPU kernels go."""
    if kind not in LM_HEAD_KINDS:
        raise ValueError(f"LM head quantization is one of {', '.join(LM_HEAD_KINDS)}, not {kind!r}")
    weight = head.weight.data
    kernel = build_kernel(quantize_per_row(weight, kind), weight.dtype, weight.device, cpu_pack, layer="lm_head")
    head.linear_method = QuantizedLmHeadMethod(kernel)
    head.packed_weight = None
