// bf16 linear layers on AVX-512 CPUs: y = x W^T (+ bias).
//
// Why: at decode batch sizes a linear layer only has to stream its weight
// once, but oneDNN's bf16 path reached about a third of the machine's memory
// bandwidth at one row. Here the weight is packed once at load time into
// blocks of 16 output features ([N/16][K][16] bf16), so one 32-byte load
// gives one input feature's weights for 16 outputs, read strictly in order.
// They are widened to fp32 (a shift) and multiplied with fp32 FMAs against
// broadcast inputs: on the Zen 5 this was tuned on, vdpbf16ps retires about
// a quarter as many instructions per second as vfmadd231ps, so bf16 dot
// products would be the slower path. Each thread owns a panel of 64 outputs
// and passes every row of x over it in K chunks that keep the panel's slice
// of weight in L1, so a prefill too reads the weight from memory once.
//
// Accumulation is fp32; the result is rounded to bf16 once (as oneDNN does).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "numerics.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define RADIXSERVE_GEMM 1
#include <immintrin.h>
#endif

namespace {

constexpr int kBlock = 16;    // outputs per block (one zmm of fp32)
constexpr int kPanel = 4;     // blocks per thread task: 64 outputs
constexpr int kRows = 6;      // rows of x per register tile: 24 accumulators + 4 weights
// Software prefetch this many inputs (x 32 B per block) ahead in each weight
// stream. At one row a core is bound by how many misses it keeps in flight,
// and the hardware prefetcher alone kept too few: measured on the 49
// linears of the small demo model (200 MB), 6.5 -> 4.9 ms per pass at 48,
// flat from 32 to 64, worse again from 128 (2 cores, Xeon, 2026-11-30).
constexpr int64_t kPrefetchK = 48;

#if defined(RADIXSERVE_GEMM)
inline __m512 widen_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// One register tile: MR rows x NR blocks of 16 outputs, over inputs
// [k_begin, k_end). The partial sums start from zero or from `partial`
// ([MR][kPanel * kBlock] fp32, earlier K chunks) and go back there, or, after
// the last chunk, get the bias and are rounded into y.
template <int MR, int NR>
inline void tile(const float* __restrict x, int64_t x_stride, const uint16_t* __restrict w,
                 int64_t block_stride, int64_t k_begin, int64_t k_end, float* __restrict partial,
                 bool resume, bool finish, const float* __restrict bias, int64_t n0, int64_t n_total,
                 at::BFloat16* __restrict y, int64_t y_stride) {
  constexpr int kPartialStride = kPanel * kBlock;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = resume ? _mm512_loadu_ps(partial + i * kPartialStride + j * kBlock) : _mm512_setzero_ps();
  for (int64_t k = k_begin; k < k_end; ++k) {
    if ((k & 1) == 0)  // one prefetch per 64-byte line of each block
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * block_stride + (k + kPrefetchK) * kBlock), _MM_HINT_T0);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = widen_bf16(w + j * block_stride + k * kBlock);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * x_stride + k]);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (!finish) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) _mm512_storeu_ps(partial + i * kPartialStride + j * kBlock, acc[i][j]);
    return;
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j * kBlock;
    const int valid = static_cast<int>(std::min<int64_t>(kBlock, n_total - n));
    if (valid <= 0) break;
    const __mmask16 lanes = valid == kBlock ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + n) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      _mm256_mask_storeu_epi16(y + i * y_stride + n, lanes, radixserve::narrow_x16(_mm512_add_ps(acc[i][j], b)));
    }
  }
}

struct PanelArgs {
  const float* x;      // [m, k] widened to fp32
  const uint16_t* w;   // first block of the panel
  int64_t m, k, block_stride, n0, n_total;
  const float* bias;
  at::BFloat16* y;  // [m, n_total]
  float* partial;   // [m, kPanel * kBlock] when K is split
};

template <int NR>
void run_panel(const PanelArgs& a) {
  // Split K so the panel's slice of weight (NR x kKChunk x 32 B) stays in
  // L1 while every row tile of x passes over it; one chunk for a few rows.
  constexpr int64_t kKChunk = 256;
  const int64_t chunk = a.m <= kRows ? a.k : kKChunk;
  for (int64_t k0 = 0; k0 < a.k; k0 += chunk) {
    const int64_t k1 = std::min(a.k, k0 + chunk);
    const bool resume = k0 > 0, finish = k1 == a.k;
    for (int64_t r = 0; r < a.m; r += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, a.m - r));
      const float* xr = a.x + r * a.k;
      float* part = a.partial ? a.partial + r * kPanel * kBlock : nullptr;
      at::BFloat16* yr = a.y + r * a.n_total;
#define RADIXSERVE_TILE(MR) \
  tile<MR, NR>(xr, a.k, a.w, a.block_stride, k0, k1, part, resume, finish, a.bias, a.n0, a.n_total, yr, a.n_total)
      switch (rows) {
        case 6: RADIXSERVE_TILE(6); break;
        case 5: RADIXSERVE_TILE(5); break;
        case 4: RADIXSERVE_TILE(4); break;
        case 3: RADIXSERVE_TILE(3); break;
        case 2: RADIXSERVE_TILE(2); break;
        default: RADIXSERVE_TILE(1); break;
      }
#undef RADIXSERVE_TILE
    }
  }
}
#endif

}  // namespace

bool bf16_gemm_supported() {
#if defined(RADIXSERVE_GEMM)
  return true;
#else
  return false;
#endif
}

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

// x [M, K] bf16, packed from pack_bf16_weight, bias [N] or None -> [M, N] bf16.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features) {
#if defined(RADIXSERVE_GEMM)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x must be [M, K] bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlock && packed.scalar_type() == torch::kInt16,
              "not a packed weight");
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == k && (out_features + kBlock - 1) / kBlock == blocks,
              "x [", m, ", ", k, "] does not fit the packed weight");
  const auto input = x.to(torch::kFloat32).contiguous();  // widened once, broadcast per output block
  auto y = torch::empty({m, out_features}, x.options());
  torch::Tensor bias_f32;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_f32 = bias->to(torch::kFloat32).contiguous();
    bias_ptr = bias_f32.data_ptr<float>();
  }
  const float* x_ptr = input.data_ptr<float>();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  at::BFloat16* out = y.data_ptr<at::BFloat16>();
  const int64_t block_stride = k * kBlock;
  const int64_t panels = (blocks + kPanel - 1) / kPanel;
  const bool split_k = m > kRows;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> partial(split_k ? m * kPanel * kBlock : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first_block = p * kPanel;
      const int nr = static_cast<int>(std::min<int64_t>(kPanel, blocks - first_block));
      const PanelArgs args{x_ptr, w + first_block * block_stride, m, k, block_stride,
                           first_block * kBlock, out_features, bias_ptr, out,
                           split_k ? partial.data() : nullptr};
      switch (nr) {
        case 4: run_panel<4>(args); break;
        case 3: run_panel<3>(args); break;
        case 2: run_panel<2>(args); break;
        default: run_panel<1>(args); break;
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "bf16_linear needs AVX-512 (check bf16_gemm_supported())");
#endif
}
