// Paged attention for ragged batches on CPU: prefill chunks, decodes and
// mixes of both in one call, reading K/V straight from the paged pool.
//
// Why: the torch-native backend pads every sequence's queries to the longest
// new-token run and gathers each sequence's whole KV per layer, so one
// 128-token chunk riding with 32 decodes costs 33 x 128 query rows. Here the
// work is exactly sum(new_tokens x keys_visible) per head.
//
// Work is split into tasks of (sequence, KV head, block of up to kQueryBlock
// new tokens). A task loads its queries for all query heads of that KV head
// (GQA: the keys are read once per group), then walks the visible keys in
// blocks of kKeyBlock with an online softmax. Everything accumulates in fp32;
// bf16 is widened by a shift. Tasks are scheduled dynamically, largest first,
// because a prefill block costs far more than a decode row.

#include <torch/extension.h>

#include "numerics.h"
#include <ATen/Parallel.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using radixserve::exp_nonpositive;

constexpr int kQueryBlock = 32;
constexpr int kKeyBlock = 64;

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, at::BFloat16* out) { *out = at::BFloat16(x); }

struct Task {
  int32_t seq;
  int32_t kv_head;
  int32_t first;  // index of the block's first token among the sequence's new tokens
  int32_t count;  // new tokens in the block
  int64_t cost;
};

template <typename scalar_t>
void attend_task(const Task& task, const scalar_t* q, const scalar_t* k_cache,
                 const scalar_t* v_cache, scalar_t* out, const int32_t* token_row,
                 int64_t prefix_len, int64_t seq_len, int64_t token_start,
                 int num_heads, int num_kv_heads, int head_dim, float scale,
                 std::vector<float>& scratch) {
  const int group = num_heads / num_kv_heads;
  const int rows = task.count * group;  // row r = token (r / group), head kv_head * group + r % group
  const int64_t q_stride = static_cast<int64_t>(num_heads) * head_dim;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * head_dim;

  // Keys visible to the block's last token; token t sees keys [0, prefix + first + t].
  const int64_t num_keys = std::min<int64_t>(seq_len, prefix_len + task.first + task.count);

  scratch.resize(static_cast<size_t>(rows) * head_dim * 2 + static_cast<size_t>(rows) * kKeyBlock +
                 static_cast<size_t>(head_dim) * kKeyBlock * 2 + rows * 2);
  float* query = scratch.data();                       // [rows, D], pre-scaled
  float* acc = query + rows * head_dim;                // [rows, D]
  float* scores = acc + rows * head_dim;               // [rows, kKeyBlock]
  float* keys_t = scores + rows * kKeyBlock;           // [D, kKeyBlock], transposed
  float* values = keys_t + head_dim * kKeyBlock;       // [kKeyBlock, D]
  float* row_max = values + head_dim * kKeyBlock;      // [rows]
  float* row_sum = row_max + rows;                     // [rows]

  for (int r = 0; r < rows; ++r) {
    const int t = r / group;
    const int head = task.kv_head * group + r % group;
    const scalar_t* src = q + (token_start + task.first + t) * q_stride + head * head_dim;
    float* dst = query + r * head_dim;
#pragma omp simd
    for (int d = 0; d < head_dim; ++d) dst[d] = widen(src[d]) * scale;
    std::fill(acc + r * head_dim, acc + (r + 1) * head_dim, 0.0f);
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.0f;
  }

  for (int64_t key0 = 0; key0 < num_keys; key0 += kKeyBlock) {
    const int block = static_cast<int>(std::min<int64_t>(kKeyBlock, num_keys - key0));
    for (int j = 0; j < block; ++j) {
      const int64_t slot = token_row[key0 + j];
      const scalar_t* k_src = k_cache + slot * kv_stride + task.kv_head * head_dim;
      const scalar_t* v_src = v_cache + slot * kv_stride + task.kv_head * head_dim;
      float* v_dst = values + j * head_dim;
      for (int d = 0; d < head_dim; ++d) keys_t[d * kKeyBlock + j] = widen(k_src[d]);
#pragma omp simd
      for (int d = 0; d < head_dim; ++d) v_dst[d] = widen(v_src[d]);
    }

    for (int r = 0; r < rows; ++r) {
      const int64_t last_visible = prefix_len + task.first + r / group;  // inclusive
      if (key0 > last_visible) continue;
      const int visible = static_cast<int>(std::min<int64_t>(block, last_visible - key0 + 1));
      float* s = scores + r * kKeyBlock;
      const float* qr = query + r * head_dim;
      std::fill(s, s + kKeyBlock, 0.0f);
      for (int d = 0; d < head_dim; ++d) {
        const float qd = qr[d];
        const float* kd = keys_t + d * kKeyBlock;
#pragma omp simd
        for (int j = 0; j < kKeyBlock; ++j) s[j] += qd * kd[j];
      }
      float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
      for (int j = 0; j < visible; ++j) block_max = std::max(block_max, s[j]);
      const float new_max = std::max(row_max[r], block_max);
      const float correction = exp_nonpositive(row_max[r] - new_max);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < visible; ++j) {
        s[j] = exp_nonpositive(s[j] - new_max);
        sum += s[j];
      }
      row_sum[r] = row_sum[r] * correction + sum;
      row_max[r] = new_max;
      float* a = acc + r * head_dim;
#pragma omp simd
      for (int d = 0; d < head_dim; ++d) a[d] *= correction;
      for (int j = 0; j < visible; ++j) {
        const float p = s[j];
        const float* vj = values + j * head_dim;
#pragma omp simd
        for (int d = 0; d < head_dim; ++d) a[d] += p * vj[d];
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    const int t = r / group;
    const int head = task.kv_head * group + r % group;
    scalar_t* dst = out + (token_start + task.first + t) * q_stride + head * head_dim;
    const float inv = 1.0f / row_sum[r];
    const float* a = acc + r * head_dim;
    for (int d = 0; d < head_dim; ++d) narrow(a[d] * inv, dst + d);
  }
}

#if defined(__AVX512BF16__)
// The bf16 path on CPUs with AVX512-BF16 (head_dim = 32 * kChunks): q.k from
// bf16 pairs with vdpbf16ps and one horizontal sum per score; p.v in fp32
// with a block of rows' accumulators held in registers across the key block.
// Max of s[0, n), n <= kKeyBlock (the compiler will not vectorise a float max).
inline float max_avx512(const float* s, int n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    best = _mm512_mask_max_ps(best, lanes, best, _mm512_loadu_ps(s + j));
  }
  return _mm512_reduce_max_ps(best);
}

