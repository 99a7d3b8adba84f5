// A mixture-of-experts layer's experts for one or two tokens (decode) on CPU,
// bf16: for each routed (token, k) slot, silu-and-mul of the expert's gate/up
// GEMV, its down GEMV, and the routing-weighted sum per token.
//
// Why: at one or two rows each expert projection is a weight-streaming GEMV
// (gemm.cpp), and the grouped torch path around them (sort the slots, gather
// rows, write back, weighted sum: ~20 tensor ops per layer) cost more than
// a third of the experts' own time on the small demo MoE. Here the same
// kernels run straight from C++ with no per-op dispatch: the slot loop is
// over top_k * tokens (<= 2 * top_k), not worth sorting by expert.
//
// Rounding matches the grouped path: each projection rounds to bf16 (as the
// streaming GEMV does), silu-and-mul as SiluAndMul; the weighted sum of a
// token's slots accumulates in fp32 and rounds once.

#include <torch/extension.h>

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features);
torch::Tensor silu_and_mul_bf16(const torch::Tensor& x);

// x [T, H] bf16; topk_ids [T, K] int64 (local expert, -1: another rank's);
// topk_weights [T, K] fp32; w13 [E, ceil(2I/16), H, 16] and w2 [E, ceil(H/16), I, 16]
// stacked packed weights (pack_bf16_weight per expert) -> [T, H] bf16.
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_ids,
                               const torch::Tensor& topk_weights, const torch::Tensor& w13,
                               const torch::Tensor& w2, int64_t intermediate) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [T, H] bf16");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_ids.scalar_type() == torch::kInt64,
              "topk_ids must be [T, K] int64");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && topk_weights.scalar_type() == torch::kFloat32,
              "topk_weights must be [T, K] fp32");
  TORCH_CHECK(w13.dim() == 4 && w2.dim() == 4 && w13.size(0) == w2.size(0), "w13 / w2 must be stacked packed weights");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1), experts = w13.size(0);
  const auto ids = topk_ids.contiguous();
  const auto weights = topk_weights.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* weight = weights.data_ptr<float>();
  auto total = torch::zeros({tokens, hidden}, x.options().dtype(torch::kFloat32));
  for (int64_t t = 0; t < tokens; ++t) {
    const auto row = x.narrow(0, t, 1);
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t expert = id[t * top_k + k];
      if (expert < 0) continue;
      TORCH_CHECK(expert < experts, "expert id ", expert, " out of range (", experts, " experts)");
      const auto gate_up = bf16_linear(row, w13.select(0, expert), c10::nullopt, 2 * intermediate);
      const auto down = bf16_linear(silu_and_mul_bf16(gate_up), w2.select(0, expert), c10::nullopt, hidden);
      total[t].add_(down[0].to(torch::kFloat32), weight[t * top_k + k]);
    }
  }
  return total.to(torch::kBFloat16);
}
