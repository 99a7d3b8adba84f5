// The seam between the dispatching entry points (dispatch.cpp) and the
// instruction-set units (isa_*.cpp): each unit fills one table with the
// kernels it compiles for its instruction set (nullptr where it has none),
// and the dispatcher takes each kernel from the best table the caller's
// ISA mask allows.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "int_gemm_layout.h"

namespace radixserve {

// y [m, out_features] bf16 = x [m, L.k] bf16 times a packed int weight (+ bias), on AMX tiles.
// (The linears' `prefetch`: whether to software-prefetch their weight
// streams, kTuneStreamPrefetch in isa.h.)
using AmxLinearFn = void (*)(const int_gemm::Layout& L, const uint8_t* w, const uint16_t* x, int64_t m,
                             const float* bias, int64_t out_features, at::BFloat16* y);

struct KernelTable {
  const char* name;
  int64_t required;  // the IsaBit mask a caller must allow
  torch::Tensor (*bf16_linear)(const torch::Tensor& x, const torch::Tensor& packed,
                               const c10::optional<torch::Tensor>& bias, int64_t out_features, bool prefetch);
  torch::Tensor (*int_linear)(const torch::Tensor& x, const torch::Tensor& packed,
                              const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t group_size,
                              int64_t bits, bool has_offset, int64_t amx_min_rows, AmxLinearFn amx,
                              bool prefetch);
  void (*paged_attention)(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                          const torch::Tensor& req_to_token, const torch::Tensor& req_pool_indices,
                          const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens, double scale,
                          torch::Tensor& out);
  torch::Tensor (*rms_norm_bf16)(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                 const torch::Tensor& weight, double eps);
  torch::Tensor (*qk_norm_rope_store)(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& q_weight,
                                      const c10::optional<torch::Tensor>& k_weight, double eps,
                                      const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                      torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                      int64_t num_heads, int64_t num_kv_heads);
  torch::Tensor (*silu_and_mul_bf16)(const torch::Tensor& x);
  AmxLinearFn amx_linear;
};

// One table per unit; nullptr where the unit is not built for this machine's
// architecture (the x86 units on arm64).
const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();
const KernelTable* avx512bf16_kernels();
const KernelTable* amx_kernels();

}  // namespace radixserve
