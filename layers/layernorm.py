"""RMSNorm (with an optional fused residual add)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.cpu_kernels import native_ops


def _native_bf16_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise `x`; with `residual`, first add it and also return the sum.

        torch's rms_norm accumulates in float32 like transformers' version
        (identical in fp32; in bf16 it rounds once instead of twice, which is
        slightly closer to the fp32 result) and is one op instead of seven,
        which counts on the decode path. On CPU bf16 rows the native kernel
        does the add and the norm in one pass, updating `residual` in place
        (layers/cpu_kernels/norm.inc; same roundings).
        """
        if _native_bf16_rows(x) and (residual is None or residual.is_contiguous()):
            ops = native_ops()
            if ops is not None:
                out = ops.rms_norm_bf16(x, residual, self.weight, self.variance_epsilon)
                return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)
        return out if residual is None else (out, residual)
