"""Vocab-parallel embedding and LM head.

Each TP rank holds a contiguous slice of the vocabulary. The embedding looks
up the ids that fall in its slice (zeros elsewhere) and all-reduces; the LM
head computes logits for its slice and all-gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.linear import Loaded, TPContext
from layers.quantization import DenseConfig, QuantizationConfig


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
    """Same sharding as the embedding, so tied weights can share one tensor.

    Kept dense under every quantization config (its method is the config's
    `unquantized_method`: plain or CPU-packed), and a packing method keeps
    the plain tensor too, since it may be the embedding's.
    """

    weight_is_shared = True

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPContext,
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.linear_method = (quant_config or DenseConfig()).unquantized_method()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather(self.linear_method.apply(self, hidden, None))
        return logits[..., : self.vocab_size]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
