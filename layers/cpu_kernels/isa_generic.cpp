// The portable unit: every kernel that has a plain C++ form, compiled for the
// architecture's baseline (x86-64: SSE2; arm64: NEON), so it runs on any CPU
// of the architecture. The compiler vectorises the loops written for it.

#include "prelude.h"
#include "kernel_table.h"

namespace radixserve::generic {
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
}  // namespace radixserve::generic

namespace radixserve {
const KernelTable* generic_kernels() {
  static const KernelTable table{"generic", 0, nullptr, nullptr, &generic::attention::paged_attention,
                                 &generic::norm::rms_norm_bf16, &generic::rope::qk_norm_rope_store,
                                 &generic::activation::silu_and_mul_bf16, nullptr};
  return &table;
}
}  // namespace radixserve