template <int kChunks>
void attend_task_avx512bf16(const Task& task, const at::BFloat16* q, const at::BFloat16* k_cache,
                            const at::BFloat16* v_cache, at::BFloat16* out,
                            const int32_t* token_row, int64_t prefix_len, int64_t seq_len,
                            int64_t token_start, int num_heads, int num_kv_heads, float scale,
                            std::vector<float>& scratch) {
  constexpr int kDim = 32 * kChunks;
  constexpr int kVecs = kDim / 16;                  // fp32 vectors per row
  constexpr int kRowBlock = kVecs <= 4 ? 4 : 2;     // accumulators stay within 32 registers
  constexpr int kPackedRows = 8;  // from this many rows, repacking the keys pays for itself
  const int group = num_heads / num_kv_heads;
  const int rows = task.count * group;
  const int padded_rows = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t q_stride = static_cast<int64_t>(num_heads) * kDim;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * kDim;
  const int64_t num_keys = std::min<int64_t>(seq_len, prefix_len + task.first + task.count);

  scratch.resize(static_cast<size_t>(padded_rows) * (kDim + kKeyBlock + 3) + kKeyBlock * kDim * 2 +
                 kDim / 2);
  float* __restrict acc = scratch.data();                      // [padded_rows, D]
  float* __restrict scores = acc + padded_rows * kDim;         // [padded_rows, kKeyBlock]
  float* __restrict values = scores + padded_rows * kKeyBlock; // [kKeyBlock, D] fp32
  float* __restrict row_max = values + kKeyBlock * kDim;
  float* __restrict row_sum = row_max + padded_rows;
  float* __restrict correction = row_sum + padded_rows;
  uint32_t* __restrict packed_keys = reinterpret_cast<uint32_t*>(correction + padded_rows);  // [D/2, kKeyBlock]
  uint32_t* __restrict zero_row = packed_keys + kDim / 2 * kKeyBlock;  // [D/2] query padding rows
  std::fill(zero_row, zero_row + kDim / 2, 0u);
  std::fill(acc, acc + padded_rows * kDim, 0.0f);
  std::fill(scores, scores + padded_rows * kKeyBlock, 0.0f);
  std::fill(row_max, row_max + padded_rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + padded_rows, 0.0f);
  std::fill(correction, correction + padded_rows, 1.0f);

  auto query_of = [&](int r) {
    const int head = task.kv_head * group + r % group;
    return q + (token_start + task.first + r / group) * q_stride + head * kDim;
  };
  auto last_visible = [&](int r) { return prefix_len + task.first + r / group; };

  for (int64_t key0 = 0; key0 < num_keys; key0 += kKeyBlock) {
    const int block = static_cast<int>(std::min<int64_t>(kKeyBlock, num_keys - key0));
    if (rows < kPackedRows) {
      // Few rows (decode): one dot product per score, keys used as loaded.
      for (int j = 0; j < block; ++j) {
        const int64_t slot = token_row[key0 + j];
        const at::BFloat16* k_src = k_cache + slot * kv_stride + task.kv_head * kDim;
        __m512bh key[kChunks];
        for (int c = 0; c < kChunks; ++c) key[c] = (__m512bh)_mm512_loadu_si512(k_src + 32 * c);
        for (int r = 0; r < rows; ++r) {
          const at::BFloat16* qr = query_of(r);
          __m512 dot = _mm512_setzero_ps();
          for (int c = 0; c < kChunks; ++c)
            dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(qr + 32 * c), key[c]);
          scores[r * kKeyBlock + j] = _mm512_reduce_add_ps(dot) * scale;
        }
      }
    } else {
      // Many rows (prefill): repack the key block so that each vdpbf16ps
      // yields 16 keys' partial sums for one query pair, with no horizontal
      // sums; a 4-row x 64-key tile of scores stays in registers.
      for (int j = 0; j < block; ++j) {
        const uint32_t* k_pairs = reinterpret_cast<const uint32_t*>(
            k_cache + token_row[key0 + j] * kv_stride + task.kv_head * kDim);
        for (int d2 = 0; d2 < kDim / 2; ++d2) packed_keys[d2 * kKeyBlock + j] = k_pairs[d2];
      }
      constexpr int kKeyVecs = kKeyBlock / 16;
      const __m512 scale_vec = _mm512_set1_ps(scale);
      for (int r0 = 0; r0 < padded_rows; r0 += 4) {
        const uint32_t* q_pairs[4];
        for (int i = 0; i < 4; ++i)
          q_pairs[i] = r0 + i < rows ? reinterpret_cast<const uint32_t*>(query_of(r0 + i)) : zero_row;
        __m512 tile[4][kKeyVecs];
        for (int i = 0; i < 4; ++i)
          for (int c = 0; c < kKeyVecs; ++c) tile[i][c] = _mm512_setzero_ps();
        for (int d2 = 0; d2 < kDim / 2; ++d2) {
          __m512bh keys[kKeyVecs];
          for (int c = 0; c < kKeyVecs; ++c)
            keys[c] = (__m512bh)_mm512_loadu_si512(packed_keys + d2 * kKeyBlock + 16 * c);
          for (int i = 0; i < 4; ++i) {
            const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(q_pairs[i][d2]));
            for (int c = 0; c < kKeyVecs; ++c) tile[i][c] = _mm512_dpbf16_ps(tile[i][c], pair, keys[c]);
          }
        }
        for (int i = 0; i < 4 && r0 + i < rows; ++i)
          for (int c = 0; c < kKeyVecs; ++c)
            _mm512_storeu_ps(scores + (r0 + i) * kKeyBlock + 16 * c, _mm512_mul_ps(tile[i][c], scale_vec));
      }
    }
    for (int j = 0; j < block; ++j) {
      const at::BFloat16* v_src = v_cache + token_row[key0 + j] * kv_stride + task.kv_head * kDim;
      for (int c = 0; c < kVecs; ++c)
        _mm512_storeu_ps(values + j * kDim + 16 * c,
                         _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
                             reinterpret_cast<const __m256i*>(v_src + 16 * c))));
    }
    for (int r = 0; r < rows; ++r) {
      float* __restrict s = scores + r * kKeyBlock;
      const int64_t visible64 = last_visible(r) - key0 + 1;
      if (visible64 <= 0) {  // the whole block is in this row's future
        std::fill(s, s + kKeyBlock, 0.0f);
        correction[r] = 1.0f;
        continue;
      }
      const int visible = static_cast<int>(std::min<int64_t>(block, visible64));
      const float block_max = max_avx512(s, visible);
      const float new_max = std::max(row_max[r], block_max);
      correction[r] = exp_nonpositive(row_max[r] - new_max);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < visible; ++j) {
        s[j] = exp_nonpositive(s[j] - new_max);
        sum += s[j];
      }
      std::fill(s + visible, s + kKeyBlock, 0.0f);
      row_sum[r] = row_sum[r] * correction[r] + sum;
      row_max[r] = new_max;
    }
    for (int r0 = 0; r0 < padded_rows; r0 += kRowBlock) {
      __m512 a[kRowBlock][kVecs];
      for (int i = 0; i < kRowBlock; ++i) {
        const __m512 corr = _mm512_set1_ps(correction[r0 + i]);
        for (int c = 0; c < kVecs; ++c)
          a[i][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + i) * kDim + 16 * c), corr);
      }
      for (int j = 0; j < block; ++j) {
        __m512 v[kVecs];
        for (int c = 0; c < kVecs; ++c) v[c] = _mm512_loadu_ps(values + j * kDim + 16 * c);
        for (int i = 0; i < kRowBlock; ++i) {
          const __m512 p = _mm512_set1_ps(scores[(r0 + i) * kKeyBlock + j]);
          for (int c = 0; c < kVecs; ++c) a[i][c] = _mm512_fmadd_ps(p, v[c], a[i][c]);
        }
      }
      for (int i = 0; i < kRowBlock; ++i)
        for (int c = 0; c < kVecs; ++c) _mm512_storeu_ps(acc + (r0 + i) * kDim + 16 * c, a[i][c]);
    }
  }

  for (int r = 0; r < rows; ++r) {
    const int head = task.kv_head * group + r % group;
    at::BFloat16* dst = out + (token_start + task.first + r / group) * q_stride + head * kDim;
    const __m512 inv = _mm512_set1_ps(1.0f / row_sum[r]);
    for (int c = 0; c < kVecs; ++c) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + r * kDim + 16 * c), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}
