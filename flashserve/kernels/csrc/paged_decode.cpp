// Paged decode attention for CPU: one query token per sequence, K/V read in place from the
// block-paged cache (no gather copy), query heads grouped under their KV head (GQA/MQA), the
// KV length cut into splits whose partial softmaxes are merged by log-sum-exp
// (Flash-Decoding, Dao et al. 2023). Work items are (sequence, kv head, split), run with OpenMP.
// Within a split, keys go in tiles: scores of the tile, then one online-softmax update per tile
// (as FlashAttention does per KV block, Dao et al. 2022).
//
// The fast path reads the layout the engine allocates on the CPU (kernels/ops.py kv_cache_empty): per
// block and KV head, K transposed (head dim by block offset: a block's keys sit in the lanes of one
// vector per dimension, so the scores of 16 keys are 64 multiply-adds with no horizontal sum) and V
// in rows. Any other layout with V's head dimension contiguous takes the portable per-key loops.
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
// How many tiles ahead of the one computing the kernel asks for K/V lines (see LineCursor).
constexpr int64_t kAheadTiles = 2;

// s[j] = q . k_j for the tile's keys (element d of key j at k[j][d * dim_stride]), one head at a
// time: the portable path, for any cache layout.
template <typename C>
inline void tile_scores(const float* q, const C* const* k, int64_t nt, int64_t D, int64_t dim_stride, float* s) {
  for (int64_t j = 0; j < nt; ++j) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[j][d * dim_stride]);
    s[j] = dot;
  }
}

