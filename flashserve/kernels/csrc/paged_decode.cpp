// Paged decode attention for CPU: one query token per sequence, K/V read in place from the
// block-paged cache (no gather copy), query heads grouped under their KV head (GQA/MQA), the
// KV length cut into splits whose partial softmaxes are merged by log-sum-exp
// (Flash-Decoding, Dao et al. 2023). Work items are (sequence, kv head, split), run with OpenMP.
// Within a split, keys go in tiles: scores of the tile, then one online-softmax update per tile
// (as FlashAttention does per KV block, Dao et al. 2022).
//
//   partial over split s:  m_s = max score, l_s = sum exp(score - m_s), o_s = sum exp(score - m_s) v
//   merged:                m = max_s m_s,  o = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

// Keys scored together: one running-max update, one rescale of the partial output and one
// vectorized exp pass per tile instead of per key.
constexpr int64_t kTile = 64;


// Eight cached values from p as float32 lanes: a plain load for a float32 cache, converted in
// registers for a float16 (F16C) or bfloat16 (the high half of a float32) one, so a 2-byte cache
// costs half the memory traffic and no extra pass.
template <typename C>
constexpr bool kLoads8 = std::is_same_v<C, float> || std::is_same_v<C, at::Half> || std::is_same_v<C, at::BFloat16>;

#ifdef FS_AVX2
template <typename C>
inline __m256 load8(const C* p) {
  if constexpr (std::is_same_v<C, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<C, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(std::is_same_v<C, at::BFloat16>);
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
  }
}
#endif

#ifdef FS_AVX2
// Lane i of the result = the sum of v[i]'s eight lanes (one hadd tree for eight sums).
inline __m256 reduce8_ps(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// s[j] = q . k_j for the tile's keys (eight keys per pass share each load of q, and their eight
// sums come out of one reduction tree).
template <typename C>
inline void tile_scores(const float* q, const C* const* k, int64_t nt, int64_t D, float* s) {
  int64_t j = 0;
#ifdef FS_AVX2
  if constexpr (kLoads8<C>) {
    if (D % 8 == 0) {
      for (; j + 8 <= nt; j += 8) {
        __m256 a[8];
        for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(k[j + i] + d), a[i]);
        }
        _mm256_storeu_ps(s + j, reduce8_ps(a));
      }
      for (; j + 4 <= nt; j += 4) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          a0 = _mm256_fmadd_ps(qv, load8(k[j] + d), a0);
          a1 = _mm256_fmadd_ps(qv, load8(k[j + 1] + d), a1);
          a2 = _mm256_fmadd_ps(qv, load8(k[j + 2] + d), a2);
          a3 = _mm256_fmadd_ps(qv, load8(k[j + 3] + d), a3);
        }
        s[j] = hsum(a0), s[j + 1] = hsum(a1), s[j + 2] = hsum(a2), s[j + 3] = hsum(a3);
      }
    }
  }
#endif
  for (; j < nt; ++j) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[j][d]);
    s[j] = dot;
  }
}

// p[j] = exp(s[j] - m) in place for j < nt; returns their sum.
inline float tile_exp(float* s, int64_t nt, float m) {
  float sum = 0.f;
  int64_t j = 0;
#ifdef FS_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= nt; j += 8) {
    const __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  sum = hsum(acc);
#endif
  for (; j < nt; ++j) sum += (s[j] = std::exp(s[j] - m));
  return sum;
}

// o += sum_j p[j] v_j, 32 columns at a time held in registers across the tile's keys.
template <typename C>
inline void tile_accumulate(const float* p, const C* const* v, int64_t nt, int64_t D, float* o) {
  int64_t d = 0;
#ifdef FS_AVX2
  if constexpr (kLoads8<C>) {
    for (; d + 32 <= D; d += 32) {
      __m256 o0 = _mm256_loadu_ps(o + d), o1 = _mm256_loadu_ps(o + d + 8);
      __m256 o2 = _mm256_loadu_ps(o + d + 16), o3 = _mm256_loadu_ps(o + d + 24);
      for (int64_t j = 0; j < nt; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        o0 = _mm256_fmadd_ps(pj, load8(v[j] + d), o0);
        o1 = _mm256_fmadd_ps(pj, load8(v[j] + d + 8), o1);
        o2 = _mm256_fmadd_ps(pj, load8(v[j] + d + 16), o2);
        o3 = _mm256_fmadd_ps(pj, load8(v[j] + d + 24), o3);
      }
      _mm256_storeu_ps(o + d, o0), _mm256_storeu_ps(o + d + 8, o1);
      _mm256_storeu_ps(o + d + 16, o2), _mm256_storeu_ps(o + d + 24, o3);
    }
    for (; d + 8 <= D; d += 8) {
      __m256 o0 = _mm256_loadu_ps(o + d);
      for (int64_t j = 0; j < nt; ++j) o0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), load8(v[j] + d), o0);
      _mm256_storeu_ps(o + d, o0);
    }
  }
#endif
  for (; d < D; ++d) {
    float acc = o[d];
    for (int64_t j = 0; j < nt; ++j) acc += p[j] * static_cast<float>(v[j][d]);
    o[d] = acc;
  }
}

