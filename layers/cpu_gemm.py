"""oneDNN-prepacked weights for linear layers on CPU.

At decode batch sizes a CPU GEMM spends much of its time re-laying-out the
weight; packing it once into oneDNN's blocked format makes bf16 linears
~20-35% faster at 16 rows on AVX-512 machines, with bit-identical bf16
results (measured: benchmark/bench_one_batch.py --no-prepack for the A/B).

Only used for CPU bf16 models: fp32 is the parity reference and stays on
plain `F.linear`; GPUs never take this path.

At a few rows (small-batch decode, a verify step's guesses) a linear layer
only streams its weight, and the native streaming kernel
(layers/cpu_kernels/gemm.cpp) does that faster than oneDNN up to a row count
that depends on the CPU (`default_streaming_rows`). Where the native kernels
are built, a layer keeps a second copy of its weight in the streaming
kernel's layout and picks by row count: twice the weight memory for the
fastest small-batch decode, so it is a choice (`cpu_small_batch_gemv`), on
by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.cpu_kernels import native_ops


def default_streaming_rows() -> int:
    """Rows up to which the streaming kernel beats oneDNN on this CPU.

    Measured on the small demo model. Zen 5 (AVX-512 bf16, no AMX): its
    linears ran 1.3-2x as fast at 1-2 rows, even at 4, behind from 8: 2.
    Xeon with AMX (oneDNN's kernels there do worse at few rows): a whole
    decode step of 3, 4 and 6 sequences ran 1.23x, 1.20x and 1.16x as fast
    on the streaming kernel, even at 8 (benchmark/RESULTS.md): 6, the
    kernel's register tile (above it the kernel splits K)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return 6 if has_amx else 2


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def prepack_weight(weight: torch.Tensor, batch_size_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)


def packed_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@dataclass
class CpuLinearWeight:
    """A bf16 weight packed for CPU linears: oneDNN's layout for every batch,
    and optionally the streaming kernel's for up to `streaming_rows` rows."""

    onednn: torch.Tensor
    streaming: torch.Tensor | None
    out_features: int
    streaming_rows: int = 2

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.streaming is not None and x.dim() == 2 and x.shape[0] <= self.streaming_rows:
            ops = native_ops()
            assert ops is not None
            return ops.bf16_linear(x, self.streaming, bias, self.out_features)
        return packed_linear(x, self.onednn, bias)


def pack_cpu_linear(weight: torch.Tensor, batch_size_hint: int, small_batch_gemv: bool,
                    streaming_rows: int | None = None) -> CpuLinearWeight:
    """`streaming_rows`: None for this CPU's default."""
    ops = native_ops() if small_batch_gemv else None
    streaming = ops.pack_bf16_weight(weight.detach()) if ops is not None and ops.bf16_gemm_supported() else None
    rows = default_streaming_rows() if streaming_rows is None else streaming_rows
    return CpuLinearWeight(prepack_weight(weight, batch_size_hint), streaming, weight.shape[0], rows)
