// The avx512bf16 unit: AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4 / 5): only
// the kernel that uses bf16 dot products (attention); the rest comes from the
// AVX-512 unit.

#define RADIXSERVE_UNIT avx512bf16
#define RADIXSERVE_UNIT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define RADIXSERVE_UNIT_REQUIRED (kIsaAvx2 | kIsaAvx512 | kIsaAvx512Bf16)
#define RADIXSERVE_ISA_AVX512 1
#define RADIXSERVE_ISA_AVX512BF16 1
#define RADIXSERVE_UNIT_HAS_ATTENTION 1
#include "isa_unit.inc"
