// Weight-only int8 / int4 linear layers on AVX-512 CPUs: y = x W^T (+ bias)
// with W[n, k] = q[n, k] * scale[n, k / G] + offset[n, k / G], q a small
// integer, G the group size (G = K: per channel).
//
// Why: at decode batch sizes a linear layer streams its weight once, so int8
// weights should cost half the time of bf16 and int4 a quarter. ATen's
// _weight_int8pack_mm / _weight_int4pack_mm_for_cpu were barely faster than
// bf16 at one row and 5-10x slower at 32.
//
// Layout (pack_int_weight): one stream per block of 16 outputs, read
// strictly in order, like the bf16 kernel (gemm.cpp): for each group,
// [scale: 16 fp32][offset: 16 fp32, if any][the group's weights], so one zmm
// load gives a group's scales for 16 outputs. int8: G x 16 bytes, one row of
// 16 bytes per input feature. int4: G/8 x 16 words, lane j's word t holding
// q + 8 of inputs 8t..8t+7 of output j, input 8t + i in bits 4i..4i+3.
//
// Few rows (and any fp32 x): FMAs. A group's products of q (exact small
// integers, converted in registers) with broadcast fp32 x are summed in
// fp32, then tot += scale * sum (+ offset * sum of x over the group): the
// dequantization costs two FMAs per group, not one per weight, and no
// dequantized weight is rounded. int8 -> fp32 is vpmovsxbd + vcvtdq2ps; int4
// -> fp32 is one vpermps looking the low nibble of each lane up in a 16-entry
// table (the other nibbles are brought down by a shift, or, at the bottom of
// a byte, by a load 1-3 bytes further on, which costs a load port instead).
// Register tiles of 6 rows x 4 blocks, threads own 64-output panels, K chunks
// when there are more rows than a tile, as in gemm.cpp. (vdpbf16ps on bf16
// pairs was tried for int4 x bf16: it retires one per 2 cycles here against
// two FMAs per cycle, and was slower.) On the small demo model's shapes (2
// cores, Xeon with AMX), one row, weights streamed from memory: int8 1.6-1.8x
// and int4 2.4-2.7x faster than the bf16 streaming kernel. int4 is bound by
// the ~3 instructions per 16 weights, not by memory (table in
// cpu_int_gemm.py).
//
// Many rows of bf16 x (the caller sets the threshold; AMX CPUs): AMX tiles
// on dequantized panels, in int_gemm_amx.cpp.
//
// Accumulation is fp32; bf16 results are rounded once at the end.

#include "int_gemm_layout.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <vector>

using namespace radixserve::int_gemm;

namespace {

constexpr int kPanel = 4;   // blocks per thread task: 64 outputs
constexpr int kRows = 6;    // rows per register tile: 24 accumulators + 4 weights
// Software prefetch this far ahead in each block's stream (as gemm.cpp
// does): at one row the lm-head-sized layer took the same time from 1 to 2 KB
// ahead, and more at 256 B or 4 KB (2 cores, Xeon, noisy).
constexpr int64_t kPrefetchBytes = 1024;

#if defined(RADIXSERVE_INT_GEMM)

struct TileArgs {
  const Layout* layout;
  const uint8_t* w;   // the panel's first block
  const float* x;     // [m, k] fp32, the tile's first row
  const float* xsum;  // [m, groups] sums of x over each group, when there are offsets
  float* tot;         // [rows][kPanel * kBlock]: the scaled sums so far, the tile's first row
};

constexpr int kTotStride = kPanel * kBlock;

// acc[i][j] += q * x over one group of inputs.
template <bool INT4, int MR, int NR>
inline void group_dot(const Layout& L, const uint8_t* q, const float* xg, __m512 (&acc)[MR][NR]) {
  if constexpr (INT4) {
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t t = 0; t < L.group / 8; ++t) {
      const uint8_t* qt = q + t * (kBlock * 4);
      for (int j = 0; j < NR; ++j)  // one 64-byte line per block and step
        _mm_prefetch(reinterpret_cast<const char*>(qt + j * L.block_bytes + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) {
        // vpermps looks up the low 4 bits of each lane, q + 8 -> q exactly.
        // Nibbles at a byte's bottom: a load 1-3 bytes further on brings
        // them down (a load port, not a shift); the others: a shift.
        __m512 wv[NR];
        for (int j = 0; j < NR; ++j) {
          const uint8_t* p = qt + j * L.block_bytes;
          const __m512i idx = (s & 1) ? _mm512_srli_epi32(_mm512_loadu_si512(p), 4 * s)
                                      : _mm512_loadu_si512(p + s / 2);
          wv[j] = _mm512_permutexvar_ps(idx, table);
        }
        for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_set1_ps(xg[i * L.k + t * 8 + s]);
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
    }
  } else {
    for (int64_t kk = 0; kk < L.group; ++kk) {
      const uint8_t* qk = q + kk * kBlock;
      if ((kk & 3) == 0)  // one prefetch per 64-byte line of each block
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(qk + j * L.block_bytes + kPrefetchBytes), _MM_HINT_T0);
      __m512 wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + j * L.block_bytes))));
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_set1_ps(xg[i * L.k + kk]);
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
  }
}

