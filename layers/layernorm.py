"""RMSNorm, computed the way Hugging Face does so fp32 logits match to 1e-5."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise `x`; with `residual`, first add it and also return the sum.

        The fused add saves one full pass over the hidden states per layer on
        the decode path, where these elementwise ops are a real share of time.
        """
        if residual is not None:
            x = x + residual
            residual = x
        input_dtype = x.dtype
        h = x.float()
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        out = self.weight * h.to(input_dtype)
        return out if residual is None else (out, residual)
