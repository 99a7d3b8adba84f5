"""Linear layers laid out for tensor parallelism.

Each layer owns the slice of the full weight that its TP rank computes and a
`weight_loader` that cuts that slice out of a full checkpoint tensor:

- `ColumnParallelLinear`: output features split across ranks (no communication).
- `MergedColumnParallelLinear`: several column-parallel projections stacked in
  one GEMM (gate/up); checkpoint shards are loaded by index.
- `QKVParallelLinear`: q, k and v stacked in one GEMM, heads split by rank
  (KV heads replicated when there are fewer of them than ranks).
- `RowParallelLinear`: input features split; partial outputs are summed by an
  all-reduce (the caller's `TPContext`).

With tp_size 1 every slice is the whole tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.checkpoint_tensor import LazyCheckpointTensor, as_tensor
from layers.cpu_gemm import CpuLinearWeight, pack_cpu_linear

# A checkpoint tensor as the weight loaders receive it: read or still on disk.
Loaded = torch.Tensor | LazyCheckpointTensor


@dataclass(frozen=True)
class TPContext:
    """Which shard this process holds, and how partial results are combined."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # along the last dim

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 or self.all_reduce is None else self.all_reduce(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 or self.all_gather is None else self.all_gather(x)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tp_size ({parts})")
    return total // parts


def _take_shard(loaded: Loaded, dim: int, index: int, size: int, full_size: int, name: str) -> torch.Tensor:
    """Slice `index` (of width `size`) along `dim`, after checking the
    checkpoint tensor has the full, unsharded width there."""
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(
            f"shape mismatch loading {name}: checkpoint {tuple(loaded.shape)}, "
            f"expected size {full_size} along dim {dim}"
        )
    return loaded.narrow(dim, index * size, size)


def _copy_checked(param: torch.Tensor, loaded: Loaded, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch loading {name}: checkpoint {tuple(loaded.shape)}, "
            f"expected {tuple(param.shape)}"
        )
    param.data.copy_(as_tensor(loaded))


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        )
        self.packed_weight: CpuLinearWeight | None = None

    def prepack(self, batch_size_hint: int, small_batch_gemv: bool = True) -> None:
        """Switch to packed copies of the weight (CPU bf16; see
        layers/cpu_gemm.py). Call after loading: the plain weight is dropped."""
        self.packed_weight = pack_cpu_linear(self.weight, batch_size_hint, small_batch_gemv)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is not None:
            return self.packed_weight(x, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        _copy_checked(param, loaded, "replicated linear")


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        rows = param.shape[0]
        piece = _take_shard(loaded, 0, self.tp.rank, rows, rows * self.tp.size, "column-parallel linear")
        _copy_checked(param, piece, "column-parallel linear")


class MergedColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPContext) -> None:
        self.shard_sizes = [_divide(n, tp.size, "output features") for n in out_sizes]
        super().__init__(in_features, sum(self.shard_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        what = f"merged linear shard {shard_id}"
        piece = _take_shard(loaded, 0, self.tp.rank, size, size * self.tp.size, what)
        _copy_checked(param.data.narrow(0, offset, size), piece, what)


class QKVParallelLinear(LinearBase):
    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPContext,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = _divide(num_kv_heads, tp.size, "KV heads")
            self.kv_replicas = 1
        else:
            # Fewer KV heads than ranks: each rank keeps one KV head, shared
            # by `kv_replicas` neighbouring ranks.
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp.size, num_kv_heads, "tp_size over KV heads")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, rank, shards = 0, self.q_size, self.tp.rank, self.tp.size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank = self.kv_size, self.tp.rank // self.kv_replicas
            shards = self.tp.size // self.kv_replicas
        what = f"qkv shard {shard_id}"
        piece = _take_shard(loaded, 0, rank, size, size * shards, what)
        _copy_checked(param.data.narrow(0, offset, size), piece, what)


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduce
            _copy_checked(param, loaded, "row-parallel bias")
            return
        cols = param.shape[1]
        piece = _take_shard(loaded, 1, self.tp.rank, cols, cols * self.tp.size, "row-parallel linear")
        _copy_checked(param, piece, "row-parallel linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias
