// The avx512 unit: AVX-512 F / BW / VL / DQ (Skylake-SP and later Xeons, Zen 4 / 5): every
// kernel. No AVX512-BF16 here, so a Skylake runs all of it.

#define RADIXSERVE_UNIT avx512
#define RADIXSERVE_UNIT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define RADIXSERVE_UNIT_REQUIRED (kIsaAvx2 | kIsaAvx512)
#define RADIXSERVE_ISA_AVX512 1
#define RADIXSERVE_UNIT_HAS_GEMM 1
#define RADIXSERVE_UNIT_HAS_ATTENTION 1
#define RADIXSERVE_UNIT_HAS_ELEMENTWISE 1
#include "isa_unit.inc"
