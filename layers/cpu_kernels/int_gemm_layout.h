// The packed layout of the int8 / int4 weight-only GEMM kernels (described at
// the top of int_gemm.inc): sizes only, the same on every instruction set.
// The per-instruction-set parts (the store of a panel's sums, the AMX entry)
// are in int_gemm_store.inc and int_gemm_amx.inc.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace radixserve::int_gemm {

constexpr int kBlock = 16;  // outputs per block (one zmm / two ymm of fp32)
constexpr int64_t kTail = 64;  // bytes after the last block: the offset int4 loads read up to 3 past it
constexpr int kAmxK = 32;  // inputs per AMX tile step (a 64-byte tile row of bf16): K must be a multiple

// Sizes in the packed layout: per group and block, a header of scales (and
// offsets), then G x 16 bytes (int8) or G x 8 bytes (int4).
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

}  // namespace radixserve::int_gemm
