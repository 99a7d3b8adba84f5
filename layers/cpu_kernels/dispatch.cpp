// The entry points Python calls: each takes the caller's ISA mask (isa.h)
// and runs the kernel from the best instruction-set unit the mask allows
// (kernel_table.h). Also here: the CPU probe (cpuid / hwcaps, as the CPU
// itself answers, so an emulator's answer is the emulated CPU's), the AMX
// permission, and the MoE experts, which only chain other entry points.
//
// Compiled for the baseline: nothing here may use an instruction set the
// probe has not confirmed.

#include <torch/extension.h>

#include <array>
#include <map>
#include <string>

#include "dispatch.h"
#include "isa.h"
#include "kernel_table.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace radixserve {
namespace {

// Best first: the first table the mask allows that has a kernel runs it.
std::array<const KernelTable*, 5> tables() {
  return {amx_kernels(), avx512bf16_kernels(), avx512_kernels(), avx2_kernels(), generic_kernels()};
}

// The best table the mask allows that has this kernel, or nullptr.
template <typename Fn>
const KernelTable* best_table(int64_t isa, Fn KernelTable::*entry) {
  for (const KernelTable* table : tables())
    if (table != nullptr && (isa & table->required) == table->required && table->*entry != nullptr) return table;
  return nullptr;
}

template <typename Fn>
Fn pick(int64_t isa, Fn KernelTable::*entry) {
  const KernelTable* table = best_table(isa, entry);
  return table != nullptr ? table->*entry : nullptr;
}

template <typename Fn>
const char* picked_unit(int64_t isa, Fn KernelTable::*entry) {
  const KernelTable* table = best_table(isa, entry);
  return table != nullptr ? table->name : "none";
}

#if defined(__x86_64__) || defined(_M_X64)
// Linux gives a process AMX tile state only once it asks (oneDNN asks too).
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}
#else
bool amx_permitted() { return false; }
#endif

}  // namespace

// The CPU's features, named as Linux's /proc/cpuinfo names them. x86: cpuid,
// with the OS's consent from xgetbv (AVX needs the ymm state saved, AVX-512
// the zmm and mask state, AMX the tile state and Linux's permission).
std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a = 0, b = 0, c = 0, d = 0;
  unsigned vendor[3] = {0, 0, 0};
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  __cpuid(0, a, vendor[0], vendor[2], vendor[1]);  // "GenuineIntel" is ebx, edx, ecx
  const std::string vendor_id(reinterpret_cast<const char*>(vendor), sizeof(vendor));
  // Not features: who made the CPU, for tuning choices (isa.h's kTuneStreamPrefetch).
  f["vendor_intel"] = vendor_id == "GenuineIntel";
  f["vendor_amd"] = vendor_id == "AuthenticAMD" || vendor_id == "HygonGenuine";
  __cpuid(1, a, b, c, d);
  const bool osxsave = c & (1u << 27);
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_avx = osxsave && (xcr0 & 0x6) == 0x6;            // xmm + ymm state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;        // opmask + zmm state
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;               // tile config + data
  f["sse4_2"] = c & (1u << 20);
  f["fma"] = os_avx && (c & (1u << 12));
  f["f16c"] = os_avx && (c & (1u << 29));
  f["avx"] = os_avx && (c & (1u << 28));
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned ebx7 = b, ecx7 = c, edx7 = d;
    f["avx2"] = os_avx && (ebx7 & (1u << 5));
    f["avx512f"] = os_avx512 && (ebx7 & (1u << 16));
    f["avx512dq"] = os_avx512 && (ebx7 & (1u << 17));
    f["avx512bw"] = os_avx512 && (ebx7 & (1u << 30));
    f["avx512vl"] = os_avx512 && (ebx7 & (1u << 31));
    f["avx512_vnni"] = os_avx512 && (ecx7 & (1u << 11));
    f["amx_bf16"] = os_amx && (edx7 & (1u << 22));
    f["amx_tile"] = os_amx && (edx7 & (1u << 24));
    f["amx_int8"] = os_amx && (edx7 & (1u << 25));
    __cpuid_count(7, 1, a, b, c, d);
    f["avx_vnni"] = os_avx && (a & (1u << 4));
    f["avx512_bf16"] = os_avx512 && (a & (1u << 5));
    f["avx_ne_convert"] = os_avx && (d & (1u << 5));
  }
  if (f["amx_tile"]) f["amx_permitted"] = amx_permitted();
#elif defined(__aarch64__) && defined(__linux__)
  const unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
  f["asimd"] = hwcap & (1ul << 1);
  f["asimddp"] = hwcap & (1ul << 20);
  f["sve"] = hwcap & (1ul << 22);
  f["sve2"] = hwcap2 & (1ul << 1);
  f["i8mm"] = hwcap2 & (1ul << 13);
  f["bf16"] = hwcap2 & (1ul << 14);
#endif
  return f;
}

bool bf16_gemm_supported(int64_t isa) { return pick(isa, &KernelTable::bf16_linear) != nullptr; }
bool int_gemm_supported(int64_t isa) { return pick(isa, &KernelTable::int_linear) != nullptr; }
bool amx_int_gemm_usable(int64_t isa) { return pick(isa, &KernelTable::amx_linear) != nullptr && amx_permitted(); }

