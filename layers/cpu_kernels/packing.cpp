// Weight packing for the GEMM kernels: plain C++ that runs once at load
// time, in the layouts gemm.inc and int_gemm.inc describe. The layouts are
// the same on every instruction set, so a packed weight serves whichever
// variant a call dispatches to.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include "int_gemm_layout.h"

using radixserve::int_gemm::check_layout;
using radixserve::int_gemm::kBlock;
using radixserve::int_gemm::Layout;

// weight [N, K] bf16 -> packed [ceil(N/16), K, 16] bf16 (as int16), outputs
// past N zero.
torch::Tensor pack_bf16_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "weight must be [N, K] bf16");
  const auto w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto packed = torch::zeros({blocks, k, kBlock}, torch::kInt16);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int lane = 0; lane < kBlock && b * kBlock + lane < n; ++lane) {
        const uint16_t* row = src + (b * kBlock + lane) * k;
        for (int64_t kk = 0; kk < k; ++kk) dst[(b * k + kk) * kBlock + lane] = row[kk];
      }
  });
  return packed;
}

// q [N, K] int8 (bits 4: -8..7), scale [N, K/G] fp32, offset like scale or
// None -> the layout above as flat uint8; outputs past N have zero weight
// and scale.
torch::Tensor pack_int_weight(const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t group_size, int64_t bits) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "q must be [N, K] int8");
  const int64_t n = q.size(0), k = q.size(1);
  check_layout(k, group_size, bits);
  const int64_t groups = k / group_size;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.dim() == 2 && scale.size(0) == n &&
                  scale.size(1) == groups,
              "scale must be [N, K / group_size] fp32");
  const bool has_offset = offset.has_value() && offset->defined();
  if (has_offset)
    TORCH_CHECK(offset->scalar_type() == torch::kFloat32 && offset->sizes() == scale.sizes(),
                "offset must be shaped like scale, fp32");
  const Layout L(k, group_size, bits, has_offset);
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous();
  const auto oc = has_offset ? offset->contiguous() : torch::Tensor();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto packed = torch::zeros({L.packed_bytes(n)}, torch::kUInt8);
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* op = has_offset ? oc.data_ptr<float>() : nullptr;
  uint8_t* dst = packed.data_ptr<uint8_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* base = dst + b * L.block_bytes + g * L.group_bytes;
        float* header = reinterpret_cast<float*>(base);
        uint8_t* w = base + L.header_bytes;
        for (int lane = 0; lane < kBlock && b * kBlock + lane < n; ++lane) {
          const int64_t row = b * kBlock + lane;
          header[lane] = sp[row * groups + g];
          if (has_offset) header[kBlock + lane] = op[row * groups + g];
          const int8_t* src = qp + row * k + g * group_size;
          if (L.int4) {
            uint32_t* words = reinterpret_cast<uint32_t*>(w);
            for (int64_t t = 0; t < group_size / 8; ++t) {
              uint32_t word = 0;
              for (int i = 0; i < 8; ++i) {
                const int v = src[t * 8 + i];
                if (v < -8 || v > 7) out_of_range = true;
                word |= static_cast<uint32_t>((v + 8) & 15) << (4 * i);
              }
              words[t * kBlock + lane] = word;
            }
          } else {
            for (int64_t kk = 0; kk < group_size; ++kk) w[kk * kBlock + lane] = static_cast<uint8_t>(src[kk]);
          }
        }
      }
  });
  TORCH_CHECK(!out_of_range, "int4 weights must lie in [-8, 7]");
  return packed;
}
