// The amx unit: AMX tiles (Sapphire Rapids and later Xeons): the int8 / int4 GEMM for
// many rows.

#define RADIXSERVE_UNIT amx
#define RADIXSERVE_UNIT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define RADIXSERVE_UNIT_REQUIRED (kIsaAvx2 | kIsaAvx512 | kIsaAvx512Bf16 | kIsaAmx)
#define RADIXSERVE_ISA_AVX512 1
#define RADIXSERVE_ISA_AMX 1
#define RADIXSERVE_UNIT_HAS_AMX 1
#include "isa_unit.inc"