// Which unit each kernel runs from under this mask (the probe reports it).
std::map<std::string, std::string> kernel_units(int64_t isa) {
  return {{"bf16_linear", picked_unit(isa, &KernelTable::bf16_linear)},
          {"int_linear", picked_unit(isa, &KernelTable::int_linear)},
          {"int_linear_many_rows", amx_int_gemm_usable(isa) ? "amx" : picked_unit(isa, &KernelTable::int_linear)},
          {"paged_attention", picked_unit(isa, &KernelTable::paged_attention)},
          {"rms_norm_bf16", picked_unit(isa, &KernelTable::rms_norm_bf16)},
          {"qk_norm_rope_store", picked_unit(isa, &KernelTable::qk_norm_rope_store)},
          {"silu_and_mul_bf16", picked_unit(isa, &KernelTable::silu_and_mul_bf16)}};
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features, int64_t isa) {
  const auto kernel = pick(isa, &KernelTable::bf16_linear);
  TORCH_CHECK(kernel != nullptr, "bf16_linear needs AVX2 or AVX-512 (check bf16_gemm_supported())");
  return kernel(x, packed, bias, out_features, has_isa(isa, kTuneStreamPrefetch));
}

torch::Tensor int_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t out_features, int64_t group_size, int64_t bits, bool has_offset, int64_t amx_min_rows,
                         int64_t isa) {
  const auto kernel = pick(isa, &KernelTable::int_linear);
  TORCH_CHECK(kernel != nullptr, "int_linear needs AVX2 or AVX-512 (check int_gemm_supported())");
  const AmxLinearFn amx = amx_int_gemm_usable(isa) ? pick(isa, &KernelTable::amx_linear) : nullptr;
  return kernel(x, packed, bias, out_features, group_size, bits, has_offset, amx_min_rows, amx,
                has_isa(isa, kTuneStreamPrefetch));
}

void paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& req_to_token, const torch::Tensor& req_pool_indices,
                     const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens, double scale,
                     torch::Tensor& out, int64_t isa) {
  pick(isa, &KernelTable::paged_attention)(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                                           extend_lens, scale, out);
}

torch::Tensor rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                            const torch::Tensor& weight, double eps, int64_t isa) {
  return pick(isa, &KernelTable::rms_norm_bf16)(x, residual, weight, eps);
}

torch::Tensor qk_norm_rope_store(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& q_weight,
                                 const c10::optional<torch::Tensor>& k_weight, double eps, const torch::Tensor& cos,
                                 const torch::Tensor& signed_sin, torch::Tensor& k_cache, torch::Tensor& v_cache,
                                 const torch::Tensor& slots, int64_t num_heads, int64_t num_kv_heads, int64_t isa) {
  return pick(isa, &KernelTable::qk_norm_rope_store)(qkv, q_weight, k_weight, eps, cos, signed_sin, k_cache, v_cache,
                                                     slots, num_heads, num_kv_heads);
}

torch::Tensor silu_and_mul_bf16(const torch::Tensor& x, int64_t isa) {
  return pick(isa, &KernelTable::silu_and_mul_bf16)(x);
}

// A mixture-of-experts layer's experts for one or two tokens (decode) on CPU,
// bf16: for each routed (token, k) slot, silu-and-mul of the expert's gate/up
// GEMV, its down GEMV, and the routing-weighted sum per token.
//
// Why: at one or two rows each expert projection is a weight-streaming GEMV
// (gemm.inc), and the grouped torch path around them (sort the slots, gather
// rows, write back, weighted sum: ~20 tensor ops per layer) cost more than
// a third of the experts' own time on the small demo MoE. Here the same
// kernels run straight from C++ with no per-op dispatch: the slot loop is
// over top_k * tokens (<= 2 * top_k), not worth sorting by expert.
//
// Rounding matches the grouped path: each projection rounds to bf16 (as the
// streaming GEMV does), silu-and-mul as SiluAndMul; the weighted sum of a
// token's slots accumulates in fp32 and rounds once.
//
// x [T, H] bf16; topk_ids [T, K] int64 (local expert, -1: another rank's);
// topk_weights [T, K] fp32; w13 [E, ceil(2I/16), H, 16] and w2 [E, ceil(H/16), I, 16]
// stacked packed weights (pack_bf16_weight per expert) -> [T, H] bf16.
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_ids,
                               const torch::Tensor& topk_weights, const torch::Tensor& w13,
                               const torch::Tensor& w2, int64_t intermediate, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [T, H] bf16");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_ids.scalar_type() == torch::kInt64,
              "topk_ids must be [T, K] int64");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && topk_weights.scalar_type() == torch::kFloat32,
              "topk_weights must be [T, K] fp32");
  TORCH_CHECK(w13.dim() == 4 && w2.dim() == 4 && w13.size(0) == w2.size(0), "w13 / w2 must be stacked packed weights");
  const int64_t tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1), experts = w13.size(0);
  const auto ids = topk_ids.contiguous();
  const auto weights = topk_weights.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* weight = weights.data_ptr<float>();
  auto total = torch::zeros({tokens, hidden}, x.options().dtype(torch::kFloat32));
  for (int64_t t = 0; t < tokens; ++t) {
    const auto row = x.narrow(0, t, 1);
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t expert = id[t * top_k + k];
      if (expert < 0) continue;
      TORCH_CHECK(expert < experts, "expert id ", expert, " out of range (", experts, " experts)");
      const auto gate_up = bf16_linear(row, w13.select(0, expert), c10::nullopt, 2 * intermediate, isa);
      const auto down = bf16_linear(silu_and_mul_bf16(gate_up, isa), w2.select(0, expert), c10::nullopt, hidden, isa);
      total[t].add_(down[0].to(torch::kFloat32), weight[t * top_k + k]);
    }
  }
  return total.to(torch::kBFloat16);
}

}  // namespace radixserve
