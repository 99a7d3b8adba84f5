// Qwen3/Llama attention input in one pass: per-head RMSNorm of q and k
// (Qwen3), rotary embedding, and the write of k and v into the paged KV
// cache, from the fused qkv projection's output.
//
// Why: unfused, this is ~11 torch ops per layer (norm, weight, flip, two
// products, a sum, two reshape copies, two index copies ...). At batch 1
// each op costs more in dispatch than in arithmetic, and a decode step runs
// them for every layer.
//
// Arithmetic matches the unfused bf16 path rounding for rounding:
//   n   = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w)   (transformers' order)
//   out = bf16(bf16(n * cos) + bf16(swap_halves(n) * signed_sin))
// so greedy tokens do not move when the fused path is switched on.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "numerics.h"

#include <cmath>
#include <cstdint>

using radixserve::narrow;
using radixserve::round_bf16;
using radixserve::widen;

namespace {

constexpr int kMaxHeadDim = 512;

const uint16_t* bits_of(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
uint16_t* bits_of(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, name, " must be bf16");
}

// One head: src -> dst (both head_dim long).
void norm_rope_head(const uint16_t* src, uint16_t* dst, const uint16_t* gain, float eps, const uint16_t* cos,
                    const uint16_t* sin, int head_dim) {
  float normed[kMaxHeadDim];
  if (gain != nullptr) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int d = 0; d < head_dim; ++d) squares += widen(src[d]) * widen(src[d]);
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(head_dim) + eps);
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) normed[d] = round_bf16(round_bf16(widen(src[d]) * scale) * widen(gain[d]));
  } else {
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) normed[d] = widen(src[d]);
  }
  const int half = head_dim / 2;
#pragma omp simd
  for (int d = 0; d < head_dim; ++d) {
    const float swapped = normed[d < half ? d + half : d - half];
    dst[d] = narrow(round_bf16(normed[d] * widen(cos[d])) + round_bf16(swapped * widen(sin[d])));
  }
}

}  // namespace

// qkv [T, (Hq + 2 Hkv) D] bf16, rows contiguous; q_weight / k_weight [D] bf16
// (both or neither: Qwen3's per-head norms); cos / signed_sin [T, D] bf16
// rows (this step's positions, first half of sin negated); k_cache / v_cache
// [slots, Hkv, D] bf16; slots [T] int64. Writes rotated k and v to the cache
// at `slots`; returns the rotated queries, [T, Hq D].
torch::Tensor qk_norm_rope_store(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& q_weight,
                                 const c10::optional<torch::Tensor>& k_weight, double eps,
                                 const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                 torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                 int64_t num_heads, int64_t num_kv_heads) {
  check_bf16(qkv, "qkv");
  check_bf16(cos, "cos");
  check_bf16(signed_sin, "signed_sin");
  check_bf16(k_cache, "k_cache");
  check_bf16(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(1) == num_kv_heads,
              "k_cache / v_cache must be contiguous [slots, num_kv_heads, head_dim]");
  const int64_t head_dim = k_cache.size(2);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "head_dim must be even and at most ", kMaxHeadDim);
  const int64_t tokens = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim && qkv.stride(1) == 1,
              "qkv must be [T, (Hq + 2 Hkv) D] with contiguous rows");
  for (const auto* t : {&cos, &signed_sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == tokens && t->size(1) == head_dim && t->stride(1) == 1,
                "cos / signed_sin must be [T, head_dim] with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1 && slots.size(0) == tokens &&
                  slots.is_contiguous(),
              "slots must be [T] int64");
  const bool norm = q_weight.has_value() && q_weight->defined();
  TORCH_CHECK(norm == (k_weight.has_value() && k_weight->defined()), "pass both q_weight and k_weight, or neither");
  torch::Tensor qw, kw;
  if (norm) {
    qw = q_weight->contiguous();
    kw = k_weight->contiguous();
    check_bf16(qw, "q_weight");
    check_bf16(kw, "k_weight");
    TORCH_CHECK(qw.numel() == head_dim && kw.numel() == head_dim, "q_weight / k_weight must have head_dim elements");
  }
  const int64_t num_slots = k_cache.size(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache (", num_slots, " slots)");

  auto q_out = torch::empty({tokens, num_heads * head_dim}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* src = bits_of(qkv);
  const int64_t src_stride = qkv.stride(0);
  const uint16_t* cos_bits = bits_of(cos);
  const uint16_t* sin_bits = bits_of(signed_sin);
  const uint16_t* q_gain = norm ? bits_of(qw) : nullptr;
  const uint16_t* k_gain = norm ? bits_of(kw) : nullptr;
  uint16_t* q_dst = bits_of(q_out);
  uint16_t* k_dst = bits_of(k_cache);
  uint16_t* v_dst = bits_of(v_cache);
  const int64_t rotated_heads = num_heads + num_kv_heads;
  const int64_t kv_row = num_kv_heads * head_dim;
  const int hd = static_cast<int>(head_dim);
  const float epsilon = static_cast<float>(eps);
  // A token's heads are a few hundred values: parallel only across many tokens.
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* row = src + t * src_stride;
      const uint16_t* c = cos_bits + t * cos.stride(0);
      const uint16_t* s = sin_bits + t * signed_sin.stride(0);
      for (int64_t h = 0; h < rotated_heads; ++h) {
        const bool is_query = h < num_heads;
        uint16_t* dst = is_query ? q_dst + (t * num_heads + h) * head_dim
                                 : k_dst + slot[t] * kv_row + (h - num_heads) * head_dim;
        norm_rope_head(row + h * head_dim, dst, is_query ? q_gain : k_gain, epsilon, c, s, hd);
      }
      std::memcpy(v_dst + slot[t] * kv_row, row + rotated_heads * head_dim, kv_row * sizeof(uint16_t));
    }
  });
  return q_out;
}
