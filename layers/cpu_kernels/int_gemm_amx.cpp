// Weight-only int8 / int4 linear layers for many rows of bf16 x, on AMX
// tiles (the layout and the rest: int_gemm.cpp).
//
// Each thread dequantizes a panel of 2 blocks into bf16 B tiles for all of K
// once (w = q * scale + offset in fp32, rounded to bf16 once, as a
// dequantized checkpoint would be) and runs tile products (TDPBF16PS) over
// passes of 32 rows of x. The dequantization is then the cost, flat in the
// row count, and the tile unit does the rest: from about 7 rows this beats
// the FMAs, and it runs near oneDNN's bf16 AMX GEMM on a weight 2-4x smaller.

#include "int_gemm_layout.h"

#if defined(RADIXSERVE_INT_AMX)
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace radixserve::int_gemm {
namespace {

constexpr int kAmxPanel = 2;   // blocks per task: C tiles are 2 row tiles x 2 blocks
constexpr int kAmxRows = 32;   // rows per pass: two tiles of 16

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C for (row tile a, block 0), (a, 1), (b, 0), (b, 1); 4, 5: A
// for row tiles a and b; 6, 7: B for blocks 0 and 1. Row tile b may be empty.
void configure_tiles(int rows_a, int rows_b) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  const int rows[8] = {rows_a, rows_a, rows_b, rows_b, rows_a, rows_b, kAmxK / 2, kAmxK / 2};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&cfg);
}

// One block's weights dequantized into B tiles, one per 32 inputs, as AMX
// wants them: row r of a tile holds inputs 2r and 2r + 1 of the 16 outputs
// as bf16 pairs. w = q * scale + offset in fp32 (one FMA), rounded to bf16
// once, as a dequantized bf16 checkpoint would be.
template <bool INT4>
void dequantize_block(const Layout& L, const uint8_t* block, uint16_t* dst) {
  // Word j of the result: (even[j], odd[j]); cvtne2ps2bf16 puts even in the
  // low 16 words and odd in the high 16.
  const __m512i interleave = _mm512_setr_epi32(
      0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005, 0x00160006, 0x00170007,
      0x00180008, 0x00190009, 0x001A000A, 0x001B000B, 0x001C000C, 0x001D000D, 0x001E000E, 0x001F000F);
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < L.groups; ++g) {
    const uint8_t* base = block + g * L.group_bytes;
    const float* header = reinterpret_cast<const float*>(base);
    const __m512 scale = _mm512_loadu_ps(header);
    const __m512 offset = L.has_offset ? _mm512_loadu_ps(header + kBlock) : _mm512_setzero_ps();
    const uint8_t* q = base + L.header_bytes;
    uint16_t* rows = dst + g * L.group / 2 * 32;  // B rows are consecutive across tiles
    auto put = [&](int64_t r, __m512 even, __m512 odd) {
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(odd, scale, offset),
                                                        _mm512_fmadd_ps(even, scale, offset));
      _mm512_storeu_si512(rows + r * 32, _mm512_permutexvar_epi16(interleave, both));
    };
    if constexpr (INT4) {
      for (int64_t t = 0; t < L.group / 8; ++t) {
        const uint8_t* qt = q + t * kBlock * 4;
        // Inputs 8t + 2s and 8t + 2s + 1 are byte s of each word: a load s
        // bytes on brings it down (vpermps looks up the low 4 bits of each
        // lane), a shift by 4 the odd one.
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m512i byte = _mm512_loadu_si512(qt + s);
          put(t * 4 + s, _mm512_permutexvar_ps(byte, table),
              _mm512_permutexvar_ps(_mm512_srli_epi32(byte, 4), table));
        }
      }
    } else {
      for (int64_t r = 0; r < L.group / 2; ++r) {
        const uint8_t* qk = q + 2 * r * kBlock;
        put(r, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk)))),
            _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + kBlock)))));
      }
    }
  }
}

struct AmxScratch {
  std::vector<uint16_t> b;  // [2][K / 2][32] bf16: the panel's B tiles
  float c[kAmxRows * kAmxPanel * kBlock];  // C tiles on their way to y
  int rows_a = -1, rows_b = -1;  // the current tile configuration
};

// y rows [0, m) of one panel (nb blocks): B is dequantized once for all of
// K, then every pass of 32 rows accumulates over all of K in C tiles.
template <bool INT4>
void amx_panel(const Layout& L, const uint8_t* w, int nb, const uint16_t* x, int64_t m, const float* bias,
               int64_t n0, int64_t n_total, at::BFloat16* y, AmxScratch& sc) {
  const int64_t b_stride = L.k / 2 * 32;  // uint16 per block of B
  for (int j = 0; j < nb; ++j) dequantize_block<INT4>(L, w + j * L.block_bytes, sc.b.data() + j * b_stride);
  constexpr int kStride = kAmxPanel * kBlock;
  constexpr int kCBytes = kStride * sizeof(float);
  for (int64_t r = 0; r < m; r += kAmxRows) {
    const int ra = static_cast<int>(std::min<int64_t>(16, m - r));
    const int rb = static_cast<int>(std::clamp<int64_t>(m - r - 16, 0, 16));
    if (ra != sc.rows_a || rb != sc.rows_b) {
      configure_tiles(ra, rb);
      sc.rows_a = ra;
      sc.rows_b = rb;
    }
    _tile_zero(0);
    _tile_zero(1);
    if (rb) {
      _tile_zero(2);
      _tile_zero(3);
    }
    const uint16_t* xr = x + r * L.k;
    for (int64_t k = 0; k < L.k; k += kAmxK) {
      _tile_loadd(4, xr + k, L.k * 2);
      if (rb) _tile_loadd(5, xr + 16 * L.k + k, L.k * 2);
      _tile_loadd(6, sc.b.data() + k / 2 * 32, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (rb) _tile_dpbf16ps(2, 5, 6);
      if (nb > 1) {
        _tile_loadd(7, sc.b.data() + b_stride + k / 2 * 32, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (rb) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, sc.c, kCBytes);
    _tile_stored(1, sc.c + kBlock, kCBytes);
    if (rb) {
      _tile_stored(2, sc.c + 16 * kStride, kCBytes);
      _tile_stored(3, sc.c + 16 * kStride + kBlock, kCBytes);
    }
    store_panel(sc.c, kStride, ra + rb, nb, n0, n_total, bias, y + r * n_total, false);
  }
}

}  // namespace

// Linux gives a process AMX tile state only once it asks (oneDNN asks too).
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

void amx_linear(const Layout& L, const uint8_t* w, const uint16_t* x, int64_t m, const float* bias,
                int64_t out_features, at::BFloat16* y) {
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
  const int64_t panels = (blocks + kAmxPanel - 1) / kAmxPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    AmxScratch sc;
    sc.b.resize(kAmxPanel * L.k / 2 * 32);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first_block = p * kAmxPanel;
      const int nb = static_cast<int>(std::min<int64_t>(kAmxPanel, blocks - first_block));
      const uint8_t* panel = w + first_block * L.block_bytes;
      if (L.int4)
        amx_panel<true>(L, panel, nb, x, m, bias, first_block * kBlock, out_features, y, sc);
      else
        amx_panel<false>(L, panel, nb, x, m, bias, first_block * kBlock, out_features, y, sc);
    }
    if (sc.rows_a >= 0) _tile_release();
  });
}

}  // namespace radixserve::int_gemm
#endif
