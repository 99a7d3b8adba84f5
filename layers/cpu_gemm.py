"""oneDNN-prepacked weights for linear layers on CPU.

At decode batch sizes a CPU GEMM spends much of its time re-laying-out the
weight; packing it once into oneDNN's blocked format makes bf16 linears
~20-35% faster at 16 rows on AVX-512 machines, with bit-identical bf16
results (measured: benchmark/bench_one_batch.py --no-prepack for the A/B).

Only used for CPU bf16 models: fp32 is the parity reference and stays on
plain `F.linear`; GPUs never take this path.

At one or two rows (batch-1/2 decode) a linear layer only streams its weight,
and the native streaming kernel (layers/cpu_kernels/gemm.cpp) does that
1.3-2x faster than oneDNN; at four rows they tie, from eight oneDNN (AMX or
AVX-512 brgemm) wins, so it takes over from three rows. Where the native kernels are built, a layer keeps a second copy of its
weight in the streaming kernel's layout and picks by row count: twice the
weight memory for the fastest single-stream decode, so it is a choice
(`cpu_small_batch_gemv`), on by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.cpu_kernels import native_ops

# Rows up to which the streaming kernel beats oneDNN (measured per shape of
# the small demo model: 1.3-2x at 1-2 rows, even at 4, behind from 8).
SMALL_BATCH_ROWS = 2


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
    and optionally the streaming kernel's for one or two rows."""

    onednn: torch.Tensor
    streaming: torch.Tensor | None
    out_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.streaming is not None and x.dim() == 2 and x.shape[0] <= SMALL_BATCH_ROWS:
            ops = native_ops()
            assert ops is not None
            return ops.bf16_linear(x, self.streaming, bias, self.out_features)
        return packed_linear(x, self.onednn, bias)


def pack_cpu_linear(weight: torch.Tensor, batch_size_hint: int, small_batch_gemv: bool) -> CpuLinearWeight:
    ops = native_ops() if small_batch_gemv else None
    streaming = ops.pack_bf16_weight(weight.detach()) if ops is not None and ops.bf16_gemm_supported() else None
    return CpuLinearWeight(prepack_weight(weight, batch_size_hint), streaming, weight.shape[0])
