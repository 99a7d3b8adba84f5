// The dispatching entry points (dispatch.cpp): each takes `isa`, the mask of
// instruction sets it may use (isa.h), and runs the best variant it allows.
// Declared once for the bindings and for the C++ callers that chain them
// (decoder_stack.cpp).
#pragma once

#include <torch/extension.h>

#include <map>
#include <string>

namespace radixserve {
std::map<std::string, bool> cpu_features();
std::map<std::string, std::string> kernel_units(int64_t isa);
bool bf16_gemm_supported(int64_t isa);
bool int_gemm_supported(int64_t isa);
bool amx_int_gemm_usable(int64_t isa);
void paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& req_to_token, const torch::Tensor& req_pool_indices,
                     const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens, double scale,
                     torch::Tensor& out, int64_t isa);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                            const torch::Tensor& weight, double eps, int64_t isa);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t isa);
torch::Tensor qk_norm_rope_store(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& q_weight,
                                 const c10::optional<torch::Tensor>& k_weight, double eps,
                                 const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                 torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t isa);
torch::Tensor silu_and_mul_bf16(const torch::Tensor& x, int64_t isa);
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_ids,
                               const torch::Tensor& topk_weights, const torch::Tensor& w13,
                               const torch::Tensor& w2, int64_t intermediate, int64_t isa);
torch::Tensor int_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t out_features, int64_t group_size, int64_t bits, bool has_offset, int64_t amx_min_rows,
                         int64_t isa);
}  // namespace radixserve
