// Paged decode attention for CPU: one query token per sequence, K/V read in place from the
// block-paged cache (no gather copy), query heads grouped under their KV head (GQA/MQA), the
// KV length cut into splits whose partial softmaxes are merged by log-sum-exp
// (Flash-Decoding, Dao et al. 2023). Work items are (sequence, kv head, split), run with OpenMP.
// Within a split, keys go in tiles: scores of the tile, then one online-softmax update per tile
// (as FlashAttention does per KV block, Dao et al. 2022).
//
//   partial over split s:  m_s = max score, l_s = sum exp(score - m_s), o_s = sum exp(score - m_s) v
//   merged:                m = max_s m_s,  o = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cache_loads.h"
#include "simd.h"

namespace {

// Keys scored together: one running-max update, one rescale of the partial output and one
// vectorized exp pass per tile instead of per key.
constexpr int64_t kTile = 64;
// How far ahead of the rows computing the kernel asks for K/V rows (see prefetch_rows; 32, 96 and
// 192 measured alike within the noise).
constexpr int64_t kAheadRows = 192;

#ifdef FS_AVX2
// Lane i of the result = the sum of v[i]'s eight lanes (one hadd tree for eight sums).
inline __m256 reduce8_ps(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

// s[j] = q . k_j for the tile's keys, one head at a time: the portable path (the grouped kernels
// below take every head dimension that fills whole vectors).
template <typename C>
inline void tile_scores(const float* q, const C* const* k, int64_t nt, int64_t D, float* s) {
  for (int64_t j = 0; j < nt; ++j) {
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

// s[j] *= scale for j < nt; returns the largest (a NaN score is passed over, as std::max(m, s) does).
inline float tile_scale_max(float* s, int64_t nt, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#ifdef FS_AVX2
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= nt; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sv);
    _mm256_storeu_ps(s + j, x);
    mv = _mm256_max_ps(x, mv);  // x > m ? x : m, lane-wise: a NaN x keeps m
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (float v : lanes) m = std::max(m, v);
#endif
  for (; j < nt; ++j) m = std::max(m, s[j] *= scale);
  return m;
}

// o += sum_j p[j] v_j, one head at a time (the portable path, as tile_scores).
template <typename C>
inline void tile_accumulate(const float* p, const C* const* v, int64_t nt, int64_t D, float* o) {
  for (int64_t d = 0; d < D; ++d) {
    float acc = o[d];
    for (int64_t j = 0; j < nt; ++j) acc += p[j] * static_cast<float>(v[j][d]);
    o[d] = acc;
  }
}

#ifdef FS_AVX2
// The grouped kernels below are written once over a vector of float lanes: eight (AVX2) or sixteen
// (AVX-512). kMaxHeads and kChunks size their register blocks so that accumulators, the loaded cache
// chunks and a broadcast fit the register file (16 ymm, 32 zmm).
struct Lanes8 {
  using R = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kMaxHeads = 2;  // scores: 2 heads x 4 keys accumulators + 4 keys' chunks
  static constexpr int kChunks = 4;    // values: 2 heads x 4 chunks of 8 columns
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  template <typename C>
  static R load_cache(const C* p) { return load8(p); }
  static void sums8(const R* v, float* s) { _mm256_storeu_ps(s, reduce8_ps(v)); }  // s[i] = v[i]'s lane sum
};

#ifdef FS_AVX512
struct Lanes16 {
  using R = __m512;
  static constexpr int64_t kWidth = 16;
  static constexpr int kMaxHeads = 4;  // 16 accumulators + 4 chunks of 32 zmm
  static constexpr int kChunks = 4;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  template <typename C>
  static R load_cache(const C* p) { return load16(p); }
  static void sums8(const R* v, float* s) {  // fold each to eight lanes, then one hadd tree
    __m256 h[8];
    for (int i = 0; i < 8; ++i)
      h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
    _mm256_storeu_ps(s, reduce8_ps(h));
  }
};
#endif

// GQA's query heads share their KV head's keys and values: the grouped kernels load (and convert)
// each cache chunk once for GB heads instead of once per head.
// s[g * s_stride + j] = q_g . k_j for heads g < GB (rows of q, stride D) and the tile's nt keys,
// four keys per pass (a short last pass repeats its last key and drops the extra sums).
template <typename V, typename C, int GB>
inline void scores_grouped(const float* q, int64_t D, const C* const* k, int64_t nt, float* s, int64_t s_stride) {
  constexpr int KB = 4, NA = GB * KB, NR = (NA + 7) / 8 * 8;
  for (int64_t j = 0; j < nt; j += KB) {
    const int kb = static_cast<int>(std::min<int64_t>(KB, nt - j));
    const C* kr[KB];
    for (int i = 0; i < KB; ++i) kr[i] = k[j + std::min(i, kb - 1)];
    typename V::R acc[NR];
    for (int i = 0; i < NR; ++i) acc[i] = V::zero();
    for (int64_t d = 0; d < D; d += V::kWidth) {
      typename V::R kv[KB];
      for (int i = 0; i < KB; ++i) kv[i] = V::template load_cache<C>(kr[i] + d);
      for (int g = 0; g < GB; ++g) {
        const typename V::R qv = V::load(q + g * D + d);
        for (int i = 0; i < KB; ++i) acc[g * KB + i] = V::fma(qv, kv[i], acc[g * KB + i]);
      }
    }
    alignas(32) float sums[NR];
    for (int r = 0; r < NR; r += 8) V::sums8(acc + r, sums + r);
    for (int g = 0; g < GB; ++g)
      for (int i = 0; i < kb; ++i) s[g * s_stride + j + i] = sums[g * KB + i];
  }
}

// o_g[d0 .. d0 + NC lanes) += sum_j p_g[j] v_j for heads g < GB (rows of o, stride D; weights p, stride
// p_stride), the columns held in registers across the tile's keys.
template <typename V, typename C, int GB, int NC>
inline void accumulate_grouped(const float* p, int64_t p_stride, const C* const* v, int64_t nt, int64_t d0,
                               float* o, int64_t D) {
  constexpr int64_t W = V::kWidth;
  typename V::R acc[GB][NC];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = V::load(o + g * D + d0 + c * W);
  for (int64_t j = 0; j < nt; ++j) {
    typename V::R vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = V::template load_cache<C>(v[j] + d0 + c * W);
    for (int g = 0; g < GB; ++g) {
      const typename V::R pj = V::set1(p[g * p_stride + j]);
      for (int c = 0; c < NC; ++c) acc[g][c] = V::fma(pj, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NC; ++c) V::store(o + g * D + d0 + c * W, acc[g][c]);
}

// f(std::integral_constant<int, GB>, g0) for passes over heads [g0, g0 + GB) that cover G heads,
// GB at most kMax (<= 4): the head count becomes a template argument, so the register blocks are sized
// at compile time.
template <int kMax, typename F>
inline void head_passes(int64_t G, F&& f) {
  for (int64_t g0 = 0; g0 < G; g0 += kMax) {
    switch (std::min<int64_t>(kMax, G - g0)) {
      case 1: f(std::integral_constant<int, 1>{}, g0); break;
      case 2: if constexpr (kMax >= 2) f(std::integral_constant<int, 2>{}, g0); break;
      case 3: if constexpr (kMax >= 3) f(std::integral_constant<int, 3>{}, g0); break;
      default: if constexpr (kMax >= 4) f(std::integral_constant<int, 4>{}, g0); break;
    }
  }
}

// All G heads of one KV head over a tile, in passes of at most V::kMaxHeads heads.
template <typename V, typename C>
struct Grouped {
  static void scores(const float* q, int64_t G, int64_t D, const C* const* k, int64_t nt, float* s, int64_t stride) {
    head_passes<V::kMaxHeads>(G, [&](auto gb, int64_t g0) {
      scores_grouped<V, C, decltype(gb)::value>(q + g0 * D, D, k, nt, s + g0 * stride, stride);
    });
  }
  static void accumulate(const float* p, int64_t stride, const C* const* v, int64_t nt, int64_t G, int64_t D,
                         float* o) {
    constexpr int64_t wide = V::kWidth * V::kChunks;
    head_passes<V::kMaxHeads>(G, [&](auto gb, int64_t g0) {
      constexpr int GB = decltype(gb)::value;
      int64_t d0 = 0;
      for (; d0 + wide <= D; d0 += wide)
        accumulate_grouped<V, C, GB, V::kChunks>(p + g0 * stride, stride, v, nt, d0, o + g0 * D, D);
      for (; d0 < D; d0 += V::kWidth) accumulate_grouped<V, C, GB, 1>(p + g0 * stride, stride, v, nt, d0, o + g0 * D, D);
    });
  }
};
#endif

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

  // The grouped kernels where the head dimension fills whole vectors (every model we know of);
  // the per-head loops otherwise.
  void (*grouped_scores)(const float*, int64_t, int64_t, const C* const*, int64_t, float*, int64_t) = nullptr;
  void (*grouped_accumulate)(const float*, int64_t, const C* const*, int64_t, int64_t, int64_t, float*) = nullptr;
#ifdef FS_AVX2
  if constexpr (kLoads8<C>) {
#ifdef FS_AVX512
    if (D % Lanes16::kWidth == 0) {
      grouped_scores = &Grouped<Lanes16, C>::scores;
      grouped_accumulate = &Grouped<Lanes16, C>::accumulate;
    }
#endif
    if (grouped_scores == nullptr && D % Lanes8::kWidth == 0) {
      grouped_scores = &Grouped<Lanes8, C>::scores;
      grouped_accumulate = &Grouped<Lanes8, C>::accumulate;
    }
  }
#endif

  // Item = (sequence n, KV head h, split): its keys are positions [t0, t1) of sequence n.
  struct Span { int64_t n, h, t0, t1; };
  auto span_of = [&](int64_t item) {
    const int64_t n = item / (Hk * num_splits), h = (item / num_splits) % Hk, sp = item % num_splits;
    const int64_t len = lens[n];
    int64_t t0 = sp * split_tokens, t1 = std::min<int64_t>(len, t0 + split_tokens);
    if (sliding_window > 0) t0 = std::max<int64_t>(t0, len - sliding_window);  // the query sits at len - 1
    // Keys past the block table's end are not there to read (a table cut short by its caller).
    return Span{n, h, t0, std::min<int64_t>(t1, max_blocks * bs)};
  };
  // Offsets of the rows of positions t, t + 1, ... of a span, walking its block table: one division
  // per walk, not one per key.
  struct RowWalk {
    const int32_t* table;  // this sequence's block table, at position t's block
    int64_t in_block, head_offset;
  };
  auto walk_from = [&](const Span& sp, int64_t t) {
    return RowWalk{bt + sp.n * max_blocks + t / bs, t % bs, sp.h * kv_stride_h};
  };
  auto next_row = [&](RowWalk& w) {  // the current row's offset, then on to the next position
    const int64_t off = int64_t(*w.table) * kv_stride_block + w.in_block * kv_stride_tok + w.head_offset;
    if (++w.in_block == bs) w.in_block = 0, ++w.table;
    return off;
  };

  at::parallel_for(0, N * Hk * num_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), s(G * kTile);
    const C* krow[kTile];
    const C* vrow[kTile];
    // The rows are scattered over blocks and heads, which the hardware prefetcher does not follow:
    // a cursor asks for the rows kAheadRows ahead of the ones computing, on into this thread's next
    // items, a few rows at a time between the pieces of work. Asked for a tile at once (as this kernel
    // did) the requests fill the core's miss buffers and the work waits behind them: 32 sequences of
    // SmolLM2 read the cache at ~7 GB/s that way, ~10 spread out (benchmarks/RESULTS.md).
    int64_t ahead_item = begin;
    Span ahead = span_of(begin);
    int64_t ahead_t = ahead.t0;
    RowWalk ahead_walk = walk_from(ahead, ahead_t);
    auto prefetch_rows = [&](int64_t rows) {
      while (rows > 0 && ahead_item < end) {
        if (ahead_t >= ahead.t1) {
          if (++ahead_item < end) ahead = span_of(ahead_item), ahead_t = ahead.t0, ahead_walk = walk_from(ahead, ahead_t);
          continue;
        }
        ++ahead_t;
        const int64_t off = next_row(ahead_walk);
        const char* kr = reinterpret_cast<const char*>(kp + off);
        const char* vr = reinterpret_cast<const char*>(vp + off);
        for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(C)); b += 64) {
          __builtin_prefetch(kr + b, 0, 3);
          __builtin_prefetch(vr + b, 0, 3);
        }
        --rows;
      }
    };
    prefetch_rows(kAheadRows);
    for (int64_t item = begin; item < end; ++item) {
      const Span span = span_of(item);
      const int64_t n = span.n, h = span.h;
      float* m = &part_m[item * G];
      float* l = &part_l[item * G];
      float* o = &part_o[item * G * D];
      for (int64_t g = 0; g < G; ++g) { m[g] = neg_inf; l[g] = 0.f; }
      std::fill(o, o + G * D, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qp[n * q_stride_n + (h * G + g) * q_stride_h + d]);
      RowWalk walk = walk_from(span, span.t0);
      for (int64_t tt = span.t0; tt < span.t1; tt += kTile) {
        const int64_t nt = std::min<int64_t>(kTile, span.t1 - tt);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t off = next_row(walk);
          krow[j] = kp + off;
          vrow[j] = vp + off;
        }
        if (grouped_scores != nullptr) {
          for (int64_t c = 0; c < nt; c += 8) {  // 4 rows asked for per 8 keys, here and below
            prefetch_rows(std::min<int64_t>(4, nt - c));
            grouped_scores(qf.data(), G, D, krow + c, std::min<int64_t>(8, nt - c), s.data() + c, kTile);
          }
        } else {
          prefetch_rows(nt);
          for (int64_t g = 0; g < G; ++g) tile_scores(&qf[g * D], krow, nt, D, &s[g * kTile]);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = &s[g * kTile];
          float tile_max = neg_inf;
          if (fcap > 0) {
            for (int64_t j = 0; j < nt; ++j) {
              const float sc = fcap * std::tanh(sg[j] * fscale / fcap);
              sg[j] = sc;
              tile_max = std::max(tile_max, sc);
            }
          } else {
            tile_max = tile_scale_max(sg, nt, fscale);
          }
          float* og = o + g * D;
          if (tile_max > m[g]) {  // new running max: rescale what was accumulated so far
            const float a = std::exp(m[g] - tile_max);  // exp(-inf) = 0 on the first tile
            l[g] *= a;
            for (int64_t d = 0; d < D; ++d) og[d] *= a;
            m[g] = tile_max;
          }
          l[g] += tile_exp(sg, nt, m[g]);
        }
        if (grouped_accumulate != nullptr) {
          for (int64_t c = 0; c < nt; c += 8) {
            prefetch_rows(std::min<int64_t>(4, nt - c));
            grouped_accumulate(s.data() + c, kTile, vrow + c, std::min<int64_t>(8, nt - c), G, D, o);
          }
        } else {
          for (int64_t g = 0; g < G; ++g) tile_accumulate(&s[g * kTile], vrow, nt, D, o + g * D);
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
