// The portable unit: every kernel that has a plain C++ form, compiled for the
// architecture's baseline (x86-64: SSE2; arm64: NEON), so it runs on any CPU
// of the architecture. The compiler vectorises the loops written for it.

#define RADIXSERVE_UNIT generic
#define RADIXSERVE_UNIT_REQUIRED 0
#define RADIXSERVE_UNIT_HAS_ATTENTION 1
#define RADIXSERVE_UNIT_HAS_ELEMENTWISE 1
#include "isa_unit.inc"
