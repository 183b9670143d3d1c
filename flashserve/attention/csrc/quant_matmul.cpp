// y = x @ W^T for a weight stored as low-bit codes with a scale and a zero per group along K:
//
//     W[n, k] = q[n, k] * s[n, g] + z[n, g],   g = k / G
//
// which holds exactly for GGUF's Q4_0 (z = -8 s), Q4_1, Q4_K (per 32-value sub-block), Q8_0
// (z = 0) and the 5/6-bit types read into int8 codes. Per group the sum splits as
//
//     sum_k W[n, k] x[k] = s[n, g] * sum_k q[n, k] x[k] + z[n, g] * sum_k x[k]
//
// so the codes are widened to float32 and scaled once per group, then multiplied with float32 activations
// (no rounding of x or of the output, unlike torch's bfloat16-only int4/int8 kernels); the
// activation sums per group are computed once per call.
//
// Layouts (row-major over n):
//   bits 4, G = 32: codes (N, K/2) uint8; byte j of a group's 16 holds q[j] in its low nibble
//                   and q[j + 16] in its high nibble (GGUF's own Q4_0/Q4_1 block order).
//   bits 8, G % 16 == 0: codes (N, K) int8.
//
// Each output row is computed by the same instructions whatever M is and wherever it sits in
// the batch, so a request's numbers do not depend on what it is batched with.
//
// int8 activations (optional, G = 32): each row of x is rounded per group to int8 codes with a
// scale, xq = round(x / dx), dx = max|x| / 127, the scheme llama.cpp pairs with its Q4/Q8 weights
// (its "Q8" activation blocks). The group's dot product is then exact integer arithmetic,
//
//     sum_k q[n, k] x[k]  ~  dx * sum_k q[n, k] xq[k]
//
// done 32 products at a time by AVX2's u8 x s8 multiply-add (vpmaddubsw; signed codes go through
// vpsignb so that one operand is non-negative). The zero term keeps the exact float sums of x
// (llama.cpp uses the rounded x's sums there; measured, that doubled the perplexity change of
// SmolLM2 and made Gemma 3's five times larger). The rounding of x is per row: rows stay
// independent of the batch. The large-M path (dequantize + GEMM, flashserve/quantization/packed.py)
// keeps x in float32: rounding it there as well made greedy outputs drift further from float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace {

constexpr int64_t kRowsPerTask = 8;  // output rows per parallel work item
constexpr int kMaxMB = 4;            // activation rows sharing one widening of the codes

struct Problem {
  const float* x;      // (M, K)
  const float* xsum;   // (M, K/G) per-group activation sums
  const uint8_t* codes;
  const float* scale;  // (N, K/G)
  const float* zero;   // (N, K/G) or nullptr
  float* y;            // (M, N)
  int64_t M, N, K, G, bits;
  const int8_t* xq = nullptr;  // (M, K) int8 codes of x, when activations are rounded to int8
  const float* dx = nullptr;   // (M, K/32) their scales
};

#ifdef FS_AVX2
// y[m, n] = the two accumulators' lanes + sum_g z[n, g] * xsum[m, g].
template <int MB>
void finish_rows(const Problem& p, int64_t n, int64_t m0, const __m256* acc0, const __m256* acc1) {
  const int64_t groups = p.K / p.G;
  for (int i = 0; i < MB; ++i) {
    float total = hsum(_mm256_add_ps(acc0[i], acc1[i]));
    if (p.zero) {
      const float* z = p.zero + n * groups;
      const float* xs = p.xsum + (m0 + i) * groups;
      __m256 zacc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8) zacc = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(xs + g), zacc);
      total += hsum(zacc);
      for (; g < groups; ++g) total += z[g] * xs[g];
    }
    p.y[(m0 + i) * p.N + n] = total;
  }
}

// One output row n against MB activation rows starting at m0. The codes of a group are widened
// and multiplied by the group's scale once, then shared by the MB rows; each row keeps two
// accumulators so that 2 * MB independent FMA chains hide the FMA latency.
template <int MB>
void row_int4(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / 32;
  const uint8_t* c = p.codes + n * (p.K / 2);
  const float* s = p.scale + n * groups;
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + g * 16));
    const __m128i lo = _mm_and_si128(b, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    const __m256 sg = _mm256_set1_ps(s[g]);
    const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), sg);
    const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), sg);
    const __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), sg);
    const __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), sg);
    for (int i = 0; i < MB; ++i) {
      const float* xp = p.x + (m0 + i) * p.K + g * 32;
      acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc1[i]);
      acc0[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), acc1[i]);
    }
  }
  finish_rows<MB>(p, n, m0, acc0, acc1);
}

