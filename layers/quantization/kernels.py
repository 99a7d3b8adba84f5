"""Kernels for the canonical quantized weights (canonical.py), chosen per device.

| weight | CPU | CUDA |
| --- | --- | --- |
| `IntWeight` (4/8-bit, any groups) | native int GEMM (cpu_int_gemm.py); dequantized dense where it is not built | Triton dequant-GEMM |
| `IntWeight` + int8 activations (W8A8) | `torch._int_mm`, per-token activation scales | same |
| `Fp8Weight` per row | dequantized to the compute dtype at load | `torch._scaled_mm` (sm89+), else Triton |
| `Fp8Weight` block-wise | dequantized at load | Triton dequant-GEMM |
| dense | oneDNN-packed bf16 / F.linear | F.linear |

Why dequantize FP8 on CPU: no x86 CPU multiplies e4m3 natively, and a bf16
weight decodes there at memory speed through the packed kernels; the
checkpoint loads and computes the same values, without FP8's memory saving.

`build_kernel` fails at start-up, naming the layer, for a combination no
kernel covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from layers.cpu_gemm import NativeLinearForm, pack_cpu_linear, prepack_supported
from layers.quantization.canonical import Canonical, Fp8Weight, IntWeight
from layers.quantization.dense import CpuPackOptions


CUDA_INT_MM_MIN_ROWS = 16


class QuantKernel(Protocol):
    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def native_form(self) -> NativeLinearForm | None:
        """The layer as a native CPU kernel runs it (for the C++ decoder
        stack), or None where another kernel runs it."""

    @property
    def nbytes(self) -> int: ...


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class DenseKernel:
    weight: torch.Tensor  # [N, K] in the compute dtype
    packed: object | None = None  # layers.cpu_gemm.CpuLinearWeight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.packed(x, bias) if self.packed is not None else F.linear(x, self.weight, bias)

    def native_form(self) -> NativeLinearForm | None:
        return None if self.packed is None else self.packed.native_form()

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.weight)


def dense_kernel(weight: torch.Tensor, dtype: torch.dtype, cpu_pack: CpuPackOptions | None) -> DenseKernel:
    weight = weight.to(dtype).contiguous()
    if cpu_pack is not None and prepack_supported(weight.device, dtype):
        packed = pack_cpu_linear(weight, cpu_pack.batch_size_hint, cpu_pack.small_batch_gemv, cpu_pack.streaming_rows)
        return DenseKernel(torch.empty(0, dtype=dtype), packed)
    return DenseKernel(weight)


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


@dataclass
class CpuIntKernel:
    """Weight-only integer GEMM through the native CPU kernel."""

    packed: object  # layers.quantization.cpu_int_gemm.CpuIntLinearWeight
    perm: torch.Tensor | None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, lead = _flatten(x)
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        return self.packed(rows.contiguous(), bias).reshape(*lead, -1)

    def native_form(self) -> NativeLinearForm | None:
        return None if self.perm is not None else self.packed.native_form()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


@dataclass
class TritonQuantKernel:
    """Weight-only dequant-GEMM on CUDA (int4 packed two per byte, int8, fp8)."""

    weight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group_size: int
    kind: str  # "int4" | "int8" | "fp8"
    perm: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from layers.quantization.triton_quant_gemm import quant_gemm

        rows, lead = _flatten(x)
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        out = quant_gemm(rows.contiguous(), self.weight, self.scale, self.offset, self.group_size, self.kind, bias)
        return out.reshape(*lead, -1)

    def native_form(self) -> NativeLinearForm | None:
        return None

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.weight, self.scale, self.offset)


@dataclass
class Int8ActivationKernel:
    """W8A8: per-channel int8 weights times int8 activations, each row of x
    quantized with its own scale (max |x| / 127) unless the checkpoint gives
    a static one; int32 accumulation in `torch._int_mm` (CPU and CUDA)."""

    q_t: torch.Tensor  # int8 [K, N] (the transposed weight _int_mm wants)
    scale: torch.Tensor  # fp32 [N]
    input_scale: torch.Tensor | None  # fp32 scalar (static) or None (dynamic per token)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, lead = _flatten(x)
        x32 = rows.float()
        if self.input_scale is None:
            x_scale = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 127.0
        else:
            x_scale = self.input_scale.reshape(1, 1)
        xq = torch.round(x32 / x_scale).clamp(-128, 127).to(torch.int8)
        rows_in = xq.shape[0]
        if xq.is_cuda and rows_in <= CUDA_INT_MM_MIN_ROWS:  # cuBLAS int8 GEMM wants more than 16 rows
            xq = F.pad(xq, (0, 0, 0, CUDA_INT_MM_MIN_ROWS + 1 - rows_in))
        acc = torch._int_mm(xq, self.q_t)[:rows_in]
        out = acc.float() * x_scale * self.scale
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*lead, -1)

    def native_form(self) -> NativeLinearForm | None:
        return None

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.q_t, self.scale)


@dataclass
class Fp8ScaledMMKernel:
    """FP8 x FP8 on sm89+ GPUs: activations quantized per token (dynamic) or
    with the checkpoint's static scale, one scale per weight row."""

    q_t: torch.Tensor  # float8_e4m3fn [K, N], column-major view of the [N, K] weight
    scale: torch.Tensor  # fp32 [1, N]
    input_scale: torch.Tensor | None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, lead = _flatten(x)
        finfo = torch.finfo(torch.float8_e4m3fn)
        if self.input_scale is None:
            x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / finfo.max
        else:
            x_scale = self.input_scale.reshape(1, 1).expand(rows.shape[0], 1).contiguous()
        xq = (rows.float() / x_scale).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.q_t, scale_a=x_scale, scale_b=self.scale, out_dtype=x.dtype)
        if bias is not None:  # added here: row-wise scaled_mm takes no bias on every build
            out = out + bias
        return out.reshape(*lead, -1)

    def native_form(self) -> NativeLinearForm | None:
        return None

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.q_t, self.scale)