#endif  // __AVX512BF16__

}  // namespace

// q, out: [num_tokens, H, D]; k_cache, v_cache: [num_slots, H_kv, D] (same dtype
// as q); req_to_token: [rows, max_context] int32; req_pool_indices, prefix_lens,
// extend_lens: [B] int64 on the CPU. Sequence b's new tokens follow the
// previous sequences' in q; its keys are req_to_token[row_b, :prefix_b + extend_b].
void paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, const torch::Tensor& req_to_token,
                     const torch::Tensor& req_pool_indices, const torch::Tensor& prefix_lens,
                     const torch::Tensor& extend_lens, double scale, torch::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches are [N, H, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  out.is_contiguous() && req_to_token.is_contiguous(),
              "tensors must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share a dtype");
  TORCH_CHECK(req_to_token.scalar_type() == torch::kInt32, "req_to_token must be int32");
  const int num_heads = static_cast<int>(q.size(1));
  const int head_dim = static_cast<int>(q.size(2));
  const int num_kv_heads = static_cast<int>(k_cache.size(1));
  TORCH_CHECK(num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) == head_dim, "head_dim differs between q and the cache");

  const auto rows_idx = req_pool_indices.to(torch::kInt64).contiguous();
  const auto prefix = prefix_lens.to(torch::kInt64).contiguous();
  const auto extend = extend_lens.to(torch::kInt64).contiguous();
  const int64_t batch = rows_idx.size(0);
  const int64_t* row_ptr = rows_idx.data_ptr<int64_t>();
  const int64_t* prefix_ptr = prefix.data_ptr<int64_t>();
  const int64_t* extend_ptr = extend.data_ptr<int64_t>();
  const int64_t context = req_to_token.size(1);

  std::vector<int64_t> token_start(batch);
  std::vector<Task> tasks;
  int64_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    token_start[b] = total;
    const int64_t n = extend_ptr[b];
    TORCH_CHECK(n >= 1 && prefix_ptr[b] >= 0 && prefix_ptr[b] + n <= context,
                "sequence ", b, " has a bad prefix/extend length");
    total += n;
    for (int64_t first = 0; first < n; first += kQueryBlock) {
      const int count = static_cast<int>(std::min<int64_t>(kQueryBlock, n - first));
      const int64_t keys = prefix_ptr[b] + first + count;
      for (int h = 0; h < num_kv_heads; ++h)
        tasks.push_back({static_cast<int32_t>(b), h, static_cast<int32_t>(first), count, keys * count});
    }
  }
  TORCH_CHECK(total == q.size(0), "extend lengths add up to ", total, " tokens, q has ", q.size(0));
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });

  const int32_t* table = req_to_token.data_ptr<int32_t>();
  const int num_tasks = static_cast<int>(tasks.size());
  const int threads = std::max(1, std::min(at::get_num_threads(), num_tasks));

  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
      for (int i = 0; i < num_tasks; ++i) {
        const Task& task = tasks[i];
        const int64_t b = task.seq;
        const int32_t* token_row = table + row_ptr[b] * context;
        const int64_t seq_len = prefix_ptr[b] + extend_ptr[b];
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          auto fast = [&](auto kernel) {
            kernel(task, q_ptr, k_ptr, v_ptr, out_ptr, token_row, prefix_ptr[b], seq_len,
                   token_start[b], num_heads, num_kv_heads, static_cast<float>(scale), scratch);
          };
          if (head_dim == 64) { fast(attend_task_avx512bf16<2>); continue; }
          if (head_dim == 128) { fast(attend_task_avx512bf16<4>); continue; }
          if (head_dim == 32) { fast(attend_task_avx512bf16<1>); continue; }
        }
#endif
        attend_task<scalar_t>(task, q_ptr, k_ptr, v_ptr, out_ptr, token_row, prefix_ptr[b], seq_len,
                              token_start[b], num_heads, num_kv_heads, head_dim,
                              static_cast<float>(scale), scratch);
      }
    }
  };
  if (q.scalar_type() == torch::kBFloat16) {
    run(at::BFloat16());
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_attention supports float32 and bfloat16");
    run(float());
  }
}