template <int MB>
void row_int8(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / p.G;
  const int8_t* c = reinterpret_cast<const int8_t*>(p.codes) + n * p.K;
  const float* s = p.scale + n * groups;
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 sg = _mm256_set1_ps(s[g]);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 16) {  // G % 16 == 0
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k));
      const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sg);
      const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), sg);
      for (int i = 0; i < MB; ++i) {
        const float* xp = p.x + (m0 + i) * p.K + k;
        acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc0[i]);
        acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc1[i]);
      }
    }
  }
  finish_rows<MB>(p, n, m0, acc0, acc1);
}

// Integer dot products of one weight group (32 codes in `w`, bytes in k order) with MB rows of
// int8 activations, scaled by s[g] * dx[m, g] into one float accumulator per row. `w_abs` and
// the sign trick apply to signed codes; unsigned 4-bit codes go straight into vpmaddubsw.
template <int MB, bool kSigned>
inline void group_q8(const Problem& p, __m256i w, int64_t n, int64_t g, int64_t m0, float sg, __m256* acc) {
  const int64_t groups = p.K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i w_u = kSigned ? _mm256_sign_epi8(w, w) : w;  // |q| as unsigned bytes (|-128| = 128)
  for (int i = 0; i < MB; ++i) {
    const int64_t m = m0 + i;
    __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + m * p.K + g * 32));
    if (kSigned) xq = _mm256_sign_epi8(xq, w);  // move q's sign onto x: |q| * (sign(q) x) = q x
    // Pairs of u8 x s8 products summed into int16 (|sum| <= 2 * 128 * 127, no saturation), then
    // pairs of those into int32.
    const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w_u, xq), ones);
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sg * p.dx[m * groups + g]), acc[i]);
  }
}

// One output row n against MB rows of int8 activations; codes_of(g) gives the group's 32 codes in
// k order. Two accumulators per row, for even and odd groups, overlap the FMA latency.
template <int MB, bool kSigned, typename CodesOf>
void row_q8(const Problem& p, int64_t n, int64_t m0, CodesOf codes_of) {
  const int64_t groups = p.K / 32;
  const float* s = p.scale + n * groups;
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    group_q8<MB, kSigned>(p, codes_of(g), n, g, m0, s[g], acc0);
    group_q8<MB, kSigned>(p, codes_of(g + 1), n, g + 1, m0, s[g + 1], acc1);
  }
  if (g < groups) group_q8<MB, kSigned>(p, codes_of(g), n, g, m0, s[g], acc0);
  finish_rows<MB>(p, n, m0, acc0, acc1);
}

template <int MB>
void row_int4_q8(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* c = p.codes + n * (p.K / 2);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  row_q8<MB, false>(p, n, m0, [&](int64_t g) {  // low nibbles hold codes 0..15, high ones 16..31
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + g * 16));
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
  });
}

template <int MB>
void row_int8_q8(const Problem& p, int64_t n, int64_t m0) {
  const int8_t* c = reinterpret_cast<const int8_t*>(p.codes) + n * p.K;
  row_q8<MB, true>(p, n, m0, [&](int64_t g) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + g * 32));
  });
}
#endif

// Portable version of the same arithmetic (codes times scale, dotted with x, plus z * xsum).
void row_scalar(const Problem& p, int64_t n, int64_t m) {
  const int64_t groups = p.K / p.G;
  const float* xr = p.x + m * p.K;
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float d = 0.f;
    for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) {
      int q;
      if (p.bits == 4) {
        const int64_t j = k % 32, byte = n * (p.K / 2) + (k / 32) * 16 + (j % 16);
        q = j < 16 ? (p.codes[byte] & 0x0F) : (p.codes[byte] >> 4);
      } else {
        q = reinterpret_cast<const int8_t*>(p.codes)[n * p.K + k];
      }
      d += static_cast<float>(q) * p.scale[n * groups + g] * xr[k];
    }
    total += d;
    if (p.zero) total += p.zero[n * groups + g] * p.xsum[m * groups + g];
  }
  p.y[m * p.N + n] = total;
}

// Portable version of the int8-activation arithmetic: exact integer dot per group, then scaled.
void row_scalar_q8(const Problem& p, int64_t n, int64_t m) {
  const int64_t groups = p.K / 32;
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    int32_t d = 0;
    for (int64_t k = g * 32; k < (g + 1) * 32; ++k) {
      int q;
      if (p.bits == 4) {
        const int64_t j = k % 32, byte = n * (p.K / 2) + g * 16 + (j % 16);
        q = j < 16 ? (p.codes[byte] & 0x0F) : (p.codes[byte] >> 4);
      } else {
        q = reinterpret_cast<const int8_t*>(p.codes)[n * p.K + k];
      }
      d += q * p.xq[m * p.K + k];
    }
    total += static_cast<float>(d) * (p.scale[n * groups + g] * p.dx[m * groups + g]);
    if (p.zero) total += p.zero[n * groups + g] * p.xsum[m * groups + g];
  }
  p.y[m * p.N + n] = total;
}

