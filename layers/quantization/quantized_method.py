"""What every quantized format's linear method shares.

A format's method registers its checkpoint tensors (`add_param`, tagged for
the TP loaders) and says how they unpack into a canonical weight
(`canonical`); this base class then drops the checkpoint tensors and builds
the layer's kernel for its device (layers/quantization/kernels.py).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layers.quantization.base import LinearMethod, set_weight_attrs
from layers.quantization.canonical import Canonical, Fp8Weight, IntWeight
from layers.cpu_gemm import NativeLinearForm
from layers.quantization.kernels import build_kernel

# Our fused layers and the checkpoint projections they hold, for configs that
# name layers the checkpoint's way (ignore lists).
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_module_names(prefix: str) -> list[str]:
    """The checkpoint's module names for our layer `prefix`."""
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED_PARTS.get(leaf)
    return [prefix] if parts is None else [f"{parent}.{part}" for part in parts]


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    # A plain entry names a module, or a suffix of one ("lm_head", "mlp.down_proj").
    return name == pattern or name.endswith("." + pattern)


def left_dense(prefix: str, patterns: Iterable[str]) -> bool:
    """Whether the config leaves layer `prefix` unquantized. A fused layer is
    left dense only if all of its projections are: one weight, one format."""
    patterns = tuple(patterns)
    names = checkpoint_module_names(prefix)
    flags = [any(name_matches(name, p) for p in patterns) for name in names]
    if any(flags) and not all(flags):
        raise ValueError(
            f"the quantization config leaves only some of {', '.join(names)} unquantized; "
            "they are fused into one weight here and must share one format"
        )
    return all(flags)


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, **attrs: Any) -> None:
    """Register a checkpoint tensor of `layer`, tagged for the TP loaders
    (`output_dim`, `input_dim`, `shard_scalar`)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    layer.register_parameter(name, param)


def per_shard_scalar(layer: nn.Module, name: str) -> None:
    """One fp32 scalar per checkpoint projection fused into `layer`."""
    add_param(layer, name, (len(layer.output_shard_sizes),), torch.float32, shard_scalar=True)


def check_groups(layer: nn.Module, prefix: str, in_features: int, group_size: int) -> None:
    """This rank's input features must split into whole groups."""
    if in_features % group_size == 0:
        return
    tp = layer.tp.size
    why = (f"tp_size {tp} splits a group ({in_features} input features per rank)"
           if tp > 1 and (in_features * tp) % group_size == 0 else f"{in_features} input features")
    raise ValueError(f"{prefix}: group size {group_size} does not divide the input: {why}")


@dataclass(frozen=True)
class InputGroups:
    """How a layer's input groups lie on this rank."""

    size: int  # input features per group
    count: int  # groups whose scales this rank holds
    sharded: bool  # whether the group tensors are cut along the input dim (else kept whole)


def input_groups(layer: nn.Module, prefix: str, in_features: int, group_size: int, act_order: bool) -> InputGroups:
    """Groups of `group_size` (-1: one group over the whole unsharded input).
    With act-order a row-parallel shard's columns may belong to any group,
    so it keeps every group's scales; otherwise its groups must be whole."""
    full_in = in_features * (layer.tp.size if layer.input_sharded else 1)
    size = full_in if group_size == -1 else group_size
    if act_order and layer.input_sharded and layer.tp.size > 1:
        return InputGroups(size, full_in // size, sharded=False)
    check_groups(layer, prefix, in_features, size)
    return InputGroups(size, in_features // size, sharded=True)


def check_pack(prefix: str, what: str, size: int, per_int: int) -> None:
    if size % per_int:
        raise ValueError(f"{prefix}: {size} {what} do not fill whole int32 words of {per_int} values")


class QuantizedLinearMethod(LinearMethod):
    """Checkpoint tensors in, a kernel out. Subclasses: `create_weights` and
    `canonical`; `int8_activations` / `input_scale` for W8A8 formats."""

    def __init__(self, prefix: str, cpu_pack: Any = None) -> None:
        self.prefix = prefix
        self.cpu_pack = cpu_pack

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.compute_dtype = dtype  # the model's dtype: what the kernel computes in
        self.create_checkpoint_tensors(layer, in_features, out_features)

    @abstractmethod
    def create_checkpoint_tensors(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        """Register the format's tensors for this rank's [in, out] shard."""

    @abstractmethod
    def canonical(self, layer: nn.Module) -> Canonical:
        """This layer's loaded tensors as one canonical weight."""

    int8_activations = False

    def input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        return None

    def random_form(self, layer: nn.Module) -> tuple[str, int, int] | None:
        """("int" | "fp8", bits, group size) of this layer's weight, for random
        (`--load-format dummy`) weights of the format's shape; None when the
        layer's own tensors are dense and are filled like any other."""
        return None

    def use_random_weights(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Replace what loading would give with random values of the format's
        shape and scale (unit-scale outputs), as dummy dense weights do."""
        kind, bits, group = self.random_form(layer)
        n, k = layer.out_features, layer.in_features
        device = generator.device
        groups = (n, k // group)
        if kind == "fp8":
            q = torch.randn(n, k, generator=generator, device=device).to(torch.float8_e4m3fn)
            layer.random_weight = Fp8Weight(q, torch.full(groups, k**-0.5, device=device), group)
            return
        half = 1 << (bits - 1)
        q = torch.randint(-half, half, (n, k), generator=generator, device=device, dtype=torch.int8)
        spread = 2 * half / 12**0.5  # the std of those integers
        layer.random_weight = IntWeight(q, torch.full(groups, 1 / (spread * k**0.5), device=device), None, group, bits)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        first = next(p for p in layer.parameters(recurse=False) if p is not getattr(layer, "bias", None))
        device = first.device
        dtype = layer.compute_dtype
        weight = getattr(layer, "random_weight", None) or self.canonical(layer)
        layer.random_weight = None
        input_scale = self.input_scale(layer)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n != "bias"]:
            delattr(layer, name)  # the checkpoint form is not needed any more
        layer.quant_kernel = build_kernel(weight, dtype, device, self.cpu_pack, self.int8_activations,
                                          input_scale, self.prefix)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.quant_kernel(x, bias)

    def native_form(self, layer: nn.Module) -> NativeLinearForm | None:
        return layer.quant_kernel.native_form()
