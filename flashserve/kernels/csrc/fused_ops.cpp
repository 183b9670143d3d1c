// Fused element-wise CPU ops of a decoder layer. Each replaces five to eight small torch ops
// (and their dispatch and temporaries) with one pass over the rows; every formula keeps the
// rounding points of the torch implementation it replaces (statistics and products in
// float32, the result rounded once to the tensor's dtype), so the two paths agree to an ulp.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "simd.h"

namespace {

// Rows of a (A, B, D) view with the last dim contiguous: row r = (r / B, r % B).
struct Rows {
  int64_t B, D, s0, s1;
  explicit Rows(const at::Tensor& x)
      : B(x.dim() == 3 ? x.size(1) : 1), D(x.size(-1)), s0(x.stride(0)), s1(x.dim() == 3 ? x.stride(1) : 0) {}
  int64_t offset(int64_t r) const { return (r / B) * s0 + (r % B) * s1; }
};

// Rows per parallel task: a decode step's few rows are cheaper in one thread than the wake-up
// and barrier of a parallel region (which also stall behind any other busy process on 2 cores).
int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, row_elems)); }

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, what, ": expected a 2-d or 3-d tensor");
  TORCH_CHECK(x.stride(-1) == 1, what, ": the last dimension must be contiguous");
}

// RMSNorm (Zhang & Sennrich 2019): y = x * rsqrt(mean(x^2) + eps) * w; when a residual is
// given, x is first replaced by x + residual (rounded to the dtype) and that sum is written
// back to the residual, as the pre-norm block's next residual stream.
template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* residual, at::Tensor& out, const at::Tensor& weight,
                   double eps) {
  const Rows xr(x), orow(out);
  const Rows rr = residual ? Rows(*residual) : xr;
  const int64_t D = xr.D, n = x.numel() / D;
  const T* xp = x.data_ptr<T>();
  T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const auto wf = weight.to(at::kFloat).contiguous();
  const float* w = wf.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t r = begin; r < end; ++r) {
      const T* src = xp + xr.offset(r);
      if (rp) {
        T* res = rp + rr.offset(r);
        for (int64_t d = 0; d < D; ++d) {
          const T sum = static_cast<T>(static_cast<float>(src[d]) + static_cast<float>(res[d]));
          res[d] = sum;
          row[d] = static_cast<float>(sum);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += row[d] * row[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      T* dst = op + orow.offset(r);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>((row[d] * inv) * w[d]);
    }
  });
}

// Rotary embedding (Su et al. 2021), rotate-half layout, in place:
// [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] with float32 cos/sin tables (max_pos, D/2).
template <typename T>
void rotary_rows(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const Rows xr(x);
  const int64_t half = xr.D / 2, n = x.numel() / xr.D;
  T* xp = x.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(xr.D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* v = xp + xr.offset(r);
      const float* c = cp + pos[r / xr.B] * half;
      const float* s = sp + pos[r / xr.B] * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
        v[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
        v[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  });
}

// Gated MLP activation on [gate | up]: act(gate) rounded to the dtype, times up (as torch does).
template <typename T, bool Gelu>
void act_and_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t d = out.size(-1), n = out.numel() / d, in_stride = gate_up.stride(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n, grain_rows(3 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * in_stride;
      const T* u = g + d;
      T* o = op + r * d;
      int64_t i = 0;
#ifdef FS_AVX2
      if constexpr (std::is_same_v<T, float>) {  // eight lanes at a time, exp by exp_ps
        const __m256 one = _mm256_set1_ps(1.f);
        for (; i + 8 <= d; i += 8) {
          const __m256 x = _mm256_loadu_ps(g + i);
          __m256 a;
          if constexpr (Gelu) {  // tanh(y) = 1 - 2 / (exp(2y) + 1)
            const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                           _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f), x3)));
            const __m256 e = exp_ps(_mm256_add_ps(y, y));
            const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, one)));
            a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, t));
          } else {
            a = _mm256_div_ps(x, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
          }
          _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
        }
      }
#endif
      for (; i < d; ++i) {
        const float x = static_cast<float>(g[i]);
        float a;
        if constexpr (Gelu) {  // tanh approximation (Hendrycks & Gimpel 2016)
          const float k = 0.7978845608028654f;  // sqrt(2 / pi)
          a = 0.5f * x * (1.f + std::tanh(k * (x + 0.044715f * x * x * x)));
        } else {
          a = x / (1.f + std::exp(-x));
        }
        o[i] = static_cast<T>(static_cast<float>(static_cast<T>(a)) * static_cast<float>(u[i]));
      }
    }
  });
}

// Index of the first maximum of x[0, n), or of the first NaN when there is one (torch.argmax's
// answer on the CPU, where NaN compares above every number): one pass for the max and a NaN flag,
// one for the first index holding it. Both passes stream the row at memory speed.
int64_t row_argmax(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#ifdef FS_AVX2
  __m256 vmax = _mm256_set1_ps(best), vnan = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmax = _mm256_max_ps(vmax, v);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float f : lanes) best = std::max(best, f);
  nan = _mm256_movemask_ps(vnan) != 0;
#endif
  for (; i < n; ++i) {
    nan = nan || std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  for (int64_t j = 0; j < n; ++j)
    if (nan ? std::isnan(x[j]) : x[j] == best) return j;
  return 0;  // n == 0
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x, nullptr, out, weight, eps);
  });
  return out;
}

at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm_");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() && residual.stride(-1) == 1,
              "add_rms_norm_: residual must match x");
  auto out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    rms_norm_rows<scalar_t>(x, &residual, out, weight, eps);
  });
  return out;
}

void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "rotary_");
  TORCH_CHECK(x.dim() == 3 && positions.size(0) == x.size(0), "rotary_: x must be (T, H, D) with T positions");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(1) * 2 == x.size(2), "rotary_: float32 (max_pos, D/2) tables expected");
  auto pos = positions.to(at::kLong).contiguous();
  // The tables cover the engine's context, not always the model's: a position past them must fail
  // here rather than read past the end.
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < pos.numel(); ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "rotary_: position ", pp[t], " is outside the tables' ",
                cos.size(0), " positions");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    rotary_rows<scalar_t>(x, pos, cos, sin);
  });
}

at::Tensor act_and_mul(const at::Tensor& gate_up, bool gelu_tanh) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "act_and_mul: expected (T, 2d) with a contiguous last dimension");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "act_and_mul", [&] {
    if (gelu_tanh) act_and_mul_rows<scalar_t, true>(gate_up, out);
    else act_and_mul_rows<scalar_t, false>(gate_up, out);
  });
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0,
              "argmax_rows: expected a contiguous non-empty (M, V) float32 tensor");
  const int64_t M = x.size(0), V = x.size(1);
  auto out = at::empty({M}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) op[m] = row_argmax(xp + m * V, V);
  });
  return out;
}