template <int MB>
void rows(const Problem& p, int64_t n, int64_t m0) {
#ifdef FS_AVX2
  if (p.xq) return p.bits == 4 ? row_int4_q8<MB>(p, n, m0) : row_int8_q8<MB>(p, n, m0);
  if (p.bits == 4) return row_int4<MB>(p, n, m0);
  return row_int8<MB>(p, n, m0);
#else
  for (int i = 0; i < MB; ++i) p.xq ? row_scalar_q8(p, n, m0 + i) : row_scalar(p, n, m0 + i);
#endif
}

// Per group of 32 values of x: the exact float sum (for the zero term; xsum may be null) and, when
// xq is given, the int8 rounding dx = max|x| / 127, xq = round-half-even(x / dx) in [-127, 127].
void prepare_activations(const float* x, int64_t M, int64_t K, float* xsum, int8_t* xq, float* dx) {
  const int64_t groups = K / 32;
  at::parallel_for(0, M * groups, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t mg = begin; mg < end; ++mg) {
      const float* xp = x + mg * 32;  // rows are contiguous, so group mg of the flat array
      float amax = 0.f, sum = 0.f;
      for (int k = 0; k < 32; ++k) {
        amax = std::max(amax, std::fabs(xp[k]));
        sum += xp[k];
      }
      if (xsum) xsum[mg] = sum;
      if (!xq) continue;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      dx[mg] = amax / 127.f;
      for (int k = 0; k < 32; ++k) xq[mg * 32 + k] = static_cast<int8_t>(std::nearbyint(xp[k] * inv));
    }
  });
}

}  // namespace

at::Tensor group_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group,
                              bool int8_activations) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "group_quant_matmul: x must be (M, K) float32");
  TORCH_CHECK(bits == 4 || bits == 8, "group_quant_matmul: bits must be 4 or 8");
  TORCH_CHECK(bits == 8 ? group % 16 == 0 : group == 32, "group_quant_matmul: unsupported group size ", group);
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = codes.size(0);
  TORCH_CHECK(K % group == 0 && codes.size(1) == (bits == 4 ? K / 2 : K), "group_quant_matmul: codes ",
              codes.sizes(), " do not match K = ", K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.size(0) == N && scale.size(1) == K / group &&
                  scale.is_contiguous() && codes.is_contiguous(),
              "group_quant_matmul: scale must be contiguous (N, K/G) float32");
  const bool has_zero = zero.has_value() && zero->defined();
  if (has_zero) TORCH_CHECK(zero->sizes() == scale.sizes() && zero->scalar_type() == at::kFloat && zero->is_contiguous());
  auto y = at::empty({M, N}, xc.options());
  // The zero term needs per-group sums of x; only the 4-bit form has zeros, and its groups are 32.
  TORCH_CHECK(!has_zero || group == 32, "group_quant_matmul: zeros need groups of 32");
  TORCH_CHECK(!int8_activations || group == 32, "group_quant_matmul: int8 activations need groups of 32, got ", group);
  at::Tensor xsum, xq, dx;
  if (has_zero) xsum = at::empty({M, K / 32}, xc.options());
  if (int8_activations) {
    xq = at::empty({M, K}, xc.options().dtype(at::kChar));
    dx = at::empty({M, K / 32}, xc.options());
  }
  if (has_zero || int8_activations)
    prepare_activations(xc.data_ptr<float>(), M, K, has_zero ? xsum.data_ptr<float>() : nullptr,
                        int8_activations ? xq.data_ptr<int8_t>() : nullptr,
                        int8_activations ? dx.data_ptr<float>() : nullptr);
  Problem p{xc.data_ptr<float>(), has_zero ? xsum.data_ptr<float>() : nullptr,
            codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
            has_zero ? zero->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, N, K, group, bits};
  if (int8_activations) {
    p.xq = xq.data_ptr<int8_t>();
    p.dx = dx.data_ptr<float>();
  }
  at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_end = std::min(end * kRowsPerTask, N);
    // Activation rows in blocks of kMaxMB, each block against the task's rows while their
    // codes are in L1; the block of x is reused by every row of the task.
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
      const int64_t mb = std::min<int64_t>(kMaxMB, M - m0);
      for (int64_t n = begin * kRowsPerTask; n < n_end; ++n) {
        switch (mb) {
          case 4: rows<4>(p, n, m0); break;
          case 3: rows<3>(p, n, m0); break;
          case 2: rows<2>(p, n, m0); break;
          default: rows<1>(p, n, m0); break;
        }
      }
    }
  });
  return y;
}
