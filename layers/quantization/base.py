"""The linear-method seam: how a linear layer stores its weight and applies it.

A `QuantizationConfig` (chosen from the checkpoint's `quantization_config`,
or dense) hands every linear layer its `LinearMethod` by the layer's name
(`prefix`, e.g. "model.layers.3.mlp.down_proj"), so a config can leave some
layers dense (`modules_to_not_convert`, `ignore`). The method:

- `create_weights` registers the layer's weight tensors, each tagged with the
  dims the TP loaders shard along (`output_dim` for column-parallel layers,
  `input_dim` for row-parallel ones; see `set_weight_attrs`), so a quantized
  format's packed tensors shard through the same loaders;
- `process_weights_after_loading` turns the loaded tensors into what `apply`
  wants (packing for a CPU kernel, unpacking, requantizing);
- `apply` computes x W^T + bias;
- `native_form` says how a native CPU kernel runs the layer, where one does
  (the C++ decoder stack chains those without Python in between).

The bias stays a plain tensor owned by the layer: no format quantizes it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from layers.cpu_gemm import NativeLinearForm


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Tag a weight tensor for the loaders (e.g. {"output_dim": 0, "input_dim": 1})."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"weight attribute {key!r} is already set")
        setattr(param, key, value)


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register the weight tensor(s) of a layer computing [.., in] -> [.., out]
        (this rank's shard sizes)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after the checkpoint (or dummy weights) are in."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def native_form(self, layer: nn.Module) -> NativeLinearForm | None:
        """How a native CPU kernel runs this layer, for the C++ decoder stack
        (model_executor/cpu_decoder_stack.py); None: only `apply` runs it."""
        return None


class QuantizationConfig(ABC):
    """Picks each linear layer's method; one instance per loaded model.

    `cpu_pack` (set by the model runner for CPU bf16) asks for weights
    packed for the CPU kernels wherever a layer stays dense."""

    name: str
    cpu_pack: Any = None  # layers.quantization.dense.CpuPackOptions | None

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod: ...

    def unquantized_method(self) -> LinearMethod:
        """For layers every format keeps dense (the LM head, whose weight may
        be the embedding's) and those the config leaves out."""
        from layers.quantization.dense import CpuPackedLinearMethod, DenseLinearMethod

        return DenseLinearMethod() if self.cpu_pack is None else CpuPackedLinearMethod(self.cpu_pack)

    def moe_method(self, prefix: str) -> Any:
        """The `MoEMethod` (layers/moe/method.py) of the experts at `prefix`.
        A format that does not quantize expert weights refuses them here,
        at model construction, rather than loading them wrong."""
        raise ValueError(f"{self.name} quantization of mixture-of-experts weights is not supported yet ({prefix})")

    def unquantized_moe_method(self) -> Any:
        from layers.moe.method import CpuPackedGroupedExperts, GroupedExperts

        return GroupedExperts() if self.cpu_pack is None else CpuPackedGroupedExperts(self.cpu_pack)

    def describe(self) -> dict[str, Any]:
        """What /model_info reports about the quantization."""
        return {"quantization": self.name}
