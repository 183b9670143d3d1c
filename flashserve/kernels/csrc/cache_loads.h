// Cached K/V values as float32 lanes, for the attention kernels: a plain load for a float32 cache,
// converted in registers for a float16 (F16C) or bfloat16 (the high half of a float32) one, so a
// 2-byte cache costs half the memory traffic and no extra pass.
#pragma once
#include "kernels.h"

#include <type_traits>

#include "simd.h"

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

#ifdef FS_AVX512
template <typename C>
inline __m512 load16(const C* p) {
  if constexpr (std::is_same_v<C, float>) {
    return _mm512_loadu_ps(p);
  } else {
    static_assert(std::is_same_v<C, at::Half> || std::is_same_v<C, at::BFloat16>);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<C, at::Half>) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
#endif
