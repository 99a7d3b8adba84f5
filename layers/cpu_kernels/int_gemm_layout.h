// What the two int8 / int4 weight-only GEMM kernels share: the packed
// layout (described at the top of int_gemm.cpp, which packs it and runs the
// FMA kernel for few rows), the store of a panel's fp32 sums into y, and the
// entry of the AMX kernel for many rows (int_gemm_amx.cpp).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "numerics.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RADIXSERVE_INT_GEMM 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define RADIXSERVE_INT_AMX 1
#endif
#endif

namespace radixserve::int_gemm {

constexpr int kBlock = 16;  // outputs per block (one zmm of fp32)
constexpr int64_t kTail = 64;  // bytes after the last block: the offset int4 loads read up to 3 past it

// Sizes in the packed layout (int_gemm.cpp's top comment): per group and
// block, a header of scales (and offsets), then G x 16 bytes (int8) or G x 8
// bytes (int4).
struct Layout {
  int64_t k, group, groups, header_bytes, group_bytes, block_bytes;
  bool int4, has_offset;
  Layout(int64_t k_, int64_t group_, int64_t bits, bool has_offset_)
      : k(k_), group(group_), groups(k_ / group_), int4(bits == 4), has_offset(has_offset_) {
    header_bytes = (has_offset ? 2 : 1) * kBlock * static_cast<int64_t>(sizeof(float));
    group_bytes = header_bytes + group * kBlock / (int4 ? 2 : 1);
    block_bytes = groups * group_bytes;
  }
  int64_t packed_bytes(int64_t n) const { return (n + kBlock - 1) / kBlock * block_bytes + kTail; }
};

inline void check_layout(int64_t k, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, not ", bits);
  TORCH_CHECK(group > 0 && k % group == 0, "group size ", group, " does not divide K = ", k);
  TORCH_CHECK(bits == 8 || group % 8 == 0, "int4 needs a group size that is a multiple of 8, not ", group);
}

#if defined(RADIXSERVE_INT_GEMM)
// tot (+ bias) -> y rows [0, m) of one panel, rounded to bf16 or stored as
// fp32.
inline void store_panel(const float* tot, int64_t tot_stride, int64_t m, int nr, int64_t n0, int64_t n_total,
                        const float* bias, void* y, bool out_fp32) {
  for (int j = 0; j < nr; ++j) {
    const int64_t n = n0 + j * kBlock;
    const int valid = static_cast<int>(std::min<int64_t>(kBlock, n_total - n));
    if (valid <= 0) break;
    const __mmask16 lanes = valid == kBlock ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + n) : _mm512_setzero_ps();
    for (int64_t i = 0; i < m; ++i) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(tot + i * tot_stride + j * kBlock), b);
      if (out_fp32) {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + i * n_total + n, lanes, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<at::BFloat16*>(y) + i * n_total + n, lanes, radixserve::narrow_x16(v));
      }
    }
  }
}
#endif

#if defined(RADIXSERVE_INT_AMX)
constexpr int kAmxK = 32;  // inputs per tile step (a 64-byte tile row of bf16): K must be a multiple

// Whether Linux gave this process AMX tile state (asked for once).
bool amx_permitted();

// y [m, out_features] bf16 = x [m, L.k] bf16 times the packed weight w (+ bias).
void amx_linear(const Layout& L, const uint8_t* w, const uint16_t* x, int64_t m, const float* bias,
                int64_t out_features, at::BFloat16* y);
#endif

}  // namespace radixserve::int_gemm
