"""Vocab-parallel embedding and LM head.

Each TP rank holds a contiguous slice of the vocabulary. The embedding looks
up the ids that fall in its slice (zeros elsewhere) and all-reduces; the LM
head computes logits for its slice and all-gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.cpu_gemm import CpuLinearWeight, pack_cpu_linear
from layers.linear import Loaded, TPContext


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.shard_size, hidden_size), requires_grad=False
        )

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"shape mismatch loading embedding: checkpoint {tuple(loaded.shape)}, "
                f"expected ({self.vocab_size}, {param.shape[1]})"
            )
        piece = loaded[self.vocab_start : self.vocab_end]
        param.data.zero_()
        param.data[: piece.shape[0]].copy_(piece)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Same sharding as the embedding, so tied weights can share one tensor."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.packed_weight: CpuLinearWeight | None = None

    def prepack(self, batch_size_hint: int, small_batch_gemv: bool = True) -> None:
        # Packed copies; the plain weight stays (it may be the tied embedding).
        self.packed_weight = pack_cpu_linear(self.weight, batch_size_hint, small_batch_gemv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            logits = self.tp.gather(self.packed_weight(hidden, None))
        else:
            logits = self.tp.gather(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
