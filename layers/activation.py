"""SwiGLU activation on a merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.cpu_kernels import native_ops


class SiluAndMul(nn.Module):
    """Input [..., 2 * d] = [gate | up]; output silu(gate) * up, [..., d].

    CPU bf16 rows go through the native kernel (one pass instead of a silu
    and a product, same roundings; layers/cpu_kernels/activation.inc).
    """

    use_native = True  # ModelRunnerConfig.cpu_fused_ops=False clears it (A/B runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_native and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1:
            ops = native_ops()
            if ops is not None:
                return ops.silu_and_mul_bf16(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
