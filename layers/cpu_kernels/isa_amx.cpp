// The amx unit: AMX tiles (Sapphire Rapids and later Xeons): the int8 / int4 GEMM for many rows.
// All x86 units share one shape: the shared headers first, then
// the target pragma, then the kernel sources in their own namespaces.

#include "prelude.h"
#include "kernel_table.h"

#if defined(RADIXSERVE_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define RADIXSERVE_ISA_AVX512 1
#define RADIXSERVE_ISA_AMX 1

namespace radixserve::amx {
#include "simd.inc"
namespace amx {
#include "int_gemm_amx.inc"
}
}  // namespace radixserve::amx

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace radixserve {
const KernelTable* amx_kernels() {
  static const KernelTable table{"amx", kIsaAvx2 | kIsaAvx512 | kIsaAvx512Bf16 | kIsaAmx, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, &amx::amx::amx_linear};
  return &table;
}
}  // namespace radixserve
#else
namespace radixserve {
const KernelTable* amx_kernels() { return nullptr; }
}  // namespace radixserve
#endif
