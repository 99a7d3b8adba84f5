// The avx512 unit: AVX-512 F / BW / VL / DQ (Skylake-SP and later Xeons, Zen 4 / 5); no AVX512-BF16 here,
// so a Skylake runs all of it.
// All x86 units share one shape: the shared headers first, then
// the target pragma, then the kernel sources in their own namespaces.

#include "prelude.h"
#include "kernel_table.h"

#if defined(RADIXSERVE_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define RADIXSERVE_ISA_AVX512 1

namespace radixserve::avx512 {
#include "simd.inc"
namespace gemm {
#include "gemm.inc"
}
namespace int_gemm {
#include "int_gemm.inc"
}
namespace attention {
#include "attention.inc"
}
namespace norm {
#include "norm.inc"
}
namespace rope {
#include "rope.inc"
}
namespace activation {
#include "activation.inc"
}
}  // namespace radixserve::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace radixserve {
const KernelTable* avx512_kernels() {
  static const KernelTable table{"avx512", kIsaAvx2 | kIsaAvx512, &avx512::gemm::bf16_linear, &avx512::int_gemm::int_linear, &avx512::attention::paged_attention, &avx512::norm::rms_norm_bf16, &avx512::rope::qk_norm_rope_store, &avx512::activation::silu_and_mul_bf16, nullptr};
  return &table;
}
}  // namespace radixserve
#else
namespace radixserve {
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace radixserve
#endif
