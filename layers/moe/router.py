"""Top-k expert selection: which experts each token goes to, with what weight.

Every rank runs the (replicated, small) router over every token, so all ranks
agree on the routing without communicating.
"""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, then the `top_k` largest.

    Returns (weights fp32 [T, top_k], expert ids int64 [T, top_k]). With
    `renormalize` the chosen weights are rescaled to sum to 1 (Mixtral always,
    Qwen when `norm_topk_prob`); without, they keep their softmax mass.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