// One register tile: MR rows x NR blocks over groups [g_begin, g_end). acc
// sums q * x over a group (small integers times x: no rounding of a
// dequantized weight), then tot += scale * acc (+ offset * sum of x).
template <bool INT4, int MR, int NR>
inline void tile(const TileArgs& a, int64_t g_begin, int64_t g_end) {
  const Layout& L = *a.layout;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const uint8_t* base = a.w + g * L.group_bytes;
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    group_dot<INT4, MR, NR>(L, base + L.header_bytes, a.x + g * L.group, acc);
    for (int j = 0; j < NR; ++j) {
      const float* header = reinterpret_cast<const float*>(base + j * L.block_bytes);
      const __m512 scale = _mm512_loadu_ps(header);
      const __m512 offset = L.has_offset ? _mm512_loadu_ps(header + kBlock) : _mm512_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        float* tot = a.tot + i * kTotStride + j * kBlock;
        __m512 sum = _mm512_fmadd_ps(acc[i][j], scale, g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(tot));
        if (L.has_offset) sum = _mm512_fmadd_ps(_mm512_set1_ps(a.xsum[i * L.groups + g]), offset, sum);
        _mm512_storeu_ps(tot, sum);
      }
    }
  }
}

template <bool INT4, int NR>
void run_panel(const Layout& L, int64_t m, const TileArgs& panel) {
  // More rows than one tile: split K (in whole groups) so the panel's slice
  // of weight stays in L1 while every row tile passes over it.
  constexpr int64_t kKChunk = 256;
  const int64_t chunk = m <= kRows ? L.groups : std::max<int64_t>(1, kKChunk / L.group);
  for (int64_t g0 = 0; g0 < L.groups; g0 += chunk) {
    const int64_t g1 = std::min(L.groups, g0 + chunk);
    for (int64_t r = 0; r < m; r += kRows) {
      TileArgs a = panel;
      a.x += r * L.k;
      if (a.xsum) a.xsum += r * L.groups;
      a.tot += r * kTotStride;
      switch (std::min<int64_t>(kRows, m - r)) {
        case 6: tile<INT4, 6, NR>(a, g0, g1); break;
        case 5: tile<INT4, 5, NR>(a, g0, g1); break;
        case 4: tile<INT4, 4, NR>(a, g0, g1); break;
        case 3: tile<INT4, 3, NR>(a, g0, g1); break;
        case 2: tile<INT4, 2, NR>(a, g0, g1); break;
        default: tile<INT4, 1, NR>(a, g0, g1); break;
      }
    }
  }
}

template <bool INT4>
void run_panel_nr(int nr, const Layout& L, int64_t m, const TileArgs& a) {
  switch (nr) {
    case 4: run_panel<INT4, 4>(L, m, a); break;
    case 3: run_panel<INT4, 3>(L, m, a); break;
    case 2: run_panel<INT4, 2>(L, m, a); break;
    default: run_panel<INT4, 1>(L, m, a); break;
  }
}
#endif

}  // namespace

bool int_gemm_supported() {
#if defined(RADIXSERVE_INT_GEMM)
  return true;
#else
  return false;
#endif
}

