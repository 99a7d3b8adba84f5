// The avx2 unit: AVX2 + FMA + F16C (Haswell and later, AMD Zen 1-3, most laptops and many cloud VMs).
// All x86 units share one shape: the shared headers first, then
// the target pragma, then the kernel sources in their own namespaces.

#include "prelude.h"
#include "kernel_table.h"

#if defined(RADIXSERVE_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define RADIXSERVE_ISA_AVX2 1

namespace radixserve::avx2 {
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
}  // namespace radixserve::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace radixserve {
const KernelTable* avx2_kernels() {
  static const KernelTable table{"avx2", kIsaAvx2, &avx2::gemm::bf16_linear, &avx2::int_gemm::int_linear, &avx2::attention::paged_attention, &avx2::norm::rms_norm_bf16, &avx2::rope::qk_norm_rope_store, &avx2::activation::silu_and_mul_bf16, nullptr};
  return &table;
}
}  // namespace radixserve
#else
namespace radixserve {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace radixserve
#endif
