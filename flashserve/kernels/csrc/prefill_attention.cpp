// Prefill attention over the paged cache: one sequence's chunk of ql queries (positions
// seq_len - ql .. seq_len - 1) against every key each may see, read in place from the cache's blocks.
// FlashAttention's tiling (Dao et al. 2022, Alg. 1): keys in tiles, per query row a running max m,
// sum l and output o, rescaled by exp(m_old - m_new) when a tile raises the max, o / l at the end.
//
// Work items are (KV head, query tile); the query heads of a KV head (GQA) are rows of the same
// item, so each key tile is converted and transposed once for all of them. Tiles entirely above the
// causal diagonal or left of the sliding window are skipped, unlike torch's CPU flash kernel, which
// scores every key of a 512-token causal prompt (as long as without the mask, measured).
//
// Key tiles sit at absolute positions (multiples of kKeyTile) and each row is computed by the same
// instructions whatever item, chunk or batch it is in (masked keys weigh exactly 0): a prompt's
// outputs do not depend on how it was chunked or on which prefix blocks came from the cache.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cache_loads.h"
#include "simd.h"

namespace {

constexpr int64_t kKeyTile = 64;
constexpr int64_t kItemRows = 96;  // query rows (positions x grouped heads) an item aims for
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Float lanes of the widest vectors the build has, and the register blocks of the two
// micro-kernels: scores kScoreKeys keys x kScoreVecs vectors of rows, outputs kOutRows rows x
// kOutVecs vectors of columns; accumulators, loaded vectors and a broadcast fit the register file
// (32 zmm, 16 ymm).
#ifdef FS_AVX2
#ifdef FS_AVX512
struct Vec {
  using R = __m512;
  static constexpr int64_t W = 16;
  static constexpr int kScoreKeys = 8, kScoreVecs = 3, kOutRows = 6, kOutVecs = 4;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R exp(R x) { return exp_ps16(x); }
  static R finite_or_zero(R m) {  // -inf lanes as 0, so that m can be subtracted
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ), m);
  }
  template <typename C>
  static R load_cache(const C* p) { return load16(p); }
};
#else
struct Vec {
  using R = __m256;
  static constexpr int64_t W = 8;
  static constexpr int kScoreKeys = 4, kScoreVecs = 2, kOutRows = 2, kOutVecs = 4;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R exp(R x) { return exp_ps(x); }
  static R finite_or_zero(R m) { return _mm256_and_ps(m, _mm256_cmp_ps(m, _mm256_set1_ps(kNegInf), _CMP_NEQ_OQ)); }
  template <typename C>
  static R load_cache(const C* p) { return load8(p); }
};
#endif
#else
struct Vec {  // the portable build: one lane
  using R = float;
  static constexpr int64_t W = 1;
  static constexpr int kScoreKeys = 4, kScoreVecs = 2, kOutRows = 2, kOutVecs = 4;
  static R zero() { return 0.f; }
  static R set1(float x) { return x; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R max(R a, R b) { return std::max(a, b); }
  static R exp(R x) { return std::exp(x); }
  static R finite_or_zero(R m) { return m == kNegInf ? 0.f : m; }
  template <typename C>
  static R load_cache(const C* p) { return static_cast<float>(*p); }
};
#endif
using R = Vec::R;
constexpr int64_t W = Vec::W;
constexpr int64_t kRowBlock = W * Vec::kScoreVecs;  // an item's rows are padded to a multiple of this
static_assert(kRowBlock % Vec::kOutRows == 0 && kKeyTile % Vec::kScoreKeys == 0, "whole register blocks");

// Scores with the rows in the lanes, st[j * rp + r] = k_j . q_r, for the tile's keys (kt, float,
// transposed: kt[d * kKeyTile + j]) and rows [r0, r0 + kRowBlock) of qt, the item's queries
// transposed (qt[d * rp + r]): each broadcast key value serves kScoreVecs vectors of rows, and the
// softmax below runs down the lanes.
inline void tile_scores(const float* kt, const float* qt, int64_t rp, int64_t D, int64_t r0, float* st) {
  constexpr int KB = Vec::kScoreKeys, RV = Vec::kScoreVecs;
  for (int64_t j0 = 0; j0 < kKeyTile; j0 += KB) {
    R acc[KB][RV];
    for (int i = 0; i < KB; ++i)
      for (int c = 0; c < RV; ++c) acc[i][c] = Vec::zero();
    for (int64_t d = 0; d < D; ++d) {
      R q[RV];
      for (int c = 0; c < RV; ++c) q[c] = Vec::load(qt + d * rp + r0 + c * W);
      for (int i = 0; i < KB; ++i) {
        const R kd = Vec::set1(kt[d * kKeyTile + j0 + i]);
        for (int c = 0; c < RV; ++c) acc[i][c] = Vec::fma(kd, q[c], acc[i][c]);
      }
    }
    for (int i = 0; i < KB; ++i)
      for (int c = 0; c < RV; ++c) Vec::store(st + (j0 + i) * rp + r0 + c * W, acc[i][c]);
  }
}

// o[r] += sum_j p[j][r] v_j for rows [r0, r0 + kOutRows) (o stride D, p = st stride rp, v stride D).
inline void tile_accumulate(const float* st, int64_t rp, int64_t r0, const float* v, int64_t D, float* o) {
  constexpr int RB = Vec::kOutRows, CV = Vec::kOutVecs;
  int64_t d0 = 0;
  for (; d0 + W * CV <= D; d0 += W * CV) {
    R acc[RB][CV];
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < CV; ++c) acc[r][c] = Vec::load(o + (r0 + r) * D + d0 + c * W);
    for (int64_t j = 0; j < kKeyTile; ++j) {
      R vj[CV];
      for (int c = 0; c < CV; ++c) vj[c] = Vec::load(v + j * D + d0 + c * W);
      for (int r = 0; r < RB; ++r) {
        const R pj = Vec::set1(st[j * rp + r0 + r]);
        for (int c = 0; c < CV; ++c) acc[r][c] = Vec::fma(pj, vj[c], acc[r][c]);
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < CV; ++c) Vec::store(o + (r0 + r) * D + d0 + c * W, acc[r][c]);
  }
  for (; d0 < D; ++d0)  // head sizes that are not whole column blocks
    for (int r = 0; r < RB; ++r) {
      float acc = o[(r0 + r) * D + d0];
      for (int64_t j = 0; j < kKeyTile; ++j) acc += st[j * rp + r0 + r] * v[j * D + d0];
      o[(r0 + r) * D + d0] = acc;
    }
}

// The online-softmax step of a scored tile (masked scores -inf) for rows [r0, r0 + W), down the
// lanes: p = exp(s - m_new) in place, l = l * alpha + sum p, alpha = exp(m_old - m_new) stored
// for the rescale of o. A row that has seen no key keeps m = -inf, l = 0 and gets p = 0.
inline void softmax_step(float* st, int64_t rp, int64_t r0, float* m, float* l, float* alpha) {
  R mx = Vec::set1(kNegInf);
  for (int64_t j = 0; j < kKeyTile; ++j) mx = Vec::max(mx, Vec::load(st + j * rp + r0));
  const R m_old = Vec::load(m + r0), m_new = Vec::max(m_old, mx);
  const R base = Vec::finite_or_zero(m_new);
  R sum = Vec::zero();
  for (int64_t j = 0; j < kKeyTile; ++j) {
    const R p = Vec::exp(Vec::sub(Vec::load(st + j * rp + r0), base));
    Vec::store(st + j * rp + r0, p);
    sum = Vec::add(sum, p);
  }
  const R a = Vec::exp(Vec::sub(m_old, base));  // 0 while m_old = -inf
  Vec::store(alpha + r0, a);
  Vec::store(l + r0, Vec::add(Vec::mul(Vec::load(l + r0), a), sum));
  Vec::store(m + r0, m_new);
}

template <typename C>
inline void load_row(const C* src, int64_t D, float* dst) {  // D contiguous cache values as float32
  int64_t d = 0;
  if constexpr (kLoads8<C>)
    for (; d + W <= D; d += W) Vec::store(dst + d, Vec::template load_cache<C>(src + d));
  for (; d < D; ++d) dst[d] = static_cast<float>(src[d]);
}

template <typename T, typename C>
void prefill_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int32_t* blocks,
                    int64_t seq_len, at::Tensor& out, float scale, int64_t window, float softcap) {
  const int64_t ql = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hk = k_cache.size(2), G = Hq / Hk;
  const int64_t q_pos0 = seq_len - ql;  // position of query 0
  // Positions per item: about kItemRows rows; row r of an item is position r / G, head r % G.
  const int64_t tile_q = std::max<int64_t>(1, std::min<int64_t>(ql, kItemRows / G));
  const int64_t rp = (tile_q * G + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t q_tiles = (ql + tile_q - 1) / tile_q;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const int64_t ks_blk = k_cache.stride(0), ks_tok = k_cache.stride(1), ks_h = k_cache.stride(2),
                ks_dim = k_cache.stride(3);
  const int64_t vs_blk = v_cache.stride(0), vs_tok = v_cache.stride(1), vs_h = v_cache.stride(2);
  // Keys transposed in whole vectors (the layout the engine allocates, kernels/ops.py kv_cache_empty)
  // are copied a dimension's vector at a time; any other layout key by key.
  const bool key_vectors = ks_tok == 1 && bs % W == 0 && kLoads8<C>;

  // Later query tiles see more keys: items go in the order 0, last, 1, last - 1, ... so that the
  // contiguous ranges parallel_for hands each thread carry about the same work.
  auto q_tile_of = [&](int64_t k) { return k % 2 == 0 ? k / 2 : q_tiles - 1 - k / 2; };

  at::parallel_for(0, q_tiles * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D * rp), ob(rp * D), st(kKeyTile * rp), m(rp), l(rp), alpha(rp);
    std::vector<float> kt(D * kKeyTile), vf(kKeyTile * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % Hk, i0 = q_tile_of(item / Hk) * tile_q;
      const int64_t n_pos = std::min<int64_t>(tile_q, ql - i0), n_rows = n_pos * G;
      const int64_t first_pos = q_pos0 + i0, last_pos = first_pos + n_pos - 1;
      std::fill(qt.begin(), qt.end(), 0.f);
      for (int64_t r = 0; r < n_rows; ++r) {
        const T* src = qp + (i0 + r / G) * q.stride(0) + (h * G + r % G) * q.stride(1);
        for (int64_t d = 0; d < D; ++d) qt[d * rp + r] = static_cast<float>(src[d]) * scale;
      }
      std::fill(ob.begin(), ob.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t key_end = last_pos + 1;  // keys [key_lo, key_end) are read
      int64_t key_lo = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
      key_lo = key_lo / kKeyTile * kKeyTile;
      for (int64_t k0 = key_lo; k0 < key_end; k0 += kKeyTile) {
        const int64_t nk = std::min<int64_t>(kKeyTile, key_end - k0);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t t = k0 + j;
          load_row(vp + int64_t(blocks[t / bs]) * vs_blk + (t % bs) * vs_tok + h * vs_h, D, &vf[j * D]);
        }
        std::fill(vf.begin() + nk * D, vf.end(), 0.f);  // keys past the end: masked below, weigh 0
        if (key_vectors) {  // a vector past nk (inside its block) is read too and zeroed below
          if constexpr (kLoads8<C>)
            for (int64_t j = 0; j < nk; j += W) {
              const int64_t t = k0 + j;
              const C* src = kp + int64_t(blocks[t / bs]) * ks_blk + (t % bs) + h * ks_h;
              for (int64_t d = 0; d < D; ++d)
                Vec::store(&kt[d * kKeyTile + j], Vec::template load_cache<C>(src + d * ks_dim));
            }
        } else {
          for (int64_t j = 0; j < nk; ++j) {
            const int64_t t = k0 + j;
            const C* src = kp + int64_t(blocks[t / bs]) * ks_blk + (t % bs) * ks_tok + h * ks_h;
            for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + j] = static_cast<float>(src[d * ks_dim]);
          }
        }
        for (int64_t d = 0; d < D; ++d) std::fill(&kt[d * kKeyTile + nk], &kt[(d + 1) * kKeyTile], 0.f);
        for (int64_t r0 = 0; r0 < rp; r0 += kRowBlock) tile_scores(kt.data(), qt.data(), rp, D, r0, st.data());
        if (softcap > 0.f)
          for (int64_t i = 0; i < kKeyTile * rp; ++i) st[i] = softcap * std::tanh(st[i] / softcap);
        // Every row sees every key of the tile unless the diagonal, the window's edge or the keys'
        // end crosses it.
        if (!(k0 + kKeyTile - 1 <= first_pos && (window <= 0 || k0 > last_pos - window))) {
          for (int64_t j = 0; j < kKeyTile; ++j) {
            const int64_t t = k0 + j;
            for (int64_t r = 0; r < n_rows; ++r) {
              const int64_t pos = first_pos + r / G;
              if (t > pos || (window > 0 && t <= pos - window)) st[j * rp + r] = kNegInf;
            }
          }
        }
        for (int64_t r0 = 0; r0 < rp; r0 += W) softmax_step(st.data(), rp, r0, m.data(), l.data(), alpha.data());
        for (int64_t r = 0; r < n_rows; ++r) {
          if (alpha[r] == 1.f) continue;  // the running max held: nothing to rescale
          float* o = &ob[r * D];
          const R a = Vec::set1(alpha[r]);
          int64_t d = 0;
          for (; d + W <= D; d += W) Vec::store(o + d, Vec::mul(Vec::load(o + d), a));
          for (; d < D; ++d) o[d] *= alpha[r];
        }
        for (int64_t r0 = 0; r0 < rp; r0 += Vec::kOutRows)
          tile_accumulate(st.data(), rp, r0, vf.data(), D, ob.data());
      }
      for (int64_t r = 0; r < n_rows; ++r) {
        T* dst = op + (i0 + r / G) * out.stride(0) + (h * G + r % G) * out.stride(1);
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(ob[r * D + d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_ids, int64_t seq_len, double scale, int64_t sliding_window,
                                   double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && v_cache.stride(3) == 1, "q's and V's head_dim must be contiguous");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "query heads must be a multiple of KV heads, with the caches' head size");
  TORCH_CHECK(seq_len >= q.size(0), "seq_len ", seq_len, " is shorter than the ", q.size(0), " queries");
  auto blocks = block_ids.to(at::kInt).contiguous();
  TORCH_CHECK(blocks.numel() * k_cache.size(1) >= seq_len, "block_ids hold fewer than seq_len tokens");
  auto out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(cache_type == q.scalar_type() || cache_type == at::kHalf || cache_type == at::kBFloat16,
              "paged_prefill_attention: caches must be q's dtype, float16 or bfloat16, got ", cache_type);
  const auto* bp = blocks.data_ptr<int32_t>();
  const float s = static_cast<float>(scale), cap = static_cast<float>(softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_prefill_attention", [&] {
    if (cache_type == q.scalar_type())
      prefill_kernel<scalar_t, scalar_t>(q, k_cache, v_cache, bp, seq_len, out, s, sliding_window, cap);
    else if (cache_type == at::kHalf)
      prefill_kernel<scalar_t, at::Half>(q, k_cache, v_cache, bp, seq_len, out, s, sliding_window, cap);
    else
      prefill_kernel<scalar_t, at::BFloat16>(q, k_cache, v_cache, bp, seq_len, out, s, sliding_window, cap);
  });
  return out;
}
