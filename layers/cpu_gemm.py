"""Packed bf16 weights for linear layers on CPU: oneDNN's layout and the
native streaming kernel's, chosen by the CPU's level (layers/cpu_features.py).

At decode batch sizes a CPU GEMM spends much of its time re-laying-out the
weight; packing it once into oneDNN's blocked format makes bf16 linears
~20-35% faster at 16 rows on AVX-512 machines, with bit-identical bf16
results (measured: benchmark/bench_one_batch.py --no-prepack for the A/B).
oneDNN has a bf16 path only from AVX-512 BW/VL/DQ up (below, its prepack
refuses): on an AVX2 CPU every row count runs the native kernel, which widens
bf16 to fp32 in registers (what llama.cpp does there too), so the weights
keep half the bytes of fp32 (RESULTS: "bf16 on AVX2").

Only used for CPU bf16 models: fp32 is the parity reference and stays on
plain `F.linear`; GPUs never take this path.

At a few rows (small-batch decode, a verify step's guesses) a linear layer
only streams its weight, and the native streaming kernel
(layers/cpu_kernels/gemm.inc) does that faster than oneDNN up to a row count
that depends on the CPU (`default_streaming_rows`). Where the native kernels
are built, a layer keeps a second copy of its weight in the streaming
kernel's layout and picks by row count: twice the weight memory for the
fastest small-batch decode, so it is a choice (`cpu_small_batch_gemv`), on
by default.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from layers.cpu_features import IsaLevel, cpu_isa
from layers.cpu_kernels import native_ops


def default_streaming_rows() -> int:
    """Rows up to which the streaming kernel beats oneDNN on this CPU.

    Measured on the small demo model. Zen 5 (AVX-512 bf16, no AMX): its
    linears ran 1.3-2x as fast at 1-2 rows, even at 4, behind from 8: 2.
    Xeon with AMX (oneDNN's kernels there do worse at few rows): a whole
    decode step of 3, 4 and 6 sequences ran 1.23x, 1.20x and 1.16x as fast
    on the streaming kernel, even at 8 (benchmark/RESULTS.md): 6, the
    kernel's register tile (above it the kernel splits K). Below AVX-512
    oneDNN has no bf16 path, and the streaming kernel takes every row count
    (`CpuLinearWeight` without a oneDNN copy)."""
    return 6 if cpu_isa().level >= IsaLevel.AMX else 2


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's bf16 weight prepack runs here: the CPU's level allows
    it and oneDNN agrees (ONEDNN_MAX_CPU_ISA can hold oneDNN below the CPU)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_isa().onednn_bf16 and _onednn_prepacks_bf16()


@functools.cache
def _onednn_prepacks_bf16() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        prepack_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


def streaming_supported() -> bool:
    """Whether the native streaming bf16 kernel runs here (AVX2 and up)."""
    ops = native_ops()
    return ops is not None and ops.bf16_gemm_supported()


def cpu_pack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether CPU bf16 linears have a packed path here: oneDNN's, the
    streaming kernel's, or both. Elsewhere they run torch's own F.linear."""
    return device.type == "cpu" and dtype == torch.bfloat16 and (prepack_supported(device, dtype) or streaming_supported())


@dataclass(frozen=True)
class NativeLinearForm:
    """One projection as a native kernel runs it, for callers that chain the
    kernels from C++ (layers/cpu_kernels/decoder_stack.cpp): the streaming
    bf16 kernel (`bits` 16) or the weight-only int kernel (8 / 4), up to
    `max_rows` rows (beyond them the layer runs oneDNN instead)."""

    packed: torch.Tensor
    out_features: int
    bits: int
    max_rows: int
    group_size: int = 0
    has_offset: bool = False
    amx_min_rows: int = 0


def prepack_weight(weight: torch.Tensor, batch_size_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)


def packed_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@dataclass
class CpuLinearWeight:
    """A bf16 weight packed for CPU linears: oneDNN's layout where the CPU
    has oneDNN's bf16 path, and the streaming kernel's, for up to
    `streaming_rows` rows beside oneDNN or for every row without it."""

    onednn: torch.Tensor | None
    streaming: torch.Tensor | None
    out_features: int
    streaming_rows: int = 2

    def __post_init__(self) -> None:
        if self.onednn is None and self.streaming is None:
            raise ValueError("a CPU linear weight needs oneDNN's layout or the streaming kernel's")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.streaming is not None and (self.onednn is None or x.shape[0] <= self.streaming_rows):
            if x.dim() != 2:
                return self(x.reshape(-1, x.shape[-1]), bias).reshape(*x.shape[:-1], self.out_features)
            ops = native_ops()
            assert ops is not None
            return ops.bf16_linear(x, self.streaming, bias, self.out_features)
        assert self.onednn is not None
        return packed_linear(x, self.onednn, bias)

    def native_form(self) -> NativeLinearForm | None:
        if self.streaming is None:
            return None
        max_rows = sys.maxsize if self.onednn is None else self.streaming_rows
        return NativeLinearForm(self.streaming, self.out_features, bits=16, max_rows=max_rows)


def pack_cpu_linear(weight: torch.Tensor, batch_size_hint: int, small_batch_gemv: bool,
                    streaming_rows: int | None = None) -> CpuLinearWeight:
    """`streaming_rows`: None for this CPU's default. `small_batch_gemv`
    False keeps only oneDNN's copy where oneDNN runs (below AVX-512 the
    streaming copy is the only one)."""
    onednn = prepack_weight(weight, batch_size_hint) if prepack_supported(weight.device, weight.dtype) else None
    ops = native_ops()
    wants_streaming = small_batch_gemv or onednn is None
    streaming = ops.pack_bf16_weight(weight.detach()) if wants_streaming and streaming_supported() else None
    rows = default_streaming_rows() if streaming_rows is None else streaming_rows
    return CpuLinearWeight(onednn, streaming, weight.shape[0], rows)