def triton_group_depth(kind: str) -> int:
    """The Triton dequant-GEMM's groups must be a multiple of this (tl.dot's
    minimum depth; int4 splits each tile into even and odd inputs)."""
    return 32 if kind == "int4" else 16


def _scaled_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def build_kernel(weight: Canonical, dtype: torch.dtype, device: torch.device,
                 cpu_pack: CpuPackOptions | None, int8_activations: bool = False,
                 input_scale: torch.Tensor | None = None, layer: str = "") -> QuantKernel:
    """The kernel for one layer's canonical weight on `device` computing in `dtype`."""
    if isinstance(weight, torch.Tensor):
        return dense_kernel(weight, dtype, cpu_pack)
    if isinstance(weight, IntWeight) and int8_activations:
        if weight.bits != 8 or weight.group_size != weight.q.shape[1] or weight.offset is not None:
            raise ValueError(f"{layer}: int8 activations need symmetric per-channel 8-bit weights")
        return Int8ActivationKernel(weight.q.t().contiguous(), weight.scale[:, 0].contiguous(), input_scale)
    if device.type == "cpu":
        if isinstance(weight, Fp8Weight):
            return dense_kernel(weight.dequantize(), dtype, cpu_pack)
        return _cpu_int_kernel(weight, dtype, cpu_pack)
    if device.type != "cuda":
        raise ValueError(f"{layer}: quantized weights run on cpu and cuda devices, not {device.type}")
    kind = "fp8" if isinstance(weight, Fp8Weight) else f"int{weight.bits}"
    depth = triton_group_depth(kind)
    if weight.group_size % depth and not (isinstance(weight, Fp8Weight) and weight.per_row
                                          and _scaled_mm_supported(device)):
        # Found now, at start-up, not at the first request.
        raise ValueError(f"{layer}: the CUDA {kind} kernel needs groups of a multiple of {depth} input "
                         f"features; this layer's are {weight.group_size}")
    if isinstance(weight, Fp8Weight):
        if weight.per_row and _scaled_mm_supported(device):
            return Fp8ScaledMMKernel(weight.q.t(), weight.scale.reshape(1, -1).contiguous(), input_scale)
        return TritonQuantKernel(weight.q.contiguous(), weight.scale.contiguous(), None, weight.group_size, "fp8")
    from layers.quantization.triton_quant_gemm import pack_int4

    stored = pack_int4(weight.q) if weight.bits == 4 else weight.q.contiguous()
    return TritonQuantKernel(stored, weight.scale.contiguous(), weight.offset, weight.group_size,
                             f"int{weight.bits}", weight.perm)


def _cpu_int_kernel(weight: IntWeight, dtype: torch.dtype, cpu_pack: CpuPackOptions | None) -> QuantKernel:
    from layers.quantization.cpu_int_gemm import pack_cpu_int_linear

    packed = None
    if dtype in (torch.bfloat16, torch.float32):
        packed = pack_cpu_int_linear(weight.q, weight.scale, weight.offset, weight.group_size, weight.bits)
    if packed is None:
        # No native kernel here: the same values as a dense weight.
        return dense_kernel(weight.dequantize(), dtype, cpu_pack)
    return CpuIntKernel(packed, weight.perm)
