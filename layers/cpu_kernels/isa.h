// The instruction sets a kernel call may use: a bit mask that the Python side
// (layers/cpu_features.py) computes once per process from the CPU probe and
// the RADIXSERVE_CPU_ISA cap, and passes to every dispatching entry point.
// Each entry point runs the best variant whose bits are all set; a call with
// mask 0 runs the portable code, which every CPU can.
#pragma once

#include <cstdint>

namespace radixserve {

enum IsaBit : int64_t {
  kIsaAvx2 = 1,        // AVX2 + FMA + F16C
  kIsaAvx512 = 2,      // AVX-512 F / BW / VL / DQ
  kIsaAvx512Bf16 = 4,  // AVX512-BF16 (vdpbf16ps, vcvtneps2bf16)
  kIsaAmx = 8,         // AMX tile + bf16, and the OS lets this process use it
  // Not an instruction set, a tuning choice made with them: software-prefetch
  // the weight streams of the bf16 / int linears. It paid on an Intel Xeon
  // (1.3x on a decode step's linears) and cost 1.15-1.45x on an AMD Zen 4,
  // whose hardware prefetchers keep up on their own (layers/cpu_features.py).
  kTuneStreamPrefetch = 16,
};

inline bool has_isa(int64_t mask, IsaBit bit) { return (mask & bit) != 0; }

}  // namespace radixserve
