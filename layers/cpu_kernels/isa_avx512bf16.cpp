// The avx512bf16 unit: AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4 / 5): only the kernel that
// uses bf16 dot products (attention); the rest comes from the AVX-512 unit.
// All x86 units share one shape: the shared headers first, then
// the target pragma, then the kernel sources in their own namespaces.

#include "prelude.h"
#include "kernel_table.h"

#if defined(RADIXSERVE_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define RADIXSERVE_ISA_AVX512 1
#define RADIXSERVE_ISA_AVX512BF16 1

namespace radixserve::avx512bf16 {
#include "simd.inc"
namespace attention {
#include "attention.inc"
}
}  // namespace radixserve::avx512bf16

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace radixserve {
const KernelTable* avx512bf16_kernels() {
  static const KernelTable table{"avx512bf16", kIsaAvx2 | kIsaAvx512 | kIsaAvx512Bf16, nullptr, nullptr, &avx512bf16::attention::paged_attention, nullptr, nullptr, nullptr, nullptr};
  return &table;
}
}  // namespace radixserve
#else
namespace radixserve {
const KernelTable* avx512bf16_kernels() { return nullptr; }
}  // namespace radixserve
#endif
