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

The weight itself belongs to the layer's `LinearMethod` (layers/quantization):
the method creates it, tagged with the dim that is sharded (`output_dim` /
`input_dim`), and the loaders here cut shards along those tags, so a method's
own tensor layouts shard through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from layers.checkpoint_tensor import LazyCheckpointTensor, as_tensor
from layers.quantization import DenseConfig, QuantizationConfig

# A checkpoint tensor as the weight loaders receive it: read or still on disk.
Loaded = torch.Tensor | LazyCheckpointTensor


@dataclass(frozen=True)
class TPContext:
    """Which shard this process holds, and how partial results are combined."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # along the last dim
    # Mixture-of-experts layers split the group two ways (SGLang's rule):
    # `ep_size` groups of ranks each hold 1/ep_size of the experts, and inside
    # a group each expert's intermediate dim is split over size // ep_size.
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.size % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide tp_size ({self.size})")

    @property
    def moe_tp_size(self) -> int:
        return self.size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp_size

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
    # Whether this layer holds a slice of the input features (row-parallel):
    # a quantized format keeps its input groups whole or shards them by this.
    input_sharded = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPContext,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features  # this rank's shard
        self.linear_method = (quant_config or DenseConfig()).linear_method(prefix)
        self.linear_method.create_weights(self, in_features, out_features, torch.get_default_dtype())
        self.bias = (
            nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        )

    @property
    def output_shard_sizes(self) -> list[int]:
        """This rank's output rows of each checkpoint projection fused here."""
        return [self.out_features]

    def shard_index(self, shard_id) -> int:
        return 0

    def load_unsplit(self, param: torch.Tensor, loaded: Loaded, shard_id) -> bool:
        """Tensors the output-splitting loaders must not cut; returns whether
        `param` is one (and is now loaded):

        - a small per-projection tensor (an FP8 per-tensor scale, a packed
          weight's recorded shape), tagged `shard_scalar`: each checkpoint
          projection fused here has its own, kept in row `shard_index` of
          `param` ([projections, ...]);
        - on a layer with whole inputs, a tensor indexed by input features
          alone (GPTQ's `g_idx`): the projections fused here read the same
          input and carry the same copy, which is checked.
        """
        if getattr(param, "shard_scalar", False):
            value = as_tensor(loaded)
            if value.numel() != param[0].numel():
                raise ValueError(f"expected {param[0].numel()} value(s), got a tensor of shape {tuple(value.shape)}")
            param.data[self.shard_index(shard_id)] = value.reshape(param.shape[1:])
            return True
        if self.input_sharded or not hasattr(param, "input_dim") or hasattr(param, "output_dim"):
            return False
        value = as_tensor(loaded)
        seen = self.__dict__.setdefault("_unsplit_loaded", set())
        if id(param) in seen and not torch.equal(param.data, value.to(param.dtype)):
            raise ValueError("differs between the projections fused into one layer, which share their input")
        _copy_checked(param, value, "per-input tensor")
        seen.add(id(param))
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear_method.apply(self, x, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


def _output_dim(param: torch.Tensor) -> int:
    return getattr(param, "output_dim", 0)  # a bias has only the output dim


def _narrow_output(layer: LinearBase, param: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """The part of `param` holding output features [offset, offset + size),
    in the tensor's own units (a packed format stores several per element)."""
    dim = _output_dim(param)
    per_feature = param.shape[dim] / layer.out_features
    return param.data.narrow(dim, round(offset * per_feature), round(size * per_feature))


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if not self.load_unsplit(param, loaded, shard_id):
            _copy_checked(param, loaded, "replicated linear")


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias, tp,
                         quant_config, prefix)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if self.load_unsplit(param, loaded, shard_id):
            return
        dim = _output_dim(param)
        size = param.shape[dim]
        piece = _take_shard(loaded, dim, self.tp.rank, size, size * self.tp.size, "column-parallel linear")
        _copy_checked(param, piece, "column-parallel linear")


class MergedColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPContext,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.shard_sizes = [_divide(n, tp.size, "output features") for n in out_sizes]
        super().__init__(in_features, sum(self.shard_sizes), bias, tp, quant_config, prefix)

    @property
    def output_shard_sizes(self) -> list[int]:
        return list(self.shard_sizes)

    def shard_index(self, shard_id) -> int:
        return shard_id

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:
        if self.load_unsplit(param, loaded, shard_id):
            return
        target = _narrow_output(self, param, sum(self.shard_sizes[:shard_id]), self.shard_sizes[shard_id])
        dim = _output_dim(param)
        size = target.shape[dim]
        what = f"merged linear shard {shard_id}"
        piece = _take_shard(loaded, dim, self.tp.rank, size, size * self.tp.size, what)
        _copy_checked(target, piece, what)


class QKVParallelLinear(LinearBase):
    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPContext,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
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
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, tp, quant_config, prefix)

    @property
    def output_shard_sizes(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def shard_index(self, shard_id) -> int:
        return "qkv".index(shard_id)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:
        if self.load_unsplit(param, loaded, shard_id):
            return
        if shard_id == "q":
            offset, size, rank, shards = 0, self.q_size, self.tp.rank, self.tp.size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank = self.kv_size, self.tp.rank // self.kv_replicas
            shards = self.tp.size // self.kv_replicas
        target = _narrow_output(self, param, offset, size)
        dim = _output_dim(param)
        what = f"qkv shard {shard_id}"
        piece = _take_shard(loaded, dim, rank, target.shape[dim], target.shape[dim] * shards, what)
        _copy_checked(target, piece, what)


class RowParallelLinear(LinearBase):
    input_sharded = True

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias, tp,
                         quant_config, prefix)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id=None) -> None:
        if self.load_unsplit(param, loaded, shard_id):
            return
        dim = getattr(param, "input_dim", None)
        if dim is None:  # the bias (and any per-output tensor): whole, added once after the reduce
            _copy_checked(param, loaded, "row-parallel bias")
            return
        size = param.shape[dim]
        piece = _take_shard(loaded, dim, self.tp.rank, size, size * self.tp.size, "row-parallel linear")
        _copy_checked(param, piece, "row-parallel linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias
