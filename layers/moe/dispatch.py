"""Which experts live on this rank, and tokens grouped by expert.

Under tensor parallelism every rank holds every token (attention is split by
heads, and its output all-reduced), so expert parallelism needs no token
exchange: a rank computes the (token, expert) pairs whose expert it holds and
the MoE layer's all-reduce, the same one a dense MLP ends with, sums the
ranks' parts. An all-to-all would only pay where ranks hold different tokens
(data-parallel attention, which this runtime does not have); with top-k
routing it would move k times the bytes of that all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Experts [first, first + count) of `total` are this rank's."""

    total: int
    first: int
    count: int

    @classmethod
    def for_rank(cls, num_experts: int, ep_rank: int, ep_size: int) -> ExpertPlacement:
        if num_experts % ep_size:
            raise ValueError(f"the {num_experts} experts do not divide evenly over ep_size {ep_size}")
        count = num_experts // ep_size
        return cls(num_experts, ep_rank * count, count)

    def holds(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.count

    def to_local(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Global ids -> this rank's expert index, -1 where another rank holds it."""
        if self.count == self.total:
            return expert_ids
        local = expert_ids - self.first
        return torch.where((local >= 0) & (local < self.count), local, -1)


@dataclass(frozen=True)
class ExpertGroups:
    """The (token, k) slots routed to this rank, ordered by expert.

    `slots` are flat indices t * top_k + k; `counts[e]` of them (consecutive)
    go to local expert e. Slots routed elsewhere (-1) are left out.
    """

    slots: torch.Tensor  # int64 [N]
    counts: list[int]  # per local expert; one host read per layer
    top_k: int

    @property
    def tokens(self) -> torch.Tensor:
        return self.slots // self.top_k


def group_by_expert(local_ids: torch.Tensor, num_local: int) -> ExpertGroups:
    """Sort the [T, top_k] local expert ids once (stable: token order is kept
    inside each expert's group)."""
    flat = local_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=num_local + 1)  # bin 0: -1, routed elsewhere
    elsewhere, *per_expert = counts.tolist()
    return ExpertGroups(order[elsewhere:], per_expert, local_ids.shape[1])