// Whether int_linear can take the AMX path on this machine.
bool int_gemm_amx_supported() {
#if defined(RADIXSERVE_INT_AMX)
  return amx_permitted();
#else
  return false;
#endif
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

namespace {
Layout checked_layout(const torch::Tensor& packed, int64_t out_features, int64_t k, int64_t group_size, int64_t bits,
                      bool has_offset) {
  check_layout(k, group_size, bits);
  const Layout L(k, group_size, bits, has_offset);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() == L.packed_bytes(out_features),
              "K = ", k, " does not fit the packed weight");
  return L;
}
}  // namespace

// x [M, K] bf16 or fp32, packed from pack_int_weight, bias [N] or None ->
// [M, N] in x's dtype. bf16 x with at least amx_min_rows rows (0: never)
// takes the AMX path where the CPU and OS have it, K is a multiple of 32 and
// G even; everything else the FMA kernel.
torch::Tensor int_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t out_features, int64_t group_size, int64_t bits, bool has_offset, int64_t amx_min_rows) {
#if defined(RADIXSERVE_INT_GEMM)
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "x must be [M, K] bf16 or fp32");
  const int64_t m = x.size(0), k = x.size(1);
  const Layout L = checked_layout(packed, out_features, k, group_size, bits, has_offset);
  const bool out_fp32 = x.scalar_type() == torch::kFloat32;
  auto y = torch::empty({m, out_features}, x.options());
  if (m == 0 || out_features == 0) return y;
  const torch::Tensor x_contig = x.contiguous();
  const uint16_t* x_bf16 = out_fp32 ? nullptr : reinterpret_cast<const uint16_t*>(x_contig.data_ptr<at::BFloat16>());
#if defined(RADIXSERVE_INT_AMX)
  const bool amx = !out_fp32 && amx_min_rows > 0 && m >= amx_min_rows && k % kAmxK == 0 && group_size % 2 == 0 &&
                   amx_permitted();
#else
  const bool amx = false;
  (void)amx_min_rows;
#endif
  // The FMA kernel takes x widened to fp32 once (each value is broadcast once
  // per output block); AMX takes the bf16 rows as they are.
  std::vector<float> x_wide;
  const float* xf = out_fp32 ? x_contig.data_ptr<float>() : nullptr;
  if (!out_fp32 && !amx) {
    x_wide.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i) x_wide[i] = radixserve::widen(x_bf16[i]);
    xf = x_wide.data();
  }
  // With offsets, x's sums over each group: offset * sum(x) is the offset's
  // share of the group's dot product.
  std::vector<float> xsum(has_offset && !amx ? m * L.groups : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    const int64_t start = (i / L.groups) * k + (i % L.groups) * group_size;
    float sum = 0;
    if (xf)
      for (int64_t kk = 0; kk < group_size; ++kk) sum += xf[start + kk];
    else
      for (int64_t kk = 0; kk < group_size; ++kk) sum += radixserve::widen(x_bf16[start + kk]);
    xsum[i] = sum;
  }
  torch::Tensor bias_f32;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "bias must have ", out_features, " elements");
    bias_f32 = bias->to(torch::kFloat32).contiguous();
    bias_ptr = bias_f32.data_ptr<float>();
  }
  const uint8_t* w = packed.data_ptr<uint8_t>();
  void* out = y.data_ptr();
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
#if defined(RADIXSERVE_INT_AMX)
  if (amx) {
    amx_linear(L, w, x_bf16, m, bias_ptr, out_features, static_cast<at::BFloat16*>(out));
    return y;
  }
#endif
  const int64_t panels = (blocks + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tot(m * kTotStride);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first_block = p * kPanel;
      const int nr = static_cast<int>(std::min<int64_t>(kPanel, blocks - first_block));
      const TileArgs a{&L, w + first_block * L.block_bytes, xf, has_offset ? xsum.data() : nullptr, tot.data()};
      if (L.int4)
        run_panel_nr<true>(nr, L, m, a);
      else
        run_panel_nr<false>(nr, L, m, a);
      store_panel(tot.data(), kTotStride, m, nr, first_block * kBlock, out_features, bias_ptr, out, out_fp32);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "int_linear needs AVX-512 (check int_gemm_supported())");
#endif
}
