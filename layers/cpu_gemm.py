"""oneDNN-prepacked weights for linear layers on CPU.

At decode batch sizes a CPU GEMM spends much of its time re-laying-out the
weight; packing it once into oneDNN's blocked format makes bf16 linears
~20-35% faster at 16 rows on AVX-512 machines, with bit-identical bf16
results (measured: benchmark/bench_one_batch.py --no-prepack for the A/B).

Only used for CPU bf16 models: fp32 is the parity reference and stays on
plain `F.linear`; GPUs never take this path.
"""

from __future__ import annotations

import torch


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