#ifdef FS_AVX2
// The vector code below are written once over a vector of float lanes: eight (AVX2) or sixteen
// (AVX-512). Their register blocks are sized so that accumulators, the loaded cache vectors and a
// broadcast fit the register file (16 ymm, 32 zmm):
//   scores: kKeyVecs vectors of keys x at most kScoreHeads heads x 2 or 4 partial sums (see scores_kt);
//   values: at most kMaxHeads heads x kChunks vectors of columns.
struct Lanes8 {
  using R = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kKeyVecs = 2, kScoreHeads = 2;
  static constexpr int kMaxHeads = 2, kChunks = 4;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }  // a > b ? a : b: a NaN a keeps b
  static R exp(R x) { return exp_ps(x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum_lanes(R v) { return hsum(v); }
  static float max_lanes(R v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    float m = lanes[0];
    for (float x : lanes) m = std::max(m, x);
    return m;
  }
  template <typename C>
  static R load_cache(const C* p) { return load8(p); }
};

#ifdef FS_AVX512
struct Lanes16 {
  using R = __m512;
  static constexpr int64_t kWidth = 16;
  static constexpr int kKeyVecs = 2, kScoreHeads = 4;  // 16 accumulators + 2 key vectors
  static constexpr int kMaxHeads = 4, kChunks = 4;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R exp(R x) { return exp_ps16(x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum_lanes(R v) { return _mm512_reduce_add_ps(v); }
  static float max_lanes(R v) { return _mm512_reduce_max_ps(v); }
  template <typename C>
  static R load_cache(const C* p) { return load16(p); }
};
#endif  // FS_AVX512
#endif  // FS_AVX2

// tile_exp and tile_scale_max over whole vectors of V from s[j0]; they return where they stopped.
template <typename V>
inline int64_t exp_vectors(float* s, int64_t j0, int64_t nt, float m, float& sum) {
  typename V::R acc = V::zero();
  const typename V::R mv = V::set1(m);
  int64_t j = j0;
  for (; j + V::kWidth <= nt; j += V::kWidth) {
    const typename V::R p = V::exp(V::sub(V::load(s + j), mv));
    V::store(s + j, p);
    acc = V::add(acc, p);
  }
  sum += V::sum_lanes(acc);
  return j;
}

template <typename V>
inline int64_t scale_max_vectors(float* s, int64_t j0, int64_t nt, float scale, float& m) {
  const typename V::R sv = V::set1(scale);
  typename V::R mv = V::set1(m);
  int64_t j = j0;
  for (; j + V::kWidth <= nt; j += V::kWidth) {
    const typename V::R x = V::mul(V::load(s + j), sv);
    V::store(s + j, x);
    mv = V::max(x, mv);
  }
  m = std::max(m, V::max_lanes(mv));
  return j;
}

// step.template operator()<V>(j) over the build's float vectors, widest first, each from where the
// last stopped; returns where the scalar tail starts.
template <typename Step>
inline int64_t widest_vectors_first(Step&& step) {
  int64_t j = 0;
#ifdef FS_AVX512
  j = step.template operator()<Lanes16>(j);
#endif
#ifdef FS_AVX2
  j = step.template operator()<Lanes8>(j);
#endif
  return j;
}

// p[j] = exp(s[j] - m) in place for j < nt; returns their sum.
inline float tile_exp(float* s, int64_t nt, float m) {
  float sum = 0.f;
  int64_t j = widest_vectors_first([&]<typename V>(int64_t j0) { return exp_vectors<V>(s, j0, nt, m, sum); });
  for (; j < nt; ++j) sum += (s[j] = std::exp(s[j] - m));
  return sum;
}

// s[j] *= scale for j < nt; returns the largest (a NaN score is passed over, as std::max(m, s) does).
inline float tile_scale_max(float* s, int64_t nt, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = widest_vectors_first([&]<typename V>(int64_t j0) { return scale_max_vectors<V>(s, j0, nt, scale, m); });
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
// Scores with the keys in the lanes, from transposed keys: key vector c holds kWidth consecutive
// keys, its dimension d at kt[c] + d * dim_stride. s[g * s_stride + c * kWidth + lane] = q_g . k
// for heads g < GB (rows of q, stride D). Each head's dot products are D multiply-adds of a
// broadcast query value, with no horizontal sums, in P partial sums over dimensions d = p mod P
// added pairwise at the end: a float32 sum of D / P terms in a row rounds about as often as torch's
// matmul does, and at least eight multiply-adds are in flight.
template <typename V, typename C, int GB>
inline void scores_kt(const float* q, int64_t D, const C* const* kt, int64_t dim_stride, float* s, int64_t s_stride) {
  constexpr int NK = V::kKeyVecs, P = GB == 1 ? 4 : 2;
  typename V::R acc[P][GB][NK];
  for (int p = 0; p < P; ++p)
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < NK; ++c) acc[p][g][c] = V::zero();
  auto step = [&](int p, int64_t d) {
    typename V::R kv[NK];
    for (int c = 0; c < NK; ++c) kv[c] = V::template load_cache<C>(kt[c] + d * dim_stride);
    for (int g = 0; g < GB; ++g) {
      const typename V::R qd = V::set1(q[g * D + d]);
      for (int c = 0; c < NK; ++c) acc[p][g][c] = V::fma(qd, kv[c], acc[p][g][c]);
    }
  };
  int64_t d = 0;
  for (; d + P <= D; d += P)
    for (int p = 0; p < P; ++p) step(p, d + p);
  for (; d < D; ++d) step(0, d);
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NK; ++c) {
      typename V::R sum = V::add(acc[0][g][c], acc[1][g][c]);
      if constexpr (P == 4) sum = V::add(sum, V::add(acc[2][g][c], acc[3][g][c]));
      V::store(s + g * s_stride + c * V::kWidth, sum);
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

// All G heads of one KV head, in passes of a few heads.
template <typename V, typename C>
struct Grouped {
  // Scores of the keys of V::kKeyVecs transposed key vectors.
  static void scores(const float* q, int64_t G, int64_t D, const C* const* kt, int64_t dim_stride, float* s,
                     int64_t stride) {
    head_passes<V::kScoreHeads>(G, [&](auto gb, int64_t g0) {
      scores_kt<V, C, decltype(gb)::value>(q + g0 * D, D, kt, dim_stride, s + g0 * stride, stride);
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

// Cache lines on their way to L1 ahead of use: the rows are scattered over blocks, which the hardware
// prefetcher does not follow. A tile's lines are asked for kAheadTiles tiles ahead, a few at a time
// between the pieces of work: asked for all at once, the requests fill the core's miss buffers and
// the work waits behind them (benchmarks/RESULTS.md, issue 24); into L1 (prefetcht0), they waited too.
// The lines come as runs of bytes.
struct LineCursor {
  struct Run { const char* p; int64_t bytes; };
  std::vector<Run> runs;
  size_t run = 0;
  int64_t offset = 0, lines_left = 0;
  void reset() { runs.clear(), run = 0, offset = 0, lines_left = 0; }
  void add(const void* p, int64_t bytes) {
    runs.push_back({static_cast<const char*>(p), bytes});
    lines_left += (bytes + 63) / 64;
  }
  void ask(int64_t n) {  // the next n lines
    for (; n > 0 && run < runs.size(); --n, --lines_left) {
      prefetch_line_l2(runs[run].p + offset);
      if ((offset += 64) >= runs[run].bytes) ++run, offset = 0;
    }
  }
  int64_t left() const { return lines_left; }
};

// Where a sequence's key and value t sit: its block table row, the caches' strides.
template <typename C>
struct CacheView {
  const C *kp, *vp;
  const int32_t* bt;
  int64_t max_blocks, bs, ks_blk, ks_tok, ks_h, ks_dim, vs_blk, vs_tok, vs_h;
  const C* key(int64_t n, int64_t h, int64_t t) const {  // key t's dimension 0
    return kp + int64_t(bt[n * max_blocks + t / bs]) * ks_blk + (t % bs) * ks_tok + h * ks_h;
  }
  const C* value(int64_t n, int64_t h, int64_t t) const {  // value t's row
    return vp + int64_t(bt[n * max_blocks + t / bs]) * vs_blk + (t % bs) * vs_tok + h * vs_h;
  }
};

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
  const CacheView<C> cv{kp, vp, bt, max_blocks, bs, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                        k_cache.stride(3), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);

  int64_t max_len = 0;
  for (int64_t n = 0; n < N; ++n) max_len = std::max<int64_t>(max_len, lens[n]);
  const int64_t num_splits = std::max<int64_t>(1, (max_len + split_tokens - 1) / split_tokens);
  // Partial results per (n, kv head, split, group member): running max, sum and output row.
  std::vector<float> part_m(N * Hk * num_splits * G), part_l(N * Hk * num_splits * G);
  std::vector<float> part_o(N * Hk * num_splits * G * D);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // The vector kernels where the keys are transposed with whole key vectors in a block (and the
  // values' head dimension fills whole vectors); the per-key loops otherwise.
  int64_t key_vec = 0;  // keys per key vector
  void (*vector_scores)(const float*, int64_t, int64_t, const C* const*, int64_t, float*, int64_t) = nullptr;
  void (*vector_accumulate)(const float*, int64_t, const C* const*, int64_t, int64_t, int64_t, float*) = nullptr;
#ifdef FS_AVX2
  if constexpr (kLoads8<C>) {
    const bool transposed = cv.ks_tok == 1;
#ifdef FS_AVX512
    if (transposed && bs % Lanes16::kWidth == 0 && D % Lanes16::kWidth == 0) {
      key_vec = Lanes16::kWidth;
      vector_scores = &Grouped<Lanes16, C>::scores;
      vector_accumulate = &Grouped<Lanes16, C>::accumulate;
    }
#endif
    if (vector_scores == nullptr && transposed && bs % Lanes8::kWidth == 0 && D % Lanes8::kWidth == 0) {
      key_vec = Lanes8::kWidth;
      vector_scores = &Grouped<Lanes8, C>::scores;
      vector_accumulate = &Grouped<Lanes8, C>::accumulate;
    }
  }
#endif
  constexpr int kKeyVecs = 2;  // Lanes8's and Lanes16's
  const int64_t keys_per_pass = key_vec * kKeyVecs;  // divides kTile

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
  // Tiles sit at multiples of kTile: tile [tt, tt + kTile) of a span computes its keys [lo, hi).
  auto first_tile = [](const Span& sp) { return sp.t0 / kTile * kTile; };

  at::parallel_for(0, N * Hk * num_splits, 1, [&](int64_t begin, int64_t end) {
    const CacheView<C> c = cv;  // in registers: through the closure every store could change it
    std::vector<float> qf(G * D), s(G * kTile);
    const C* krow[kTile];
    const C* vrow[kTile];
    // The prefetch cursor walks this thread's tiles kAheadTiles ahead of the computing one, a block's
    // keys (or values) of one head at a time: contiguous bytes in the engine's layout.
    LineCursor cursor;
    int64_t ahead_item = begin;
    Span ahead = span_of(begin);
    int64_t ahead_tt = first_tile(ahead);
    const bool whole_key_blocks = key_vec > 0 && c.ks_dim == c.bs && c.bs <= kTile;
    const bool value_runs = c.vs_tok == D;
    auto queue_next_tile = [&]() {  // the lines of the next tile ahead, once the previous ones are asked for
      while (ahead_item < end && ahead_tt >= ahead.t1) {
        if (++ahead_item < end) ahead = span_of(ahead_item), ahead_tt = first_tile(ahead);
      }
      if (ahead_item >= end) return;
      const int64_t lo = std::max(ahead.t0, ahead_tt), hi = std::min(ahead.t1, ahead_tt + kTile);
      cursor.reset();
      for (int64_t t = lo; t < hi;) {  // one block's part [t, t_end) of the tile
        const int64_t t_end = std::min(hi, (t / c.bs + 1) * c.bs);
        if (whole_key_blocks) {
          cursor.add(c.key(ahead.n, ahead.h, t / c.bs * c.bs), D * c.bs * sizeof(C));
        } else if (key_vec > 0) {
          for (int64_t d = 0; d < D; ++d) cursor.add(c.key(ahead.n, ahead.h, t) + d * c.ks_dim, (t_end - t) * sizeof(C));
        } else {
          for (int64_t u = t; u < t_end; ++u) cursor.add(c.key(ahead.n, ahead.h, u), D * sizeof(C));
        }
        if (value_runs) cursor.add(c.value(ahead.n, ahead.h, t), (t_end - t) * D * sizeof(C));
        else for (int64_t u = t; u < t_end; ++u) cursor.add(c.value(ahead.n, ahead.h, u), D * sizeof(C));
        t = t_end;
      }
      ahead_tt += kTile;
    };
    for (int64_t i = 0; i < kAheadTiles; ++i) {
      queue_next_tile();
      cursor.ask(cursor.left());
    }
    queue_next_tile();
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
      for (int64_t tt = first_tile(span); tt < span.t1; tt += kTile) {
        const int64_t lo = std::max(span.t0, tt), hi = std::min(span.t1, tt + kTile), nt = hi - lo;
        const int64_t per_piece = cursor.left() / 4 + 1;  // this tile's lines ahead, in four pieces
        float* sl = s.data() + (lo - tt);  // score of key lo, head 0
        if (vector_scores != nullptr) {
          // Passes over the tile's key vectors; one outside [lo, hi) is read as the nearest one
          // inside, whose scores land where nothing reads them.
          const int64_t first = lo / key_vec * key_vec, last = (hi - 1) / key_vec * key_vec;
          for (int64_t t0 = tt; t0 <= last; t0 += keys_per_pass) {
            cursor.ask(per_piece);
            const C* kt[kKeyVecs];
            for (int v = 0; v < kKeyVecs; ++v) kt[v] = c.key(n, h, std::clamp(t0 + v * key_vec, first, last));
            vector_scores(qf.data(), G, D, kt, c.ks_dim, s.data() + (t0 - tt), kTile);
          }
        } else {
          cursor.ask(2 * per_piece);
          for (int64_t j = 0; j < nt; ++j) krow[j] = c.key(n, h, lo + j);
          for (int64_t g = 0; g < G; ++g) tile_scores(&qf[g * D], krow, nt, D, c.ks_dim, sl + g * kTile);
        }
        for (int64_t t = lo; t < hi;) {  // a block's rows at a time
          const int64_t t_end = std::min(hi, (t / c.bs + 1) * c.bs);
          const C* row = c.value(n, h, t);
          for (; t < t_end; ++t, row += c.vs_tok) vrow[t - lo] = row;
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = sl + g * kTile;
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
        if (vector_accumulate != nullptr) {
          for (int64_t j = 0; j < nt; j += 32) {
            cursor.ask(per_piece);
            vector_accumulate(sl + j, kTile, vrow + j, std::min<int64_t>(32, nt - j), G, D, o);
          }
        } else {
          for (int64_t g = 0; g < G; ++g) tile_accumulate(sl + g * kTile, vrow, nt, D, o + g * D);
        }
        cursor.ask(cursor.left());
        queue_next_tile();
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
  TORCH_CHECK(q.stride(2) == 1 && v_cache.stride(3) == 1, "q's and V's head_dim must be contiguous");
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