// T: the query's and output's dtype; C: the caches' (the compute dtype, or a 2-byte float cache).
template <typename T, typename C>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& out,
                   double scale, int64_t sliding_window, double softcap, int64_t split_tokens) {
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hk = k_cache.size(2);
  const int64_t G = Hq / Hk;
  const int64_t max_blocks = block_table.size(1);
  const auto* bt = block_table.data_ptr<int32_t>();
  const auto* lens = seq_lens.data_ptr<int32_t>();
  const T* qp = q.data_ptr<T>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const int64_t q_stride_n = q.stride(0), q_stride_h = q.stride(1);
  const int64_t kv_stride_block = k_cache.stride(0), kv_stride_tok = k_cache.stride(1), kv_stride_h = k_cache.stride(2);
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);

  int64_t max_len = 0;
  for (int64_t n = 0; n < N; ++n) max_len = std::max<int64_t>(max_len, lens[n]);
  const int64_t num_splits = std::max<int64_t>(1, (max_len + split_tokens - 1) / split_tokens);
  // Partial results per (n, kv head, split, group member): running max, sum and output row.
  std::vector<float> part_m(N * Hk * num_splits * G), part_l(N * Hk * num_splits * G);
  std::vector<float> part_o(N * Hk * num_splits * G * D);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, N * Hk * num_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), s(kTile);
    const C* krow[kTile];
    const C* vrow[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (Hk * num_splits);
      const int64_t h = (item / num_splits) % Hk;
      const int64_t sp = item % num_splits;
      float* m = &part_m[item * G];
      float* l = &part_l[item * G];
      float* o = &part_o[item * G * D];
      for (int64_t g = 0; g < G; ++g) { m[g] = neg_inf; l[g] = 0.f; }
      std::fill(o, o + G * D, 0.f);
      const int64_t len = lens[n];
      const int64_t last = len - 1;  // the query's own position
      int64_t t0 = sp * split_tokens, t1 = std::min<int64_t>(len, t0 + split_tokens);
      if (sliding_window > 0) t0 = std::max<int64_t>(t0, last - sliding_window + 1);
      // Keys past the block table's end are not there to read (a table cut short by its caller).
      t1 = std::min<int64_t>(t1, max_blocks * bs);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[n * q_stride_n + (h * G + g) * q_stride_h + d]);
      auto row_offset = [&](int64_t t) {
        return int64_t(bt[n * max_blocks + t / bs]) * kv_stride_block + (t % bs) * kv_stride_tok + h * kv_stride_h;
      };
      for (int64_t tt = t0; tt < t1; tt += kTile) {
        const int64_t nt = std::min<int64_t>(kTile, t1 - tt);
        for (int64_t j = 0; j < nt; ++j) {
          krow[j] = kp + row_offset(tt + j);
          vrow[j] = vp + row_offset(tt + j);
        }
        // The next tile's rows are scattered over blocks and heads, which the hardware prefetcher
        // does not follow: ask for them while this tile computes.
        for (int64_t t = tt + kTile; t < std::min<int64_t>(t1, tt + 2 * kTile); ++t) {
          const char* kr = reinterpret_cast<const char*>(kp + row_offset(t));
          const char* vr = reinterpret_cast<const char*>(vp + row_offset(t));
          for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(C)); b += 64) {
            __builtin_prefetch(kr + b, 0, 3);
            __builtin_prefetch(vr + b, 0, 3);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data();
          tile_scores(&qf[g * D], krow, nt, D, sg);
          float tile_max = neg_inf;
          for (int64_t j = 0; j < nt; ++j) {
            float sc = sg[j] * fscale;
            if (fcap > 0) sc = fcap * std::tanh(sc / fcap);
            sg[j] = sc;
            tile_max = std::max(tile_max, sc);
          }
          float* og = o + g * D;
          if (tile_max > m[g]) {  // new running max: rescale what was accumulated so far
            const float a = std::exp(m[g] - tile_max);  // exp(-inf) = 0 on the first tile
            l[g] *= a;
            for (int64_t d = 0; d < D; ++d) og[d] *= a;
            m[g] = tile_max;
          }
          l[g] += tile_exp(sg, nt, m[g]);
          tile_accumulate(sg, vrow, nt, D, og);
        }
      }
    }
  });

  T* outp = out.data_ptr<T>();
  at::parallel_for(0, N * Hq, std::max<int64_t>(1, 4096 / (D * num_splits)), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / Hq, hq = row % Hq, h = hq / G, g = hq % G;
      float mx = neg_inf;
      for (int64_t sp = 0; sp < num_splits; ++sp) mx = std::max(mx, part_m[((n * Hk + h) * num_splits + sp) * G + g]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float denom = 0.f;
      if (mx != neg_inf) {
        for (int64_t sp = 0; sp < num_splits; ++sp) {
          const int64_t item = (n * Hk + h) * num_splits + sp;
          const float ms = part_m[item * G + g];
          if (ms == neg_inf) continue;  // this split saw no key
          const float w = std::exp(ms - mx);
          denom += w * part_l[item * G + g];
          const float* os = &part_o[(item * G + g) * D];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * os[d];
        }
      }
      T* dst = outp + n * out.stride(0) + hq * out.stride(1);
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, double softcap, int64_t split_tokens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "head_dim must be contiguous and K/V caches laid out alike");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  auto bt = block_table.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(cache_type == q.scalar_type() || cache_type == at::kHalf || cache_type == at::kBFloat16,
              "paged_decode_attention: caches must be q's dtype, float16 or bfloat16, got ", cache_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    if (cache_type == q.scalar_type())
      decode_kernel<scalar_t, scalar_t>(q, k_cache, v_cache, bt, lens, out, scale, sliding_window, softcap, split_tokens);
    else if (cache_type == at::kHalf)
      decode_kernel<scalar_t, at::Half>(q, k_cache, v_cache, bt, lens, out, scale, sliding_window, softcap, split_tokens);
    else
      decode_kernel<scalar_t, at::BFloat16>(q, k_cache, v_cache, bt, lens, out, scale, sliding_window, softcap,
                                            split_tokens);
  });
  return out;
}
