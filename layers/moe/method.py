"""The expert-weight seam: how a mixture-of-experts layer stores its experts'
weights and runs them, parallel to the linear-method seam
(layers/quantization/base.py).

A `QuantizationConfig` hands each MoE layer its `MoEMethod`
(`moe_method(prefix)`); dense configs give the methods here, and a quantized
format that learns expert weights adds its own (its packed tensors, tagged
like the dense ones, load through the same expert loaders).

The methods here share one grouped computation (`GroupedExperts.apply`):
the routed (token, k) slots are sorted by expert once, each expert that got
tokens runs its MLP on its consecutive rows (no per-token Python work, idle
experts skipped) and writes them back to their slots, and one batched
product sums each token's slots with their routing weights. CUDA tensors
take the Triton grouped GEMM instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from layers.cpu_gemm import pack_cpu_linear
from layers.cpu_kernels import native_ops
from layers.moe.dispatch import group_by_expert
from layers.quantization.base import set_weight_attrs
from layers.quantization.dense import CpuPackOptions

# Tokens up to which one native call runs the whole layer's experts
# (cpu_kernels/dispatch.cpp; measured for decode of one or two sequences).
NATIVE_MOE_TOKENS = 2


class MoEMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int,
                       dtype: torch.dtype) -> None:
        """Register the weights of `num_experts` (this rank's) experts, each
        hidden -> intermediate (this rank's shard) -> hidden."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after the checkpoint (or dummy weights) are in."""

    @abstractmethod
    def apply(self, layer: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor,
              local_ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the layer's output [T, H]: the sum over each
        token's routed slots held here (local id >= 0) of weight * expert(x)."""


class GroupedExperts(MoEMethod):
    """Dense expert weights, [E, 2I, H] (gate rows, then up rows) and [E, H, I]."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden: int, intermediate: int,
                       dtype: torch.dtype) -> None:
        w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype), requires_grad=False)
        set_weight_attrs(w13, {"expert_dim": 0, "output_dim": 1, "input_dim": 2})
        set_weight_attrs(w2, {"expert_dim": 0, "output_dim": 1, "input_dim": 2})
        layer.register_parameter("w13_weight", w13)
        layer.register_parameter("w2_weight", w2)

    def expert_mlp(self, layer: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(layer.act_fn(F.linear(x, layer.w13_weight[expert])), layer.w2_weight[expert])

    def apply(self, layer: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor,
              local_ids: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda:
            from layers.moe.triton_moe import triton_fused_experts

            return triton_fused_experts(hidden, layer.w13_weight, layer.w2_weight, topk_weights, local_ids)
        groups = group_by_expert(local_ids, layer.num_local_experts)
        rows = hidden.index_select(0, groups.tokens)
        num_tokens, top_k = local_ids.shape
        # Each expert's output lands in its slots' rows (t * top_k + k); rows
        # of slots routed to another rank stay zero (their weight multiplies
        # them by nothing, but uninitialised memory could hold a NaN).
        routed_elsewhere = len(groups.slots) < num_tokens * top_k
        alloc = torch.zeros if routed_elsewhere else torch.empty
        by_slot = alloc(num_tokens * top_k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        start = 0
        for expert, count in enumerate(groups.counts):
            if count:
                end = start + count
                by_slot.index_copy_(0, groups.slots[start:end], self.expert_mlp(layer, expert, rows[start:end]))
                start = end
        # The weighted sum over each token's k slots as one batched product
        # [T, 1, k] x [T, k, H] (fp32 accumulation inside, one rounding).
        weights = topk_weights.to(hidden.dtype).unsqueeze(1)
        return torch.bmm(weights, by_slot.view(num_tokens, top_k, -1)).squeeze(1)


class CpuPackedGroupedExperts(GroupedExperts):
    """CPU bf16: each expert's two projections packed for the CPU GEMMs
    (layers/cpu_gemm.py, as dense linears are), the plain copies dropped.
    Where the native kernels are built, the streaming-GEMV copies of all
    experts sit in one stacked tensor per projection, and one or two tokens
    (decode) run in one native call (cpu_kernels/dispatch.cpp) instead of the
    grouped torch path."""

    def __init__(self, options: CpuPackOptions) -> None:
        self.options = options

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pack = self.options
        layer.packed_experts = [
            (pack_cpu_linear(w13, pack.batch_size_hint, pack.small_batch_gemv, pack.streaming_rows),
             pack_cpu_linear(w2, pack.batch_size_hint, pack.small_batch_gemv, pack.streaming_rows))
            for w13, w2 in zip(layer.w13_weight, layer.w2_weight)
        ]
        layer.streaming_experts = None
        if all(up.streaming is not None and down.streaming is not None for up, down in layer.packed_experts):
            # Stacked, and each expert's linear keeps a view: one copy in memory.
            stacks = tuple(torch.stack([linear.streaming for linear in column])
                           for column in zip(*layer.packed_experts))
            for expert, linears in enumerate(layer.packed_experts):
                for linear, stack in zip(linears, stacks):
                    linear.streaming = stack[expert]
            layer.streaming_experts = stacks
        layer.w13_weight.data = torch.empty(0, dtype=layer.w13_weight.dtype)
        layer.w2_weight.data = torch.empty(0, dtype=layer.w2_weight.dtype)

    def expert_mlp(self, layer: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        up, down = layer.packed_experts[expert]
        return down(layer.act_fn(up(x, None)), None)

    def apply(self, layer: nn.Module, hidden: torch.Tensor, topk_weights: torch.Tensor,
              local_ids: torch.Tensor) -> torch.Tensor:
        if (layer.streaming_experts is not None and hidden.shape[0] <= NATIVE_MOE_TOKENS
                and layer.act_fn.use_native and hidden.is_contiguous()):
            ops = native_ops()
            w13, w2 = layer.streaming_experts
            return ops.moe_experts_bf16(hidden, local_ids, topk_weights, w13, w2, layer.intermediate)
        return super().apply(layer, hidden, topk_weights, local_ids)
