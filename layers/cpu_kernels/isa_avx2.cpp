// The avx2 unit: AVX2 + FMA + F16C (Haswell and later, AMD Zen 1-3, most laptops and
// many cloud VMs): every kernel.

#define RADIXSERVE_UNIT avx2
#define RADIXSERVE_UNIT_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define RADIXSERVE_UNIT_REQUIRED (kIsaAvx2)
#define RADIXSERVE_ISA_AVX2 1
#define RADIXSERVE_UNIT_HAS_GEMM 1
#define RADIXSERVE_UNIT_HAS_ATTENTION 1
#define RADIXSERVE_UNIT_HAS_ELEMENTWISE 1
#include "isa_unit.inc"
