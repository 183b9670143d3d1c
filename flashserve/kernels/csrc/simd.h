// AVX2 helpers shared by the kernels; FS_AVX2 is defined when the build targets AVX2 with FMA.
#pragma once

// A line on its way to L2 only: far-ahead requests that do not hold the core's few L1 miss buffers
// (the decode attention's prefetch stalled on them with prefetcht0). Every build has it.
#if defined(__x86_64__) || defined(__i386__)
inline void prefetch_line_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }
#else
inline void prefetch_line_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FS_AVX2 1

// A line on its way to L1. Not __builtin_prefetch / _mm_prefetch: GCC 12 (-O1 and above) compiled
// the prefetch loops of quant_matmul.cpp to nothing at all (seen in the disassembly); a volatile
// asm statement stays.
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// acc + the u8 x s8 dot product of each 32-bit lane's four bytes, exactly. AVX512-VNNI (with VL)
// and AVX-VNNI do it in one instruction (vpdpbusd); plain AVX2 takes vpmaddubsw, vpmaddwd and
// vpaddd, which give the same integers as long as no pair of products saturates int16 (each
// caller's operands keep |pair| <= 2 * 128 * 127). kVnni tells callers that keep int16 partial
// sums on AVX2 (cheaper there) to take the one-instruction form instead.
// FS_AVX512: 512-bit integer dot products (the avx512_vnni level's wide tiled GEMM).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define FS_AVX512 1
#endif

// FS_AMX: Intel's tile matrix unit with int8 products (the avx512_amx level). Its instructions fault
// until the kernel grants the process the tile state, so the kernels use it only after amx_ready().
#if defined(FS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define FS_AMX 1
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kVnni = true;
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#elif defined(__AVXVNNI__)
constexpr bool kVnni = true;
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
constexpr bool kVnni = false;
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#endif

// Sum of the eight lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x), lane-wise: exp(x) = 2^k exp(r) with k = round(x / ln 2) and r = x - k ln 2 in
// [-ln2/2, ln2/2] (Cody-Waite reduction with ln 2 split in two parts, as in Cephes' expf), exp(r)
// by its Taylor series to r^7 (truncation < 1.5e-8 relative there). Below -87 (2^k would be
// subnormal) the result is 0, which also makes exp(-inf) = 0; above 88 it is exp(88).
inline __m256 exp_ps(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i pow2k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2k)));
}
#endif

#ifdef FS_AVX512
// exp_ps in sixteen lanes (the same reduction and series, so each lane equals exp_ps's).
inline __m512 exp_ps16(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i pow2k = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), p, _mm512_castsi512_ps(pow2k));
}
#endif
