// Paged decode attention for CPU: one query token per sequence, K/V read in place from the
// block-paged cache (no gather copy), query heads grouped under their KV head (GQA/MQA), the
// KV length cut into splits whose partial softmaxes are merged by log-sum-exp
// (Flash-Decoding, Dao et al. 2023). Work items are (sequence, kv head, split), run with OpenMP.
//
//   partial over split s:  m_s = max score, l_s = sum exp(score - m_s), o_s = sum exp(score - m_s) v
//   merged:                m = max_s m_s,  o = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
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
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t q_stride_n = q.stride(0), q_stride_h = q.stride(1);
  const int64_t kv_stride_block = k_cache.stride(0), kv_stride_tok = k_cache.stride(1), kv_stride_h = k_cache.stride(2);

  int64_t max_len = 0;
  for (int64_t n = 0; n < N; ++n) max_len = std::max<int64_t>(max_len, lens[n]);
  const int64_t num_splits = std::max<int64_t>(1, (max_len + split_tokens - 1) / split_tokens);
  // Partial results per (n, kv head, split, group member): running max, sum and output row.
  std::vector<float> part_m(N * Hk * num_splits * G), part_l(N * Hk * num_splits * G);
  std::vector<float> part_o(N * Hk * num_splits * G * D);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, N * Hk * num_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), kf(D), vf(D), s(G);
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
      if (t0 >= t1) continue;
      for (int64_t g = 0; g < G; ++g)
        load_row(qp + n * q_stride_n + (h * G + g) * q_stride_h, &qf[g * D], D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t blk = t / bs;
        if (blk >= max_blocks) break;
        const int64_t base = int64_t(bt[n * max_blocks + blk]) * kv_stride_block + (t % bs) * kv_stride_tok + h * kv_stride_h;
        load_row(kp + base, kf.data(), D);
        load_row(vp + base, vf.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)  // lets the compiler vectorize the reduction (reassociates the sum)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * kf[d];
          float sc = dot * static_cast<float>(scale);
          if (softcap > 0) sc = static_cast<float>(softcap) * std::tanh(sc / static_cast<float>(softcap));
          float* og = o + g * D;
          if (sc > m[g]) {  // new running max: rescale what was accumulated so far
            const float a = std::exp(m[g] - sc);  // exp(-inf) = 0 on the first key
            l[g] *= a;
            for (int64_t d = 0; d < D; ++d) og[d] *= a;
            m[g] = sc;
          }
          const float p = std::exp(sc - m[g]);
          l[g] += p;
          for (int64_t d = 0; d < D; ++d) og[d] += p * vf[d];
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
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  auto bt = block_table.to(at::kInt).contiguous();
  auto lens = seq_lens.to(at::kInt).contiguous();
  auto out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, bt, lens, out, scale, sliding_window, softcap, split_tokens);
  });
  return out;
}
