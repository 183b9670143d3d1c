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
//   bits 5, G = 32: codes (N, K/32 * 20) uint8, a group's 20 bytes being GGUF's Q5_0 block without
//                   its scale: 16 bytes of low nibbles as above, then 4 bytes (little-endian u32)
//                   whose bit j is bit 4 of q[j]; the code is signed, q - 16 (Q5_0's w = d (q - 16)).
//   bits 8, G % 16 == 0: codes (N, K) int8.
// Scales and zeros: (N, K/G) float32 or float16, or factored (integer times float16 per 8 groups,
// Q4_K's own form; see Table).
//
// Each output row is computed by the same instructions whatever M is and wherever it sits in
// the batch, so a request's numbers do not depend on what it is batched with.
//
// int8 activations (optional; G = 32, or 16 for 8-bit codes): each row of x is rounded per 32 values
// (a span) to int8 codes with a scale, xq = round(x / dx), dx = max|x| / 127, the scheme llama.cpp
// pairs with its Q4/Q8 weights (its "Q8" activation blocks). A group's dot product is then exact
// integer arithmetic,
//
//     sum_k q[n, k] x[k]  ~  dx * sum_k q[n, k] xq[k]
//
// done 32 products at a time by u8 x s8 multiply-adds (AVX2's vpmaddubsw, or VNNI's vpdpbusd
// where the CPU has it, simd.h's dpbusd; signed codes go through vpsignb so that one operand is
// non-negative). The zero term takes the sums of the rounded x,
// dx * sum(xq), as llama.cpp's Q8_1 blocks do: then the error is W (x_rounded - x), the weight
// times the rounding error. With exact float sums it is (W - z)(x_rounded - x) instead, and for
// Q4_0/Q4_1 W - z = q s is an uncentred 0..15 s that adds z's share of every rounding error:
// measured on SmolLM2 (256 tokens of GPL-3 in chunks of 32), KL to float activations 2.8e-2 with
// exact sums, 5.1e-3 with rounded ones. The rounding of x is per row, and the GEMV and
// GEMM kernels below share one float order (see "int8 activations" below): rows stay independent
// of the batch. With int8 activations every M stays in these kernels (the tiled GEMM beats
// dequantize + float32 GEMM even at 512 rows), so prompts and decode steps round alike.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

namespace {

constexpr int64_t kRowsPerTask = 8;  // output rows per parallel work item
constexpr int64_t kWideLanes = 16;   // output rows of a 16-lane (512-bit) tile, as stored by group_quant_matmul_tiles
constexpr int kMaxMB = 4;            // activation rows sharing one widening of the codes
#ifdef FS_AVX512
// The same for the int8 GEMV. With 32 vector registers 4 rows fit; a call of 3 or 4 rows then passes
// the codes once instead of twice: A/B on cycled weights, 4 rows / 2 rows per pass, M = 3 and 4:
// Qwen2.5 1.5B gate_up 0.66 0.69, down 0.84 0.82; SmolLM2 qkv 0.68 0.67, gate_up 0.69 0.73.
// Up to 6 for the long rows of gemm_min_rows below.
constexpr int kMaxMBInt8 = 6;
#else
constexpr int kMaxMBInt8 = 2;  // more rows spill the 16 AVX2 registers
#endif
constexpr int64_t kGemmMinRows = 5;  // int8 activations: from this many rows the GEMM kernels (measured)

// int8 activations: rows from which the tiled GEMM (output rows in the lanes, weights transposed
// per call) beats the one with activation rows in the lanes; the transposition is paid per call,
// so it needs rows to amortize it. The 8-lane tiles (AVX2), A/B builds alternated, 2 threads,
// weights cycled beyond L3, time tiled / time lanes-over-rows:
//            M:    8     16     32     48    128
//   qkv   576   1.51  1.06   0.93   0.92   0.77
//   o     576   1.43  1.02   0.91   0.95   0.75
//   gate_up 576 1.52  1.00   0.90   0.87   0.79
//   down  1536  1.42   -     0.83   0.97   0.79
//   head (8-bit) 1.31  0.97   0.78   0.73   0.66
#ifdef FS_AVX512
// The 16-lane tiles (one multiply-add per four k of 16 rows, the next task's groups prefetched as
// this one's are used) beat the lanes-over-rows GEMM from its first row count (RESULTS.md, issue 24).
// For 5- and 8-bit codes they also beat the GEMV from 3 rows, where the GEMV's second pass over
// the codes (2 rows per pass) costs about a whole one-row call: A/B on cycled weights, GEMM / GEMV,
//                        M:  2     3     4
//   Qwen2.5 1.5B down 8-bit 0.81  0.59  0.51   (K = 8960)
//   Qwen2.5 1.5B head 8-bit 1.00  0.58  0.68
//   Gemma 3 gate_up 5-bit   1.34  0.87  0.80   (K = 640)
//   Gemma 3 head 8-bit      1.25  0.76  0.73
// 4-bit codes keep the GEMV below kGemmMinRows (Qwen gate_up 1.78 1.23 1.11), and on rows of at least
// 1536 values below 7 (GEMV of up to 6 rows a pass / GEMM, M = 5 and 6: Qwen gate_up 0.69 0.76, o 0.86
// 0.97, down (K 8960) 0.83 0.96, SmolLM2 down 0.87 1.01; on K = 576 the GEMM wins, 1.28-1.54).
// Speculative verification steps (a token and its k drafts) are these row counts.
inline int64_t gemm_min_rows(int64_t bits, int64_t K) {
  return bits != 4 ? 3 : K >= 1536 ? 7 : kGemmMinRows;
}
inline int64_t tile_min_rows(int64_t bits, int64_t K) { return gemm_min_rows(bits, K); }
#else
inline int64_t gemm_min_rows(int64_t, int64_t) { return kGemmMinRows; }
// 4-bit tiles from 24 rows, 5- and 8-bit ones from 16: measured while 5-bit tiles held signed codes (as
// 8-bit ones do); not measured again since they hold them unsigned, as 4-bit ones do.
inline int64_t tile_min_rows(int64_t bits, int64_t) { return bits == 4 ? 24 : 16; }
#endif

// What the kernels that take codes unsigned (vpdpbusd multiplies u8 by s8) add to each: 5-bit codes are
// read as c + 16, 8-bit ones as q + 128 (the sign bit flipped); 4-bit codes are unsigned already.
constexpr int32_t code_offset(int64_t bits) { return bits == 4 ? 0 : bits == 5 ? 16 : 128; }
// A stored tile's bytes u = c + this (unpack_*_bit_span): 6-bit tiles c + 32, 3-bit ones c + 4, 2-bit ones
// unsigned already; 4-bit indices into levels stand for the level + 128, as 8-bit codes.
constexpr int32_t tile_code_offset(int64_t bits, bool indexed = false) {
  return indexed ? 128 : bits == 6 ? 32 : bits == 3 ? 4 : bits == 2 ? 0 : code_offset(bits);
}

// Bytes of codes per weight row (layouts above).
inline int64_t row_code_bytes(int64_t bits, int64_t K) { return bits == 4 ? K / 2 : bits == 5 ? K / 32 * 20 : K; }

inline float half_to_float(uint16_t h) {
#if defined(FS_AVX2) && defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// Per (row, group) values, (N, K/G): float32, float16 where that holds them exactly (GGUF's own d
// and m are float16, which halves their bytes), or factored: a K-quant's values are a 6-bit
// integer per group times a float16 per super-block of 8 groups (Q4_K: s = d * sc, z = -dmin * mn,
// whose products are exact in float32), so each row holds its K/G integers as bytes and then its
// K/(8G) float16 factors, 0.625 bits per weight where float32 took 1. Empty when absent (no zeros).
struct Table {
  enum Kind { kFloat, kHalf, kFactored };
  const uint8_t* data = nullptr;
  Kind kind = kFloat;
  int64_t groups = 0;  // values per row
  explicit operator bool() const { return data != nullptr; }
  int64_t row_bytes() const { return kind == kFloat ? groups * 4 : kind == kHalf ? groups * 2 : groups + groups / 4; }
  const uint8_t* row(int64_t n) const { return data + n * row_bytes(); }
  float at(int64_t n, int64_t g) const {
    const uint8_t* r = row(n);
    if (kind == kFloat) return reinterpret_cast<const float*>(r)[g];
    if (kind == kHalf) return half_to_float(reinterpret_cast<const uint16_t*>(r)[g]);
    return half_to_float(reinterpret_cast<const uint16_t*>(r + groups)[g / 8]) * static_cast<float>(r[g]);
  }
#ifdef FS_AVX2
  // Values of row n, groups [g0, g0 + cnt), in lanes [0, cnt), zeros above; `mask` selects those lanes.
  __attribute__((always_inline)) __m256 load8(int64_t n, int64_t g0, int64_t cnt, __m256i mask) const {
    const uint8_t* r = row(n);
    if (kind == kFloat) return _mm256_maskload_ps(reinterpret_cast<const float*>(r) + g0, mask);
    if (kind == kFactored && cnt == 8 && g0 % 8 == 0) {  // one super-block: its factor times 8 integers
      const __m128i ints = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + g0));
      const float factor = half_to_float(reinterpret_cast<const uint16_t*>(r + groups)[g0 / 8]);
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ints)), _mm256_set1_ps(factor));
    }
    if (kind == kHalf && cnt == 8)
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(r) + g0)));
    // A row's last groups (K = 576: 18 groups, the third pass has 2): the halves a pair at a time by a
    // masked load, an odd last one on its own (a pair would read past the table's end on its last
    // row); a copy through the stack stalled on store forwarding, and a scalar loop per value cost
    // a row's tail as much as its full passes.
    if (kind == kHalf) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(r) + g0;
      const __m128i pairs = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(cnt / 2)), _mm_setr_epi32(0, 1, 2, 3));
      __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(h), pairs);
      if (cnt % 2) {
        const __m128i last = _mm_cmpeq_epi16(_mm_set1_epi16(static_cast<int16_t>(cnt - 1)),
                                             _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
        v = _mm_blendv_epi8(v, _mm_set1_epi16(static_cast<int16_t>(h[cnt - 1])), last);
      }
      return _mm256_cvtph_ps(v);
    }
    alignas(32) float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t i = 0; i < cnt; ++i) part[i] = at(n, g0 + i);
    return _mm256_load_ps(part);
  }
#endif
#ifdef FS_AVX512
  // Of a factored table's rows [n0, n0 + 16), rows past `live` zero: the 4 bytes from group g's integer
  // (byte 0) as 32-bit lanes, and g's factor. Two 32-bit gathers, each read kept inside its row (the
  // integer's 4 bytes run into the factors that follow it; the factor is read as the high half of the
  // 4 bytes ending with it).
  void factored_words16(int64_t n0, __mmask16 live, int64_t g, __m512i& ints, __m512& factor) const {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int32_t>(row_bytes())));
    const uint8_t* base = row(n0);
    ints = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base + g, 1);
    const __m512i factors = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base + groups + 2 * (g / 8) - 2, 1);
    factor = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(factors, 16)));
  }

  // Group g of a factored table's rows [n0, n0 + 16) as one vector, rows past `live` zero.
  __m512 factored16(int64_t n0, __mmask16 live, int64_t g) const {
    __m512i ints;
    __m512 f;
    factored_words16(n0, live, g, ints, f);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(ints, _mm512_set1_epi32(0xFF))), f);
  }

  // Groups g and g + 1 (g even) as factored16 gives each, from the same two gathers: the two integers
  // are adjacent bytes and share their factor.
  void factored16_pair(int64_t n0, __mmask16 live, int64_t g, __m512& first, __m512& second) const {
    __m512i ints;
    __m512 f;
    factored_words16(n0, live, g, ints, f);
    const __m512i byte = _mm512_set1_epi32(0xFF);
    first = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(ints, byte)), f);
    second = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(ints, 8), byte)), f);
  }

  // Group g of rows [n0, n0 + 16) as one vector, rows past `live` zero, for any kind: one 32-bit
  // gather where a per-row loop took 16 scalar loads and conversions. Reads stay inside the table:
  // a float16 past the first is read as the high half of the 4 bytes ending with it.
  __m512 column16(int64_t n0, __mmask16 live, int64_t g) const {
    if (kind == kFactored) return factored16(n0, live, g);
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int32_t>(row_bytes())));
    const uint8_t* base = row(n0);
    if (kind == kFloat) return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, rows, base + 4 * g, 1);
    const bool first = g == 0;  // groups >= 2 (checked by the caller): its 4 bytes stay in the row
    const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, base + (first ? 0 : 2 * g - 2), 1);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(first ? words : _mm512_srli_epi32(words, 16)));
  }
#endif
};

struct Problem {
  const float* x;      // (M, K)
  const float* xsum;   // (M, K/G) per-group activation sums
  const uint8_t* codes;
  Table scale;         // (N, K/G)
  Table zero;          // (N, K/G), or empty
  float* y;            // (M, N)
  int64_t M, N, K, G, bits;
  const int8_t* xq = nullptr;  // (M, K) int8 codes of x, when activations are rounded to int8
  const float* dx = nullptr;   // (M, K/32) their scales, one per 32 values (a span)
  const int8_t* xq_nibbles = nullptr;  // 4-bit GEMV: xq in the nibble order of kNibbleRun groups (nibble_rows)
  // (M, K/G) -offset * sum(xq) per group: the correction of codes read with an offset (unsigned 5-bit codes
  // in the GEMV, q + 16; the wide tiles' 5- and 8-bit codes, q + 16 and q + 128), made with the activations
  const int32_t* xq_corr = nullptr;
  // codes stored in the wide tiles' own order (group_quant_matmul_tiles), instead of codes/scale:
  const uint8_t* tiles = nullptr;        // (T, K/32, 64 tile_bits): tile t, span b = the WideTileGroup's w[0..7]
  int64_t tile_bits = 8;                 // 8: w[0..7] as they are; 6, 5, 4, 3, 2: packed in planes (unpack_*_bit_span)
  // 4-bit tiles of indices into 16 levels (IQ4's, or a codebook type's own few values), or null: byte i =
  // level i + 128, the unsigned code an index stands for (read with the 8-bit tiles' offset, 128)
  const uint8_t* tile_levels = nullptr;
  bool tile_signed_ints = false;         // a factored table's integers are int8 (6-bit tiles), not uint8
  // (T, K/G, 16): the scale vector of each group, float32, float16, or a factored table's integers
  // (uint8) times float16 factors (T, K/(8G), 16), one per 8 groups
  const uint8_t* tile_scales = nullptr;
  const uint8_t* tile_factors = nullptr;
  int64_t tile_scale_bytes = 4;  // of one value: 4, 2, or 1 (factored)
  // the zero term's vectors, laid out as the scales' (their own kind), or null: no zeros
  const uint8_t* tile_zeros = nullptr;
  const uint8_t* tile_zero_factors = nullptr;
  int64_t tile_zero_bytes = 4;
  // codebook tiles (codebook_matmul_tiles): the type (CodebookKind), its grid (words of indices into its
  // values), its values' codes (16 uint8), each tile's float16 d per 256 values (T, K/256, 16) and its
  // blocks' side bytes (T, K/256, side, 16); or kNoCodebook
  int tile_codebook = 0;
  const int16_t* tile_grid = nullptr;
  const uint8_t* tile_grid_codes = nullptr;
  const uint16_t* tile_d = nullptr;
  const uint8_t* tile_side = nullptr;
};

#ifdef FS_AVX2
// y[m, n] = the two accumulators' lanes + sum_g z[n, g] * xsum[m, g].
template <int MB>
void finish_rows(const Problem& p, int64_t n, int64_t m0, const __m256* acc0, const __m256* acc1) {
  const int64_t groups = p.K / p.G;
  for (int i = 0; i < MB; ++i) {
    float total = hsum(_mm256_add_ps(acc0[i], acc1[i]));
    if (p.zero) {
      const float* xs = p.xsum + (m0 + i) * groups;
      const __m256i all = _mm256_set1_epi32(-1);
      __m256 zacc = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8)
        zacc = _mm256_fmadd_ps(p.zero.load8(n, g, 8, all), _mm256_loadu_ps(xs + g), zacc);
      total += hsum(zacc);
      for (; g < groups; ++g) total += p.zero.at(n, g) * xs[g];
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
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + g * 16));
    const __m128i lo = _mm_and_si128(b, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    const __m256 sg = _mm256_set1_ps(p.scale.at(n, g));
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
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 sg = _mm256_set1_ps(p.scale.at(n, g));
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

// ---- int8 activations -------------------------------------------------------------------------
// Every kernel below computes y[m, n] with the same float operations in the same order, so a row's
// result does not depend on how many rows share the call or which kernel M selects:
//
//   D[g] = sum_k q[n, k] xq[m, k] over group g (exact integer arithmetic, any order)
//   acc[j] = fma(z[n, g], xsum[m, g], fma(float(D[g]), s[n, g] * dx[m, g], acc[j])),  j = g mod 8,
//            groups in increasing order (groups of 32; groups of 16: gemv_s8_g16's order, per span)
//   y = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))   (hsum's tree)
//
// The GEMV kernel (few rows) holds acc[0..7] as the lanes of one vector, groups eight at a time;
// the GEMM kernel for 5 to 15-23 rows holds one vector per j whose lanes are eight activation
// rows, the tiled GEMM above that one vector per j whose lanes are eight output rows.

// The 32 codes of a group as bytes in k order: unsigned 4-bit codes (low nibbles are codes 0..15,
// high nibbles 16..31) or signed 8-bit codes.
inline __m256i codes_u4(const uint8_t* c) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
}
inline __m256i codes_s8(const int8_t* c) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)); }

// A 5-bit group (20 bytes) as signed codes in k order: the nibbles as codes_u4 reads them, bit j of
// the u32 that follows moved to bit 4 of byte j (each byte picks the u32 byte holding its bit and
// tests it), minus 16.
inline __m256i codes_q5(const uint8_t* c) {
  uint32_t high;
  std::memcpy(&high, c + 16, 4);
  const __m256i spread = _mm256_shuffle_epi8(  // per 128-bit lane; both lanes hold the u32 in bytes 0-3
      _mm256_set1_epi32(static_cast<int32_t>(high)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);  // byte j of each 8: 1 << j
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_sub_epi8(_mm256_or_si256(codes_u4(c), _mm256_and_si256(set, _mm256_set1_epi8(0x10))),
                         _mm256_set1_epi8(16));
}

// A 5-bit group as unsigned codes q = c + 16 in 0..31, k order (the GEMV's form: u8 x s8 products need
// no sign moves, and sum(c x) = sum(q x) - 16 sum(x) in integers, exactly).
inline __m256i codes_q5_unsigned(const uint8_t* c) {
  uint32_t high;
  std::memcpy(&high, c + 16, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m256i bit4 = _mm256_maskz_mov_epi8(high, _mm256_set1_epi8(0x10));  // 0x10 where bit j is set
#else
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(high)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i bit4 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
  return _mm256_or_si256(codes_u4(c), bit4);
}

// Group g of weight row n as 32 bytes in k order: unsigned for 4-bit codes, signed otherwise.
template <int kBits>
inline __m256i group_codes(const Problem& p, int64_t n, int64_t g) {
  if constexpr (kBits == 8) return codes_s8(reinterpret_cast<const int8_t*>(p.codes) + n * p.K + g * 32);
  if constexpr (kBits == 5) return codes_q5(p.codes + n * row_code_bytes(5, p.K) + g * 20);
  return codes_u4(p.codes + n * (p.K / 2) + g * 16);
}

// 5-bit codes against float activations, as row_int8 with the codes unpacked per group.
template <int MB>
void row_int5(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / 32;
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 sg = _mm256_set1_ps(p.scale.at(n, g));
    alignas(32) int8_t c[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), group_codes<5>(p, n, g));
    for (int h = 0; h < 32; h += 16) {
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(c + h));
      const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sg);
      const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), sg);
      for (int i = 0; i < MB; ++i) {
        const float* xp = p.x + (m0 + i) * p.K + g * 32 + h;
        acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc0[i]);
        acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc1[i]);
      }
    }
  }
  finish_rows<MB>(p, n, m0, acc0, acc1);
}

// Signed codes times x: |q| (u8) times x with q's sign moved onto it (s8), products summed in pairs
// into int16 (vpmaddubsw), then in pairs into int32: 8 lanes whose sum is the group's integer dot
// product. |pair sum| <= 2 * 128 * 127: no saturation.
inline __m256i dot_lanes_s8(__m256i w, __m256i x) {
  return dpbusd(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

// Lane i of the result = the sum of v[i]'s eight lanes.
inline __m256i reduce8(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, c, 0x20), _mm256_permute2x128_si256(a, c, 0x31));
}

inline __m256 first_lanes(int64_t count) {  // mask of lanes [0, count)
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), idx));
}

// The float step of the canonical order for eight groups from g0 (the first `cnt` live) of output
// row n and activation row m, D holding their integer dot products in group order. Forced inline
// (with Table::load8): left to itself the compiler called it, a stack frame and a vzeroupper per
// eight groups, 17% of a Q4_K GEMV's samples; inlined, the GEMVs took 0.78-0.92x the time (RESULTS.md).
struct GroupStep {
  __m256 live, sv, zv;
  __m256i mask;
  __attribute__((always_inline)) GroupStep(const Problem& p, int64_t n, int64_t g0, int64_t cnt) {
    live = first_lanes(cnt);
    mask = _mm256_castps_si256(live);
    sv = p.scale.load8(n, g0, cnt, mask);
    zv = p.zero ? p.zero.load8(n, g0, cnt, mask) : _mm256_setzero_ps();
  }
  __attribute__((always_inline)) __m256 apply(const Problem& p, __m256 acc, __m256i D, int64_t m, int64_t g0) const {
    const int64_t groups = p.K / p.G;
    __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(D), _mm256_mul_ps(sv, _mm256_maskload_ps(p.dx + m * groups + g0, mask)),
                               acc);
    if (p.zero) a = _mm256_fmadd_ps(zv, _mm256_maskload_ps(p.xsum + m * groups + g0, mask), a);
    return _mm256_blendv_ps(acc, a, live);  // groups past the end leave their lanes alone
  }
};

// The GEMV streams its weight rows from memory once per call, and with the hardware prefetcher
// alone its loads wait on DRAM: one thread computes at ~19 GB/s of Q4_1 from L2 and a plain sum
// reads ~14 GB/s, yet the GEMV got ~9 GB/s cold, the two times adding up instead of overlapping.
// So it asks for its lines ahead of the loads (prefetch_stream below; the tiled GEMM asks for a
// task's rows with prefetch_rows). Asking 32 rows ahead was 0.69-0.86x the time without on
// SmolLM2's rows of 576; on Qwen2.5 1.5B's rows of 8960 it asked for 140 lines at once, 280 KiB ahead.
// Codes, scales and zeros of weight rows [n0, n0 + rows) on their way to L1.
inline void prefetch_rows(const Problem& p, int64_t n0, int64_t rows) {
  const int64_t code_bytes = row_code_bytes(p.bits, p.K);
  auto lines = [](const void* begin, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) prefetch_line(static_cast<const char*>(begin) + o);
  };
  lines(p.codes + n0 * code_bytes, rows * code_bytes);
  lines(p.scale.row(n0), rows * p.scale.row_bytes());
  if (p.zero) lines(p.zero.row(n0), rows * p.zero.row_bytes());
}

// prefetch_group for a stored tile of tile_bits codes: span g's tile_bits lines of codes into L2, and its
// tables' a line for 2 or 4 spans. Inlined, so that the GEMM's loop passes the width as a constant
// (prefetcht0 of the 8 lines stalled on L1's miss buffers: at one row, 1.2x the time of no prefetch).
__attribute__((always_inline)) inline void prefetch_stored_span(const Problem& p, int64_t n0, int64_t rows, int64_t g,
                                                                int64_t tile_bits) {
  if (rows <= 0) return;
  const int64_t at = (n0 / kWideLanes) * (p.K / 32) + g;
  for (int q = 0; q < tile_bits; ++q) prefetch_line_l2(p.tiles + at * 64 * tile_bits + 64 * q);
  // the span's scales: one group's 16, or two groups' of 16 (16 to 128 bytes), and a factored table's
  // factors (32 bytes for 8 groups)
  const int64_t parts = p.G == 16 ? 2 : 1;  // groups a span (a division here cost a tenth of a step)
  for (const auto& [values, factors, bytes] : {std::tuple{p.tile_scales, p.tile_factors, p.tile_scale_bytes},
                                                std::tuple{p.tile_zeros, p.tile_zero_factors, p.tile_zero_bytes}}) {
    if (!values) continue;
    // the lines this span is the first to reach (all of its own at g = 0): a test, most spans
    const int64_t span_bytes = 16 * bytes * parts, begin = at * span_bytes;
    if (g == 0 || (begin & 63) < span_bytes)
      for (int64_t o = g == 0 ? begin & ~int64_t{63} : begin; o < begin + span_bytes; o += 64) prefetch_line_l2(values + o);
    if (factors) prefetch_line_l2(factors + at * parts / 8 * 32);
  }
}

// The lines of rows [n0, n0 + rows) that group g is the first to reach (codes; at g = 0 the rows'
// tables as well): a tiled GEMM asks for the next task's group while computing its own, so that the
// requests are spread over the work instead of issued in one burst that the cache's miss queue drops
// or stalls on.
inline void prefetch_group(const Problem& p, int64_t n0, int64_t rows, int64_t g) {
  if (p.tiles) {
    prefetch_stored_span(p, n0, rows, g, p.tile_bits);
    return;
  }
  const int64_t code_bytes = row_code_bytes(p.bits, p.K), group_bytes = code_bytes / (p.K / 32);
  const int64_t last = (g + 1) * group_bytes - 1;
  const bool new_line = g == 0 || last / 64 != (g * group_bytes - 1) / 64;
  for (int64_t r = n0; r < n0 + rows; ++r) {
    const uint8_t* row = p.codes + r * code_bytes;
    if (g == 0) prefetch_line(row);
    if (new_line) prefetch_line(row + last);
  }
  if (g != 0) return;
  for (const Table* t : {&p.scale, &p.zero}) {
    if (!*t) continue;
    const uint8_t* begin = t->row(n0);
    for (int64_t o = 0; o < rows * t->row_bytes(); o += 64) prefetch_line(begin + o);
  }
}

// The GEMV's codes stream: rows are contiguous, so the bytes kStreamAhead past the ones a pass of
// eight groups reads are this row's later groups or the next rows' (the last rows of a thread's
// range ask for a few lines of its neighbour's: harmless). One request per line as the loads go,
// where asking for a whole row ahead issued a burst of up to 140 lines that the miss queue cannot
// hold; the tables, a few dozen bytes a row, are asked for a row at a time. Distances of 2, 4 and
// 8 KiB measured alike (RESULTS.md).
constexpr int64_t kStreamAhead = 4096;
// Rows [n, n + rows) of kBits codes: the lines kStreamAhead past the codes of their groups [g0, g0 + cnt).
template <int kBits>
inline void prefetch_stream(const Problem& p, int64_t n, int64_t rows, int64_t g0, int64_t cnt) {
  const int64_t group_bytes = row_code_bytes(kBits, 32), row_bytes = row_code_bytes(kBits, p.K);
  for (int64_t r = n; r < n + rows; ++r) {
    const uint8_t* at = p.codes + r * row_bytes + g0 * group_bytes + kStreamAhead;
    for (int64_t o = 0; o < cnt * group_bytes; o += 64) prefetch_line(at + o);
  }
}
// The tables of the row as far ahead of each of rows [n, n + rows) as kStreamAhead is in codes.
inline void prefetch_tables(const Problem& p, int64_t n, int64_t rows) {
  for (int64_t r = n; r < n + rows; ++r) {
    const int64_t ahead = r + 1 + kStreamAhead / row_code_bytes(p.bits, p.K);
    if (ahead >= p.N) return;
    for (const Table* t : {&p.scale, &p.zero})
      if (*t)
        for (int64_t o = 0; o < t->row_bytes(); o += 64) prefetch_line(t->row(ahead) + o);
  }
}

// GEMV for signed (5- or 8-bit) codes: output row n against MB activation rows from m0; the group's
// codes are loaded once for the MB rows. Lanes of acc[i] are j = g mod 8. (4-bit codes: gemv_q4.)
template <int MB, int kBits>
void gemv_s8(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / 32;
  if (m0 == 0) prefetch_tables(p, n, 1);
  __m256 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, groups - g0);
    if (m0 == 0) prefetch_stream<kBits>(p, n, 1, g0, cnt);
    __m256i dots[MB][8];
    for (int64_t j = 0; j < 8; ++j) {
      if (j >= cnt) {
        for (int i = 0; i < MB; ++i) dots[i][j] = _mm256_setzero_si256();
        continue;
      }
      if constexpr (kBits == 5) {  // unsigned codes: |pair sum| <= 2 * 31 * 127 fits int16
        const __m256i w = codes_q5_unsigned(p.codes + n * row_code_bytes(5, p.K) + (g0 + j) * 20);
        for (int i = 0; i < MB; ++i) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * p.K + (g0 + j) * 32));
          dots[i][j] = dpbusd(_mm256_setzero_si256(), w, x);
        }
        continue;
      }
      const __m256i w = group_codes<kBits>(p, n, g0 + j);
      for (int i = 0; i < MB; ++i) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * p.K + (g0 + j) * 32));
        dots[i][j] = dot_lanes_s8(w, x);
      }
    }
    const GroupStep step(p, n, g0, cnt);
    for (int i = 0; i < MB; ++i) {
      __m256i D = reduce8(dots[i]);
      if constexpr (kBits == 5)  // sum(c x) = sum(q x) - 16 sum(x); lanes past the last group stay 0
        D = _mm256_add_epi32(D, _mm256_maskload_epi32(p.xq_corr + (m0 + i) * groups + g0, step.mask));
      acc[i] = step.apply(p, acc[i], D, m0 + i, g0);
    }
  }
  for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.N + n] = hsum(acc[i]);
}

// Groups of 16 (8-bit codes: Q6_K, Q2_K and the 2-bit codebook types, exactly). x is rounded per 32
// values (a span) as for every weight, and a span's two groups meet in the float step:
//
//   v = fma(float(D[2s + 1]), s[n, 2s + 1], float(D[2s]) * s[n, 2s])
//   acc[j] = fma(z[n, 2s + 1], xsum[m, 2s + 1], fma(z[n, 2s], xsum[m, 2s], fma(v, dx[m, s], acc[j]))),  j = s mod 8
//
// spans in increasing order, then hsum's tree as above. One float step per span, as for groups of 32
// (a step per group of 16 took the tiled GEMM 1.5-1.9x the time of groups of 32, measured).
// Of eight values in a and eight in b (16 groups in order), the even ones and the odd ones in order.
inline void deinterleave16(__m256 a, __m256 b, __m256& even, __m256& odd) {
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

// The canonical step of groups of 16 for eight spans from s0 (the first `cnt` live) of output row n,
// lanes over spans.
struct SpanStep16 {
  __m256 live, s_even, s_odd, z_even, z_odd;
  __m256i mask;
  __attribute__((always_inline)) SpanStep16(const Problem& p, int64_t n, int64_t s0, int64_t cnt) {
    live = first_lanes(cnt);
    mask = _mm256_castps_si256(live);
    const int64_t g0 = 2 * s0, first = std::min<int64_t>(8, 2 * cnt), second = 2 * cnt - first;
    const __m256i m1 = _mm256_castps_si256(first_lanes(first)), m2 = _mm256_castps_si256(first_lanes(second));
    deinterleave16(p.scale.load8(n, g0, first, m1), second ? p.scale.load8(n, g0 + 8, second, m2) : _mm256_setzero_ps(),
                   s_even, s_odd);
    if (p.zero)
      deinterleave16(p.zero.load8(n, g0, first, m1), second ? p.zero.load8(n, g0 + 8, second, m2) : _mm256_setzero_ps(),
                     z_even, z_odd);
  }
  // D_even, D_odd: the integer dot products of the spans' first and second groups.
  __attribute__((always_inline)) __m256 apply(const Problem& p, __m256 acc, __m256i D_even, __m256i D_odd, int64_t m,
                                              int64_t s0, int64_t cnt) const {
    const int64_t spans = p.K / 32;
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(D_odd), s_odd, _mm256_mul_ps(_mm256_cvtepi32_ps(D_even), s_even));
    __m256 a = _mm256_fmadd_ps(v, _mm256_maskload_ps(p.dx + m * spans + s0, mask), acc);
    if (p.zero) {
      const float* xs = p.xsum + m * 2 * spans + 2 * s0;
      const int64_t first = std::min<int64_t>(8, 2 * cnt);
      __m256 xe, xo;
      deinterleave16(_mm256_maskload_ps(xs, _mm256_castps_si256(first_lanes(first))),
                     _mm256_maskload_ps(xs + 8, _mm256_castps_si256(first_lanes(2 * cnt - first))), xe, xo);
      a = _mm256_fmadd_ps(z_odd, xo, _mm256_fmadd_ps(z_even, xe, a));
    }
    return _mm256_blendv_ps(acc, a, live);  // spans past the end leave their lanes alone
  }
};

// GEMV for 8-bit codes in groups of 16: a span's 32 codes in one load, so after the multiply-adds
// lanes 0-3 hold partial sums of its first group and lanes 4-7 of its second.
template <int MB>
void gemv_s8_g16(const Problem& p, int64_t n, int64_t m0) {
  const int64_t spans = p.K / 32;
  const int8_t* c = reinterpret_cast<const int8_t*>(p.codes) + n * p.K;
  if (m0 == 0) prefetch_tables(p, n, 1);
  __m256 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < spans; s0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, spans - s0);
    if (m0 == 0) prefetch_stream<8>(p, n, 1, s0, cnt);
    __m256i dots[MB][8];
    for (int64_t j = 0; j < 8; ++j) {
      if (j >= cnt) {
        for (int i = 0; i < MB; ++i) dots[i][j] = _mm256_setzero_si256();
        continue;
      }
      const __m256i w = codes_s8(c + (s0 + j) * 32);
      for (int i = 0; i < MB; ++i)
        dots[i][j] = dot_lanes_s8(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * p.K + (s0 + j) * 32)));
    }
    const SpanStep16 step(p, n, s0, cnt);
    for (int i = 0; i < MB; ++i) {
      // hadd twice: [first groups of spans 0-3 | their second groups], the same for spans 4-7
      const __m256i* d = dots[i];
      const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
      const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
      acc[i] = step.apply(p, acc[i], _mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31),
                          m0 + i, s0, cnt);
    }
  }
  for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.N + n] = hsum(acc[i]);
}

// 4-bit GEMV: one 32-byte load holds the codes of groups g and g + 1 (64 bytes: g .. g + 3 with
// AVX-512); their low nibbles are codes 0..15 of each group and the high nibbles codes 16..31.
// nibble_rows stores each row of xq in that order, per run of `per` groups: x_g[0..15] of each group
// of the run, then x_g[16..31] of each (zeros for missing last groups), so each half-register
// product needs one plain load. `out` is the caller's per-thread scratch (no allocation per call).
void nibble_rows(const Problem& p, int64_t per, std::vector<int8_t>& out) {
  const int64_t groups = p.K / 32, runs = (groups + per - 1) / per;
  out.assign(p.M * runs * per * 32, 0);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      int8_t* dst = &out[(m * runs + g / per) * per * 32 + (g % per) * 16];
      std::memcpy(dst, p.xq + m * p.K + g * 32, 16);
      std::memcpy(dst + per * 16, p.xq + m * p.K + g * 32 + 16, 16);
    }
}

// NR output rows from n (each its own accumulators, interleaved so that their dependency chains
// overlap) against MB activation rows from m0; each activation load serves the NR rows.
template <int MB, int NR = 1>
void gemv_q4(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / 32, pairs = (groups + 1) / 2;
  if (m0 == 0) prefetch_tables(p, n, NR);
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i group_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 acc[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, groups - g0);
    if (m0 == 0) prefetch_stream<4>(p, n, NR, g0, cnt);
    __m256i dots[NR][MB][4];  // lanes 0-3: partial sums of group g0 + 2h, lanes 4-7: of g0 + 2h + 1
    for (int64_t h = 0; h < 4; ++h) {
      const int64_t g = g0 + 2 * h;
      if (g >= groups) {
        for (int r = 0; r < NR; ++r)
          for (int i = 0; i < MB; ++i) dots[r][i][h] = _mm256_setzero_si256();
        continue;
      }
      __m256i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* c = p.codes + (n + r) * (p.K / 2) + g * 16;
        const __m256i b = g + 1 < groups ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c))
                                         : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
        lo[r] = _mm256_and_si256(b, low4);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      }
      for (int i = 0; i < MB; ++i) {
        const int8_t* xp = p.xq_nibbles + ((m0 + i) * pairs + g / 2) * 64;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
        for (int r = 0; r < NR; ++r) {
          if constexpr (kVnni) {
            dots[r][i][h] = dpbusd(dpbusd(_mm256_setzero_si256(), lo[r], x0), hi[r], x1);
          } else {  // |lo x + hi x| <= 2 * 2 * 15 * 127: fits int16
            dots[r][i][h] = _mm256_madd_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], x0), _mm256_maddubs_epi16(hi[r], x1)), ones);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const GroupStep step(p, n + r, g0, cnt);
      for (int i = 0; i < MB; ++i) {
        // hadd twice leaves the totals as groups [0, 2, 4, 6 | 1, 3, 5, 7]; the permute restores order
        const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(dots[r][i][0], dots[r][i][1]),
                                            _mm256_hadd_epi32(dots[r][i][2], dots[r][i][3]));
        acc[r][i] = step.apply(p, acc[r][i], _mm256_permutevar8x32_epi32(t, group_order), m0 + i, g0);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.N + n + r] = hsum(acc[r][i]);
}

#ifdef FS_AVX512
// gemv_q4 in 512-bit registers: one load holds the codes of four groups, each 128-bit lane one
// group's, so a vpdpbusd covers 128 codes and a group's four partial sums stay in its own lane.
// Integer sums as gemv_q4's, then the same float step: bit-identical rows.

// Lane j of the result = the sum of 128-bit lane j of v0 (j < 4) or of lane j - 4 of v1.
inline __m256i reduce_quads(__m512i v0, __m512i v1) {
  const __m512i w0 = _mm512_add_epi32(v0, _mm512_shuffle_epi32(v0, _MM_PERM_BADC));
  const __m512i w1 = _mm512_add_epi32(v1, _mm512_shuffle_epi32(v1, _MM_PERM_BADC));
  const __m512i both = _mm512_mask_blend_epi32(0xCCCC, w0, w1);  // per lane: [v0 halves, v1 halves]
  const __m512i t = _mm512_add_epi32(both, _mm512_shuffle_epi32(both, _MM_PERM_CDAB));  // [A, A, B, B]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, t));
}

template <int MB, int NR = 1>
void gemv_q4_wide(const Problem& p, int64_t n, int64_t m0) {
  const int64_t groups = p.K / 32, quads = (groups + 3) / 4;
  if (m0 == 0) prefetch_tables(p, n, NR);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m256 acc[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, groups - g0);
    if (m0 == 0) prefetch_stream<4>(p, n, NR, g0, cnt);
    __m512i dots[NR][MB][2];  // 128-bit lane j of [h]: partial sums of group g0 + 4h + j
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t g = g0 + 4 * h;
      if (g >= groups) {
        for (int r = 0; r < NR; ++r)
          for (int i = 0; i < MB; ++i) dots[r][i][h] = _mm512_setzero_si512();
        continue;
      }
      const int64_t left = std::min<int64_t>(4, groups - g);
      const __mmask64 bytes = left == 4 ? ~0ULL : (1ULL << (16 * left)) - 1;
      __m512i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i b = _mm512_maskz_loadu_epi8(bytes, p.codes + (n + r) * (p.K / 2) + g * 16);
        lo[r] = _mm512_and_si512(b, low4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
      }
      for (int i = 0; i < MB; ++i) {
        const int8_t* xp = p.xq_nibbles + ((m0 + i) * quads + g / 4) * 128;
        const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 64);
        for (int r = 0; r < NR; ++r)
          dots[r][i][h] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], x0), hi[r], x1);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const GroupStep step(p, n + r, g0, cnt);
      for (int i = 0; i < MB; ++i)
        acc[r][i] = step.apply(p, acc[r][i], reduce_quads(dots[r][i][0], dots[r][i][1]), m0 + i, g0);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MB; ++i) p.y[(m0 + i) * p.N + n + r] = hsum(acc[r][i]);
}
#endif

// The 4-bit GEMV of the widest registers built for, and how many groups one of its code loads holds.
#ifdef FS_AVX512
constexpr int64_t kNibbleRun = 4;
#else
constexpr int64_t kNibbleRun = 2;
#endif
template <int MB, int NR = 1>
inline void gemv_4bit(const Problem& p, int64_t n, int64_t m0) {
#ifdef FS_AVX512
  gemv_q4_wide<MB, NR>(p, n, m0);
#else
  gemv_q4<MB, NR>(p, n, m0);
#endif
}

inline void transpose8x32(__m256i* r) {  // r[i] lane q -> r[q] lane i (32-bit lanes)
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Activations for the GEMM, per block of 8 rows: xq interleaved so that one 32-byte load holds 4
// consecutive k of each of the 8 rows ([block][k / 32][k % 32 / 4][row][k % 4]), and dx, xsum as
// [block][span][row] and [block][group][row] (groups of G). Rows past M are zeros.
struct Q8Blocks {
  std::vector<int8_t> xq;
  std::vector<float> dx, xsum;
};

void interleave_rows(const Problem& p, Q8Blocks& b) {  // b: the caller's per-thread scratch
  const int64_t spans = p.K / 32, groups = p.K / p.G, blocks = (p.M + 7) / 8;
  b.xq.resize(blocks * p.K * 8);
  b.dx.assign(blocks * spans * 8, 0.f);
  b.xsum.assign(p.xsum ? blocks * groups * 8 : 0, 0.f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t rows = std::min<int64_t>(8, p.M - blk * 8);
    for (int64_t g = 0; g < spans; ++g) {
      // A group of 8 rows is an 8 x 8 matrix of 4-byte units: transposed, unit q of every row
      // lands in vector q.
      __m256i r[8];
      for (int64_t i = 0; i < 8; ++i)
        r[i] = i < rows ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (blk * 8 + i) * p.K + g * 32))
                        : _mm256_setzero_si256();
      transpose8x32(r);
      for (int q = 0; q < 8; ++q)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(&b.xq[((blk * spans + g) * 8 + q) * 32]), r[q]);
      for (int64_t i = 0; i < rows; ++i) b.dx[(blk * spans + g) * 8 + i] = p.dx[(blk * 8 + i) * spans + g];
    }
    if (p.xsum)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < rows; ++i) b.xsum[(blk * groups + g) * 8 + i] = p.xsum[(blk * 8 + i) * groups + g];
  }
}

// The canonical order's last step over eight accumulator vectors, lane by lane.
inline __m256 canonical_sum(const __m256* acc) {
  const __m256 t0 = _mm256_add_ps(acc[0], acc[4]), t1 = _mm256_add_ps(acc[1], acc[5]);
  const __m256 t2 = _mm256_add_ps(acc[2], acc[6]), t3 = _mm256_add_ps(acc[3], acc[7]);
  return _mm256_add_ps(_mm256_add_ps(t0, t2), _mm256_add_ps(t1, t3));
}

// GEMM: NB output rows from n0 against the 8 activation rows of block `blk`. Lanes are rows m. Codes
// are read 32 at a time (a span); 8-bit codes in groups of 16 (kG) take two groups' sums from a span.
template <int NB, int kBits, int kG = 32>
void gemm_q8(const Problem& p, const Q8Blocks& b, int64_t n0, int64_t blk) {
  constexpr bool kSigned = kBits != 4;
  constexpr int kParts = 32 / kG, kUnits = 8 / kParts;  // groups per span, 4-byte units per group
  static_assert(kBits == 8 || kG == 32, "groups of 16 are for 8-bit codes");
  const int64_t spans = p.K / 32, groups = p.K / kG;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t wbytes[NB][32], wabs[NB][32];
  __m256 acc[NB][8];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t sp = 0; sp < spans; ++sp) {
    for (int i = 0; i < NB; ++i) {
      const __m256i w = group_codes<kBits>(p, n0 + i, sp);
      _mm256_store_si256(reinterpret_cast<__m256i*>(wbytes[i]), w);
      if (kSigned) _mm256_store_si256(reinterpret_cast<__m256i*>(wabs[i]), _mm256_sign_epi8(w, w));
    }
    const int8_t* xg = &b.xq[(blk * spans + sp) * 256];
    __m256i isum[NB][kParts];
    for (int i = 0; i < NB; ++i)
      for (int h = 0; h < kParts; ++h) isum[i][h] = _mm256_setzero_si256();
    for (int q = 0; q < 8; ++q) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + q * 32));
      for (int i = 0; i < NB; ++i) {
        __m256i& sum = isum[i][q / kUnits];
        int32_t w4;
        std::memcpy(&w4, &wbytes[i][q * 4], 4);
        const __m256i wq = _mm256_set1_epi32(w4);
        if (kSigned) {  // pair sums reach 2 * 128 * 127: widen to int32 at every step
          int32_t a4;
          std::memcpy(&a4, &wabs[i][q * 4], 4);
          sum = dpbusd(sum, _mm256_set1_epi32(a4), _mm256_sign_epi8(x, wq));
        } else if constexpr (kVnni) {
          sum = dpbusd(sum, wq, x);
        } else {  // 4-bit codes: |pair sum| <= 2 * 15 * 127, eight steps fit in int16
          sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(wq, x));
        }
      }
    }
    const int64_t j = sp % 8;
    const __m256 dxv = _mm256_loadu_ps(&b.dx[(blk * spans + sp) * 8]);
    for (int i = 0; i < NB; ++i) {
      const int64_t n = n0 + i;
      __m256 a;
      if constexpr (kG == 32) {
        const __m256i d32 = kSigned || kVnni ? isum[i][0] : _mm256_madd_epi16(isum[i][0], ones);
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32), _mm256_mul_ps(_mm256_set1_ps(p.scale.at(n, sp)), dxv), acc[i][j]);
        if (p.zero)
          a = _mm256_fmadd_ps(_mm256_set1_ps(p.zero.at(n, sp)), _mm256_loadu_ps(&b.xsum[(blk * groups + sp) * 8]), a);
      } else {
        const int64_t g = 2 * sp;
        const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i][1]), _mm256_set1_ps(p.scale.at(n, g + 1)),
                                         _mm256_mul_ps(_mm256_cvtepi32_ps(isum[i][0]), _mm256_set1_ps(p.scale.at(n, g))));
        a = _mm256_fmadd_ps(v, dxv, acc[i][j]);
        if (p.zero)
          for (int h = 0; h < 2; ++h)
            a = _mm256_fmadd_ps(_mm256_set1_ps(p.zero.at(n, g + h)), _mm256_loadu_ps(&b.xsum[(blk * groups + g + h) * 8]), a);
      }
      acc[i][j] = a;
    }
  }
  const int64_t rows = std::min<int64_t>(8, p.M - blk * 8);
  for (int i = 0; i < NB; ++i) {
    alignas(32) float out[8];
    _mm256_store_ps(out, canonical_sum(acc[i]));
    for (int64_t r = 0; r < rows; ++r) p.y[(blk * 8 + r) * p.N + n0 + i] = out[r];
  }
}

// ---- GEMM with output rows in the lanes ------------------------------------------------------
// The codes of 8 output rows are transposed into "tiles": for each group, 8 vectors whose lane n
// holds 4 consecutive codes (k = 4q .. 4q+3) of row n0 + n. Each activation row then meets a tile
// through broadcasts of 4 of its int8 values (a load, no shuffle), and one u8 x s8 multiply-add
// covers 8 rows x 4 k. The weights stay in GGUF's row layout (the GEMV reads it; a second,
// tiled copy would cost memory), so the transposition is paid per call. The float step is the
// canonical one with lanes over n instead of over groups: acc[m][j] (j = g mod 8) is a vector of
// 8 output rows.

// Codes 32 sp .. 32 sp + 31 (span sp) of output rows [n0, n0 + rows) in the tiled form: w[q] lane n =
// codes 4q .. 4q+3 of the span in row n0 + n (rows past `rows` are zeros), a[q] = |w[q]| for signed
// codes, and the rows' scales and zeros as vectors: of the span's group, or of its two groups of 16
// ([h] for codes 16 h .. 16 h + 15).
struct TileGroup {
  __m256i w[8], a[8];
  __m256 scale[2], zero[2];
};

// Scales and zeros of group g of rows [n0, n0 + rows), one by one (a tile's partial rows).
inline void group_values(const Problem& p, int64_t n0, int64_t rows, int64_t g, float* sc, float* ze) {
  for (int64_t i = 0; i < rows; ++i) {
    sc[i] = p.scale.at(n0 + i, g);
    if (p.zero) ze[i] = p.zero.at(n0 + i, g);
  }
}

// 5-bit codes go in unsigned (q + 16, p.xq_corr's offset): their products need no sign moves, and
// four steps of them fit in int16 (tile_dot), where signed codes widen at every step.
template <int kBits>
inline __m256i tile_codes(const Problem& p, int64_t n, int64_t sp) {
  if constexpr (kBits == 5) return codes_q5_unsigned(p.codes + n * row_code_bytes(5, p.K) + sp * 20);
  return group_codes<kBits>(p, n, sp);
}

template <int kBits, int kG = 32>
inline void load_tile_group(const Problem& p, int64_t n0, int64_t rows, int64_t sp, TileGroup& t) {
  constexpr bool kSigned = kBits == 8;
  for (int64_t i = 0; i < 8; ++i) t.w[i] = i < rows ? tile_codes<kBits>(p, n0 + i, sp) : _mm256_setzero_si256();
  transpose8x32(t.w);
  if (kSigned)
    for (int q = 0; q < 8; ++q) t.a[q] = _mm256_sign_epi8(t.w[q], t.w[q]);
  for (int h = 0; h < 32 / kG; ++h) {
    const int64_t g = sp * (32 / kG) + h;
    alignas(32) float sc[8] = {0.f}, ze[8] = {0.f};
    group_values(p, n0, rows, g, sc, ze);
    t.scale[h] = _mm256_load_ps(sc);
    t.zero[h] = _mm256_load_ps(ze);
  }
}

inline __m256i bcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// The integer dot products of a tile's codes 4 q0 .. 4 q1 - 1 with the activation row's same k (xp at
// the span's first k); signed codes take any range, unsigned ones (of kBits) the whole span.
template <bool kSigned, int kBits = 4>
inline __m256i tile_dot(const __m256i* w, const __m256i* a, const int8_t* xp, int q0 = 0, int q1 = 8) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (kSigned) {  // pair sums reach 2 * 128 * 127: widen to int32 at every step
    __m256i d32 = _mm256_setzero_si256();
    for (int q = q0; q < q1; ++q) d32 = dpbusd(d32, a[q], _mm256_sign_epi8(bcast4(xp + 4 * q), w[q]));
    return d32;
  }
  if constexpr (kVnni) {  // two chains, so that one product does not wait on the last
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int q = 0; q < 8; q += 2) {
      even = dpbusd(even, w[q], bcast4(xp + 4 * q));
      odd = dpbusd(odd, w[q + 1], bcast4(xp + 4 * q + 4));
    }
    return _mm256_add_epi32(even, odd);
  }
  // |pair sum| <= 2 * 15 * 127 for 4-bit codes: eight steps fit in int16; 2 * 31 * 127 for 5-bit ones: four
  static_assert(kBits == 4 || kBits == 5, "unsigned tiles hold 4- or 5-bit codes");
  __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(w[0], bcast4(xp)), _mm256_maddubs_epi16(w[1], bcast4(xp + 4)));
  __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(w[2], bcast4(xp + 8)), _mm256_maddubs_epi16(w[3], bcast4(xp + 12)));
  __m256i s45 = _mm256_add_epi16(_mm256_maddubs_epi16(w[4], bcast4(xp + 16)), _mm256_maddubs_epi16(w[5], bcast4(xp + 20)));
  __m256i s67 = _mm256_add_epi16(_mm256_maddubs_epi16(w[6], bcast4(xp + 24)), _mm256_maddubs_epi16(w[7], bcast4(xp + 28)));
  if constexpr (kBits == 5)
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones),
                            _mm256_madd_epi16(_mm256_add_epi16(s45, s67), ones));
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s01, s23), _mm256_add_epi16(s45, s67)), ones);
}

// Activation rows [m0, m0 + mb) (mb <= kTileRows) against output rows [n0, n0 + rows): a group's
// tile vectors stay in registers while the rows pass them. `built` holds the groups already in
// tiled form (a call with more than kTileRows rows builds them once per task); without it each
// group is built here, for the one pass of a smaller call.
constexpr int64_t kTileRows = 32;
template <int kBits, int kG = 32>
void gemm_tile(const Problem& p, const std::vector<TileGroup>* built, int64_t n0, int64_t rows, int64_t m0, int64_t mb,
               int64_t, int64_t) {
  static_assert(kBits == 8 || kG == 32, "groups of 16 are for 8-bit codes");
  const int64_t spans = p.K / 32, groups = p.K / kG;
  __m256 acc[kTileRows][8];
  for (int64_t i = 0; i < mb; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = _mm256_setzero_ps();
  TileGroup here;
  for (int64_t sp = 0; sp < spans; ++sp) {
    if (!built) load_tile_group<kBits, kG>(p, n0, rows, sp, here);
    const TileGroup& t = built ? (*built)[sp] : here;
    const int64_t j = sp % 8;
    for (int64_t i = 0; i < mb; ++i) {
      const int64_t m = m0 + i;
      const int8_t* xp = p.xq + m * p.K + sp * 32;
      const __m256 dx = _mm256_set1_ps(p.dx[m * spans + sp]);
      __m256 a;
      if constexpr (kG == 32) {
        __m256i dot = tile_dot<kBits == 8, kBits == 8 ? 4 : kBits>(t.w, t.a, xp);
        if constexpr (kBits == 5) dot = _mm256_add_epi32(dot, _mm256_set1_epi32(p.xq_corr[m * groups + sp]));
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(t.scale[0], dx), acc[i][j]);
        if (p.zero) a = _mm256_fmadd_ps(t.zero[0], _mm256_set1_ps(p.xsum[m * groups + sp]), a);
      } else {
        const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tile_dot<true>(t.w, t.a, xp, 4, 8)), t.scale[1],
                                         _mm256_mul_ps(_mm256_cvtepi32_ps(tile_dot<true>(t.w, t.a, xp, 0, 4)), t.scale[0]));
        a = _mm256_fmadd_ps(v, dx, acc[i][j]);
        if (p.zero) {
          a = _mm256_fmadd_ps(t.zero[0], _mm256_set1_ps(p.xsum[m * groups + 2 * sp]), a);
          a = _mm256_fmadd_ps(t.zero[1], _mm256_set1_ps(p.xsum[m * groups + 2 * sp + 1]), a);
        }
      }
      acc[i][j] = a;
    }
  }
  for (int64_t i = 0; i < mb; ++i) {
    const __m256 out = canonical_sum(acc[i]);
    float* yp = p.y + (m0 + i) * p.N + n0;
    if (rows == 8) {
      _mm256_storeu_ps(yp, out);
    } else {
      alignas(32) float o[8];
      _mm256_store_ps(o, out);
      for (int64_t r = 0; r < rows; ++r) yp[r] = o[r];
    }
  }
}

// The lines of y that a pass will write, asked for before it computes: a pass stores one tile's columns
// in each of its rows, rows N floats apart, so each store is a miss of its own once y outgrows the
// caches (a 512-token prompt's gate_up writes 8 MiB), and the misses waited in the store queue until
// they stalled the next pass's first stores. Into L2 only (prefetch_line_l2): a pass's 32 lines at
// once would fill L1's miss buffers.
inline void prefetch_outputs(const Problem& p, int64_t n0, int64_t rows, int64_t m0, int64_t mb) {
  for (int64_t i = 0; i < mb; ++i) {
    const float* first = p.y + (m0 + i) * p.N + n0;
    const float* last = first + rows - 1;
    prefetch_line_l2(first);
    if (reinterpret_cast<uintptr_t>(first) / 64 != reinterpret_cast<uintptr_t>(last) / 64) prefetch_line_l2(last);
  }
}

// The tiled GEMM over all of y, for either tile width: parallel over tasks of kLanes output rows (a
// tile's lanes); a task with several passes of kPassRows activation rows builds its tile once (A/B at
// M = 128: 9-16% faster), and asks for the next task's rows while this one computes (A/B at M = 32,
// cycled weights: gate_up 0.88, down 0.98, head 0.97 of the time without): in one burst at the
// task's start for 8-lane tiles, spread over the groups (prefetch_group) for 16-lane ones, which
// waited on their loads with the burst; spread was slower for the 8-lane tiles (RESULTS.md, issue 24).
template <typename Group, int64_t kLanes, int64_t kPassRows, bool kSpread, typename Load, typename Pass>
void over_tiles(const Problem& p, Load load, Pass pass) {
  const int64_t groups = p.K / 32;
  at::parallel_for(0, (p.N + kLanes - 1) / kLanes, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<Group> tile;  // this worker's own
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kLanes, rows = std::min<int64_t>(kLanes, p.N - n0);
      const int64_t next_rows = task + 1 < end ? std::min<int64_t>(kLanes, p.N - n0 - kLanes) : 0;
      const std::vector<Group>* built = nullptr;
      if (p.M > kPassRows) {
        tile.resize(groups);
        for (int64_t g = 0; g < groups; ++g) {
          if (kSpread) prefetch_group(p, n0 + kLanes, next_rows, g);
          load(p, n0, rows, g, tile[g]);
        }
        built = &tile;
      }
      if (!kSpread && next_rows) prefetch_rows(p, n0 + kLanes, next_rows);
      for (int64_t m0 = 0; m0 < p.M; m0 += kPassRows) {
        const int64_t mb = std::min(kPassRows, p.M - m0);
        prefetch_outputs(p, n0, rows, m0, mb);
        pass(p, built, n0, rows, m0, mb, n0 + kLanes, built ? 0 : next_rows);
      }
    }
  });
}

template <int kBits, int kG = 32>
void gemm_tiled(const Problem& p) {
  over_tiles<TileGroup, 8, kTileRows, false>(p, load_tile_group<kBits, kG>, gemm_tile<kBits, kG>);
}

#ifdef FS_AVX512
// ---- AVX-512: the tiled GEMM with 16 output rows in the lanes ---------------------------------
// gemm_tiled in 512-bit vectors: a tile holds 16 output rows, so each broadcast of four activation
// bytes and each float step serve twice the rows. Every code goes in unsigned (vpdpbusd multiplies
// u8 by s8, and AVX-512 has no byte sign instruction to move a signed code's sign onto x): 4-bit
// codes are 0..15 already, 5-bit ones are read as c + 16 and 8-bit ones as q + 128 (the sign bit
// flipped), and the group's integer dot product is corrected exactly by offset * sum(xq). One
// multiply-add per four k of 16 rows, where the signed 256-bit path takes a sign move as well. Each
// lane runs the canonical float step, so rows are bit-identical to every other kernel's.
constexpr int64_t kWideTileRows = 32;  // activation rows per pass over a tile

template <int kBits>
inline __m256i unsigned_codes(const Problem& p, int64_t n, int64_t g) {
  if constexpr (kBits == 4) return codes_u4(p.codes + n * (p.K / 2) + g * 16);
  if constexpr (kBits == 5) return codes_q5_unsigned(p.codes + n * row_code_bytes(5, p.K) + g * 20);
  return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.codes + n * p.K + g * 32)),
                          _mm256_set1_epi8(static_cast<char>(0x80)));
}

// Span sp (codes 32 sp .. 32 sp + 31) of output rows [n0, n0 + rows): w[q] lane n = unsigned codes
// 4q .. 4q+3 of the span in row n0 + n (rows past `rows` are zeros, as are their scales and zeros);
// the scales and zeros of the span's group, or of its two groups of 16 ([h]: codes 16 h ..).
struct WideTileGroup {
  __m512i w[8];
  __m512 scale[2], zero[2];
};

// Full tiles (16 rows) of 4- and 8-bit codes are transposed in 512-bit registers: the rows' group
// bytes are loaded four (4-bit) or two (8-bit) to a vector, then moved into place by two-source
// dword permutes, a third of the instructions of transposing 256-bit halves row by row.
inline __m512i load_rows128(const uint8_t* b, int64_t stride) {  // 16 bytes of 4 rows, one per lane
  __m512i t = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  t = _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + stride)), 1);
  t = _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 * stride)), 2);
  return _mm512_inserti32x4(t, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 3 * stride)), 3);
}

// 4-bit: v[r] dword 4i + d = dword d of row 4r + i's group (codes 4d..4d+3 in its low nibbles,
// 16+4d.. in its high ones). Out: w[d] and w[d + 4], lane n = those nibbles of row n.
inline void wide_codes_u4(const Problem& p, int64_t n0, int64_t g, __m512i* w) {
  const int64_t stride = p.K / 2;
  const uint8_t* c = p.codes + n0 * stride + g * 16;
  __m512i v[4];
  for (int r = 0; r < 4; ++r) v[r] = load_rows128(c + 4 * r * stride, stride);
  // lane j of a pair's output: dword d0 + j / 8 of row j % 8 (rows 0-3 in the first source, 4-7 in the second)
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(2));
  const __m512i d01_lo = _mm512_permutex2var_epi32(v[0], first, v[1]), d23_lo = _mm512_permutex2var_epi32(v[0], second, v[1]);
  const __m512i d01_hi = _mm512_permutex2var_epi32(v[2], first, v[3]), d23_hi = _mm512_permutex2var_epi32(v[2], second, v[3]);
  const __m512i words[4] = {_mm512_shuffle_i64x2(d01_lo, d01_hi, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i64x2(d01_lo, d01_hi, _MM_SHUFFLE(3, 2, 3, 2)),
                            _mm512_shuffle_i64x2(d23_lo, d23_hi, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i64x2(d23_lo, d23_hi, _MM_SHUFFLE(3, 2, 3, 2))};
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int d = 0; d < 4; ++d) {
    w[d] = _mm512_and_si512(words[d], low4);
    w[d + 4] = _mm512_and_si512(_mm512_srli_epi32(words[d], 4), low4);
  }
}

// 8-bit: v[r] dword 8i + d = dword d of row 2r + i's group; three rounds of permutes gather dword d
// of every row into w[d], the sign bit flipped (unsigned codes q + 128).
inline void wide_codes_u8(const Problem& p, int64_t n0, int64_t g, __m512i* w) {
  const int64_t stride = p.K;
  const uint8_t* c = p.codes + n0 * stride + g * 32;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i v[8];
  for (int r = 0; r < 8; ++r) {
    const uint8_t* b = c + 2 * r * stride;
    const __m512i t = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    v[r] = _mm512_xor_si512(_mm512_inserti64x4(t, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + stride)), 1), flip);
  }
  // round 1, four rows: x[a][h] lane j = dword 4h + j / 4 of row 4a + j % 4
  // round 2, eight rows: y[b][k] lane j = dword 2k + j / 8 of row 8b + j % 8
  // round 3: w[d] lanes 0-7 from y[0], 8-15 from y[1]
  __m512i x[4][2], y[2][4];
  // Permute indices (0-15 the first source, 16-31 the second), constants rather than built per call:
  // idx1[h] lane j = dword 4h + j / 4 of row j % 4 (rows 0-1 in the first source, 8 dwords a row);
  // idx2[k'] lane j = lane 4 (2k' + j / 8) + j % 4 of x (rows 0-3 in the first source, 4-7 the second).
  const __m512i idx1[2] = {_mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27),
                           _mm512_setr_epi32(4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31)};
  const __m512i idx2[2] = {_mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                           _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)};
  for (int a = 0; a < 4; ++a)
    for (int h = 0; h < 2; ++h) x[a][h] = _mm512_permutex2var_epi32(v[2 * a], idx1[h], v[2 * a + 1]);
  for (int b = 0; b < 2; ++b)
    for (int k = 0; k < 4; ++k) y[b][k] = _mm512_permutex2var_epi32(x[2 * b][k / 2], idx2[k % 2], x[2 * b + 1][k / 2]);
  for (int d = 0; d < 8; ++d)
    w[d] = d % 2 == 0 ? _mm512_shuffle_i64x2(y[0][d / 2], y[1][d / 2], _MM_SHUFFLE(1, 0, 1, 0))
                      : _mm512_shuffle_i64x2(y[0][d / 2], y[1][d / 2], _MM_SHUFFLE(3, 2, 3, 2));
}

// A span of a 6-bit tile (GroupQuantWeight.to_wide_tiles), 384 bytes: four vectors of nibbles, vector j
// holding the low 4 bits of w[j]'s bytes in its low nibbles and those of w[j + 4] in its high ones,
// then two vectors of 2-bit fields, bits 2r..2r+1 of vector j holding the top 2 bits of w[j + 2r].
// Out: w[0..7] with each byte u = c + 32 in 0..63, as unsigned as the 8-bit tiles' c + 128. The
// 16-bit shifts below only move bits into places the byte masks then clear.
inline void unpack_six_bit_span(const uint8_t* b, __m512i* w) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
  const __m512i fields[2] = {_mm512_loadu_si512(b + 256), _mm512_loadu_si512(b + 320)};
  // field r of a vector moved to bits 4-5 of each byte: shifted left 4 - 2r
  const __m512i at45[2][4] = {
      {_mm512_slli_epi16(fields[0], 4), _mm512_slli_epi16(fields[0], 2), fields[0], _mm512_srli_epi16(fields[0], 2)},
      {_mm512_slli_epi16(fields[1], 4), _mm512_slli_epi16(fields[1], 2), fields[1], _mm512_srli_epi16(fields[1], 2)}};
  for (int j = 0; j < 4; ++j) {
    const __m512i nib = _mm512_loadu_si512(b + 64 * j);
    // (a & low4) | b, b already masked: ternary-logic table 0xEC over (a, b, low4)
    w[j] = _mm512_ternarylogic_epi32(nib, _mm512_and_si512(at45[j % 2][j / 2], top2), low4, 0xEC);
    w[j + 4] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(nib, 4), _mm512_and_si512(at45[j % 2][j / 2 + 2], top2), low4, 0xEC);
  }
}

// A span of a 4-bit tile, 256 bytes: the four vectors of nibbles, vector j holding w[j]'s bytes in its low
// nibbles and w[j + 4]'s in its high ones. Out: w[0..7], bytes u = c in 0..15 (unsigned already).
inline void unpack_four_bit_span(const uint8_t* b, __m512i* w) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i nib = _mm512_loadu_si512(b + 64 * j);
    w[j] = _mm512_and_si512(nib, low4);
    w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(nib, 4), low4);
  }
}

// A span of a 5-bit tile, 320 bytes: the four vectors of nibbles as above, then one of bits, bit q of
// each byte holding bit 4 of w[q]'s byte. Out: w[0..7] with each byte u = c + 16 in 0..31, the offset
// the 5-bit codes take in every unsigned kernel (code_offset).
inline void unpack_five_bit_span(const uint8_t* b, __m512i* w) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
  const __m512i bits = _mm512_loadu_si512(b + 256);
  // bit q of each byte moved to bit 4: shifted left 4 - q (16-bit shifts; the mask keeps bit 4 only)
  const __m512i at4[8] = {_mm512_slli_epi16(bits, 4), _mm512_slli_epi16(bits, 3), _mm512_slli_epi16(bits, 2),
                          _mm512_slli_epi16(bits, 1), bits, _mm512_srli_epi16(bits, 1), _mm512_srli_epi16(bits, 2),
                          _mm512_srli_epi16(bits, 3)};
  for (int j = 0; j < 4; ++j) {
    const __m512i nib = _mm512_loadu_si512(b + 64 * j);
    w[j] = _mm512_ternarylogic_epi32(nib, _mm512_and_si512(at4[j], bit4), low4, 0xEC);
    w[j + 4] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(nib, 4), _mm512_and_si512(at4[j + 4], bit4), low4, 0xEC);
  }
}

// A span of a 2-bit tile, 128 bytes: two vectors of 2-bit fields, bits 2r..2r+1 of vector j holding
// w[j + 2r]'s byte. Out: w[0..7] with each byte u = c in 0..3 (no offset: unsigned already).
inline void unpack_two_bit_span(const uint8_t* b, __m512i* w) {
  const __m512i low2 = _mm512_set1_epi8(0x03);
  const __m512i fields[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};
  for (int q = 0; q < 8; ++q) w[q] = _mm512_and_si512(_mm512_srli_epi16(fields[q % 2], 2 * (q / 2)), low2);
}

// A span of a 3-bit tile, 192 bytes: the two vectors of 2-bit fields of a 2-bit tile (w[q]'s low 2 bits),
// then one of bits, bit q of each byte holding bit 2 of w[q]'s byte. Out: w[0..7] with each byte u = c + 4
// in 0..7 (Q3_K's codes, tile_code_offset). The 16-bit shifts only move bits into places the masks clear.
inline void unpack_three_bit_span(const uint8_t* b, __m512i* w) {
  const __m512i low2 = _mm512_set1_epi8(0x03), bit2 = _mm512_set1_epi8(0x04);
  const __m512i fields[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};
  const __m512i bits = _mm512_loadu_si512(b + 128);
  // bit q of each byte moved to bit 2: shifted left 2 - q, or right q - 2
  const __m512i at2[8] = {_mm512_slli_epi16(bits, 2), _mm512_slli_epi16(bits, 1), bits, _mm512_srli_epi16(bits, 1),
                          _mm512_srli_epi16(bits, 2), _mm512_srli_epi16(bits, 3), _mm512_srli_epi16(bits, 4),
                          _mm512_srli_epi16(bits, 5)};
  for (int q = 0; q < 8; ++q) {
    const __m512i field = q < 2 ? fields[q % 2] : _mm512_srli_epi16(fields[q % 2], 2 * (q / 2));
    // (field & low2) | (at2 & bit2): ternary logic over (field, at2 masked, low2), table 0xEC
    w[q] = _mm512_ternarylogic_epi32(field, _mm512_and_si512(at2[q], bit2), low2, 0xEC);
  }
}

// ---- codebook tiles: the i-quants at their own bits ---------------------------------------------------
// Block layouts are ggml-common.h's block_iq*; values as dequantize_row_iq* (ggml-quants.c), which gguf-py
// follows. Each value is a sub-block scale times a signed entry of the type's grid ("codebook"); an entry
// names 8 values (IQ2_*, IQ1_*) or 4 (IQ3_*).
//
// A span of 32 values of 16 rows holds each row's bytes of the file's block that belong to those values,
// lane-major (lane r = 4 bytes of row r, in 64-byte planes); the fields of a block that are not per span
// (high index bits, scales) sit beside, per block and lane (tile_side: (T, K/256, S, 16), byte j of the
// block's S in lane r), and so does the float16 d (tile_d: (T, K/256, 16)). Per span:
//   IQ2_XXS  planes: 4 index bytes | u32 of four 7-bit sign indices and ls       w = d/4 (ls + 1/2) ±g
//   IQ3_XXS  planes: 8 index bytes | that u32                                     w = d/2 (ls + 1/2) ±g
//   IQ2_XS   planes: 4 x u16 (9-bit index, 7-bit sign index); side: ls byte     w = d/4 (ls + 1/2) ±g, per 16
//   IQ2_S    planes: 4 grid words* | 4 sign bytes; side: qh (2 bits an index), ls byte         as IQ2_XS
//   IQ3_S    planes: 8 index bytes | 4 sign bytes; side: qh (1 bit an index), ls nibble      w = d (2 ls + 1) ±g
//   IQ1_S    planes: 4 grid words*; side: u16 (4 x 3 high index bits, 3-bit ls, the delta's sign)
//            w = d/8 (2 ls + 1) (8 g ± 1)
//   IQ1_M    planes: 4 grid words*; side: 2 qh bytes (per entry 3 high bits and its delta's sign), the
//            block's 4 u16 of 3-bit ls per 16 (d itself, spread over their top nibbles, in tile_d)   per 16
// The 7-bit sign indices name a sign byte: the 7 bits and their parity on top (an even number of minus
// signs). The unpack gives w[0..7] as the 8-bit tiles hold them, unsigned codes u = 128 + c for the exact
// 8-bit form's code c (gguf_codebook_forms.py: ±g, or 8 g ± 1 for IQ1), so the rest of the GEMM is theirs
// and so are the numbers, bit for bit.
//
// The grid is looked up as 16-bit words of indices into the type's few values (8 values of 3 levels: 2 bits
// each, nibble j holding values j and j + 4; 4 values of 8 levels: a nibble each), two entries a dword.
// Up to 512 entries by two-source word permutes of 64 entries and blends on the higher index bits (AVX512BW).
// * Larger grids (IQ2_S's 1024 entries, IQ1_*'s 2048) are looked up when the tiles are stored: the planes
// hold each entry's grid word in place of its index's low byte (the high bits stay in the side bytes, not
// read), 2 bits a weight for the entry where the index takes 1.25-1.375: IQ1_S 2.19 bits a weight (file
// 1.56), IQ1_M 2.375 (1.75), IQ2_S 3.31 (2.56). Looked up as the kernel went, by 32-bit gathers, IQ1_S took
// 1.8x the time a span, and a Qwen2.5-1.5B IQ1_M mix decoded slower than llama.cpp (RESULTS.md).
// Then the nibbles to bytes, each byte's sign put in its bit
// 3, and one byte shuffle of the table of the values' codes (`codes`: byte i the code of value i, byte 8 + i
// that of its negative, or for IQ1 of the delta's negative sign). Inlined into the GEMM's loop (left to
// itself the compiler called the unpack, its tables and output in memory).
enum CodebookKind { kNoCodebook = 0, kIQ2XXS, kIQ3XXS, kIQ2XS, kIQ2S, kIQ3S, kIQ1S, kIQ1M };

struct CodebookSpec {
  const char* name;
  // grid entries (0: the tiles hold each entry's grid word, looked up when stored), 64-byte planes a span,
  // side bytes a block, values a scale
  int entries, planes, side, group;
};

constexpr CodebookSpec kCodebooks[] = {
    {"", 0, 0, 0, 0},           {"IQ2_XXS", 256, 2, 0, 32},  {"IQ3_XXS", 256, 3, 0, 32}, {"IQ2_XS", 512, 2, 8, 16},
    {"IQ2_S", 0, 3, 16, 16},    {"IQ3_S", 512, 3, 12, 32},   {"IQ1_S", 0, 2, 16, 32},    {"IQ1_M", 0, 2, 24, 16},
};

constexpr int codebook_group(int kind) { return kCodebooks[kind].group; }

// Per dword lane, the grid words of two indices (in its two words): entry of the low word in the low word, of
// the high one in the high word. Bits above the grid's index width must be clear.
template <int kEntries>
__attribute__((always_inline)) inline __m512i grid_word_pairs(const int16_t* grid, __m512i index) {
  if constexpr (kEntries == 0) {  // the words themselves
    return index;
  } else {
    __m512i level[kEntries / 64];
    for (int c = 0; c < kEntries / 64; ++c)
      level[c] = _mm512_permutex2var_epi16(_mm512_loadu_si512(grid + 64 * c), index, _mm512_loadu_si512(grid + 64 * c + 32));
    int bit = 6;
    for (int n = kEntries / 64; n > 1; n /= 2, ++bit) {
      const __mmask32 high = _mm512_test_epi16_mask(index, _mm512_set1_epi16(static_cast<int16_t>(1 << bit)));
      for (int i = 0; i < n / 2; ++i) level[i] = _mm512_mask_blend_epi16(high, level[2 * i], level[2 * i + 1]);
    }
    return level[0];
  }
}

// Bytes a and a + 1 of each dword as its two words (a byte shuffle, zeros above): two entries' index bytes.
__attribute__((always_inline)) inline __m512i index_pair(__m512i index, int a) {
  const __m128i lane = _mm_setr_epi8(static_cast<char>(a), -1, static_cast<char>(a + 1), -1, static_cast<char>(a + 4), -1,
                                     static_cast<char>(a + 5), -1, static_cast<char>(a + 8), -1, static_cast<char>(a + 9), -1,
                                     static_cast<char>(a + 12), -1, static_cast<char>(a + 13), -1);
  return _mm512_shuffle_epi8(index, _mm512_broadcast_i32x4(lane));
}

// index_pair's words with high index bits: bits [shift, shift + width) of `high` above the low word's byte,
// and bits [shift + step, shift + step + width) above the high word's.
template <int kWidth>
__attribute__((always_inline)) inline __m512i with_high_bits(__m512i pair, __m512i high, int shift, int step) {
  constexpr int32_t mask = (1 << kWidth) - 1;
  const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(high, shift), _mm512_set1_epi32(mask));
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(high, shift + step), _mm512_set1_epi32(mask));
  return _mm512_or_si512(pair, _mm512_or_si512(_mm512_slli_epi32(lo, 8), _mm512_slli_epi32(hi, 24)));
}

// Bytes of 7-bit sign indices (bit 7 ignored) with their parity in bit 7: the sign bytes they name.
// a | (b ^ c) is ternary-logic table 0xF6. Parity per nibble by a byte shuffle.
__attribute__((always_inline)) inline __m512i with_parity(__m512i fields) {
  fields = _mm512_and_si512(fields, _mm512_set1_epi8(0x7F));
  const __m512i parity_of = _mm512_broadcast_i32x4(  // parity(i) << 7 for nibbles i = 0..15
      _mm_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_shuffle_epi8(parity_of, _mm512_and_si512(fields, low4));
  const __m512i hi = _mm512_shuffle_epi8(parity_of, _mm512_and_si512(_mm512_srli_epi16(fields, 4), low4));
  return _mm512_ternarylogic_epi32(fields, lo, hi, 0xF6);
}

// The u32's four 7-bit sign indices (bits 0, 7, 14, 21) as its four sign bytes: those of values 0-7, 8-15,
// 16-23, 24-31. Bitwise select c ? b : a is ternary-logic table 0xD8.
__attribute__((always_inline)) inline __m512i u32_sign_bytes(__m512i aux) {
  const __m512i f01 = _mm512_ternarylogic_epi32(aux, _mm512_slli_epi32(aux, 1), _mm512_set1_epi32(0x0000FF00), 0xD8);
  const __m512i f23 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(aux, 2), _mm512_slli_epi32(aux, 3),
                                                _mm512_set1_epi32(static_cast<int32_t>(0xFF000000)), 0xD8);
  return with_parity(_mm512_mask_blend_epi16(0xAAAAAAAA, f01, f23));
}

// Sign byte j of each dword in all four of its bytes (so that byte i can test bit i, or i + 4, of it).
__attribute__((always_inline)) inline __m512i sign_byte(__m512i signs, int j) {
  const __m128i lane = _mm_setr_epi8(static_cast<char>(j), static_cast<char>(j), static_cast<char>(j), static_cast<char>(j),
                                     static_cast<char>(j + 4), static_cast<char>(j + 4), static_cast<char>(j + 4),
                                     static_cast<char>(j + 4), static_cast<char>(j + 8), static_cast<char>(j + 8),
                                     static_cast<char>(j + 8), static_cast<char>(j + 8), static_cast<char>(j + 12),
                                     static_cast<char>(j + 12), static_cast<char>(j + 12), static_cast<char>(j + 12));
  return _mm512_shuffle_epi8(signs, _mm512_broadcast_i32x4(lane));
}

// Indices into the values (bytes, bits 3 and 7 clear; bits 4-6 are not read) as unsigned codes: the table's
// byte, or its byte 8 on where the sign bit of `bits` (per byte, 0x01..0x08 or 0x10..0x80 of each dword) of
// `signs` is set: the sign as the index's bit 3, one byte shuffle.
__attribute__((always_inline)) inline __m512i signed_codes(__m512i codes, __m512i index, __m512i signs, int32_t bits) {
  const __mmask64 minus = _mm512_test_epi8_mask(signs, _mm512_set1_epi32(bits));
  return _mm512_shuffle_epi8(codes, _mm512_mask_add_epi8(index, minus, index, _mm512_set1_epi8(8)));
}

// The nibbles of each dword's word `h` (0: the low one, 1: the high one) as its four bytes' low nibbles: the
// word's bytes b0, b1 doubled (b0 b0 b1 b1), the odd ones shifted down by 4; the even bytes keep their
// other nibble above (bits 4-7: the byte shuffle does not read 4-6, and bit 7 is clear for 3-bit indices;
// 2-bit ones are masked).
__attribute__((always_inline)) inline __m512i word_nibbles(__m512i pair, int h) {
  const char a = static_cast<char>(2 * h), b = static_cast<char>(2 * h + 1);
  const __m128i lane = _mm_setr_epi8(a, a, b, b, a + 4, a + 4, b + 4, b + 4, a + 8, a + 8, b + 8, b + 8, a + 12, a + 12,
                                     b + 12, b + 12);
  const __m512i doubled = _mm512_shuffle_epi8(pair, _mm512_broadcast_i32x4(lane));
  return _mm512_mask_blend_epi8(0xAAAAAAAAAAAAAAAAull, doubled, _mm512_srli_epi16(doubled, 4));
}

constexpr int32_t kLowSigns = 0x08040201, kHighSigns = static_cast<int32_t>(0x80402010);  // bits of bytes 0-3, 4-7

// w[0..7] from entries of 8 values: pairs[k] the index words of entries 2k, 2k + 1; entry e's sign byte is
// byte sign_at[e] of `signs`.
template <int kEntries>
__attribute__((always_inline)) inline void eight_value_entries(const int16_t* grid, __m512i codes, const __m512i* pairs,
                                                               __m512i signs, const int* sign_at, __m512i* w) {
  const __m512i fields = _mm512_set1_epi8(0x33);  // a nibble's low 2 bits, in either nibble
  for (int k = 0; k < 2; ++k) {
    const __m512i pair = grid_word_pairs<kEntries>(grid, pairs[k]);
    for (int h = 0; h < 2; ++h) {  // entry e: values 8e .. 8e + 7, nibble j = fields j and j + 4
      const int e = 2 * k + h;
      const __m512i nibbles = word_nibbles(pair, h), sign = sign_byte(signs, sign_at[e]);
      w[2 * e] = signed_codes(codes, _mm512_and_si512(nibbles, fields), sign, kLowSigns);
      w[2 * e + 1] = signed_codes(codes, _mm512_and_si512(_mm512_srli_epi16(nibbles, 2), fields), sign, kHighSigns);
    }
  }
}

// w[0..7] from entries of 4 values: pairs[k] the index words of entries 2k, 2k + 1 (values 8k .. 8k + 7),
// whose sign byte is byte k of `signs`.
template <int kEntries>
__attribute__((always_inline)) inline void four_value_entries(const int16_t* grid, __m512i codes, const __m512i* pairs,
                                                              __m512i signs, __m512i* w) {
  for (int k = 0; k < 4; ++k) {
    const __m512i pair = grid_word_pairs<kEntries>(grid, pairs[k]);
    const __m512i sign = sign_byte(signs, k);
    w[2 * k] = signed_codes(codes, word_nibbles(pair, 0), sign, kLowSigns);
    w[2 * k + 1] = signed_codes(codes, word_nibbles(pair, 1), sign, kHighSigns);
  }
}

// Side byte j of the block of span sp, one per lane, as dwords.
__attribute__((always_inline)) inline __m512i side_bytes(const Problem& p, int64_t tile, int64_t sp, int side, int j) {
  const uint8_t* b = p.tile_side + ((tile * (p.K / 256) + sp / 8) * side + j) * 16;
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
}

// (c d) (2 ls + 1) per lane: d (ls + 1/2) 2c rounded once, as gguf-py's d (ls + 1/2), rounded, times a power
// of two (exact) is, and as its d (2 ls + 1) [c] is.
__attribute__((always_inline)) inline __m512 odd_scale(__m512 dc, __m512i ls) {
  const __m512i odd = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(ls, _mm512_set1_epi32(15)), 1),
                                      _mm512_set1_epi32(1));
  return _mm512_mul_ps(dc, _mm512_cvtepi32_ps(odd));
}

// Span sp of a codebook tile: w[0..7] and the span's scales (scale[0], and scale[1] for groups of 16).
template <int kKind>
__attribute__((always_inline)) inline void unpack_codebook_span(const Problem& p, int64_t tile, int64_t sp, const uint8_t* b,
                                                                __m512i* w, __m512* scale) {
  constexpr CodebookSpec spec = kCodebooks[kKind];
  const int16_t* grid = p.tile_grid;
  const __m512i codes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.tile_grid_codes)));
  const __m256i d16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.tile_d + (tile * (p.K / 256) + sp / 8) * 16));
  const __m512 d = _mm512_cvtph_ps(d16);
  const int s = static_cast<int>(sp % 8);
  constexpr int kInOrder[4] = {0, 1, 2, 3};
  if constexpr (kKind == kIQ2XXS) {
    const __m512i index = _mm512_loadu_si512(b), aux = _mm512_loadu_si512(b + 64);
    const __m512i pairs[2] = {index_pair(index, 0), index_pair(index, 2)};
    eight_value_entries<spec.entries>(grid, codes, pairs, u32_sign_bytes(aux), kInOrder, w);
    scale[0] = odd_scale(_mm512_mul_ps(d, _mm512_set1_ps(0.125f)), _mm512_srli_epi32(aux, 28));
  } else if constexpr (kKind == kIQ3XXS) {
    const __m512i index[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};
    const __m512i aux = _mm512_loadu_si512(b + 128);
    const __m512i pairs[4] = {index_pair(index[0], 0), index_pair(index[0], 2), index_pair(index[1], 0),
                              index_pair(index[1], 2)};
    four_value_entries<spec.entries>(grid, codes, pairs, u32_sign_bytes(aux), w);
    scale[0] = odd_scale(_mm512_mul_ps(d, _mm512_set1_ps(0.25f)), _mm512_srli_epi32(aux, 28));
  } else if constexpr (kKind == kIQ2XS) {
    const __m512i words[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};  // entries 0, 1 | 2, 3
    const __m512i index_bits = _mm512_set1_epi16(0x01FF);
    const __m512i pairs[2] = {_mm512_and_si512(words[0], index_bits), _mm512_and_si512(words[1], index_bits)};
    // the sign indices (each word's top 7 bits) as bytes: entries 0, 2, 1, 3
    const __m512i fields = _mm512_or_si512(_mm512_srli_epi16(words[0], 9), _mm512_slli_epi16(_mm512_srli_epi16(words[1], 9), 8));
    constexpr int kSignAt[4] = {0, 2, 1, 3};
    eight_value_entries<spec.entries>(grid, codes, pairs, with_parity(fields), kSignAt, w);
    const __m512 dc = _mm512_mul_ps(d, _mm512_set1_ps(0.125f));
    const __m512i ls = side_bytes(p, tile, sp, spec.side, s);
    scale[0] = odd_scale(dc, _mm512_and_si512(ls, _mm512_set1_epi32(15)));
    scale[1] = odd_scale(dc, _mm512_srli_epi32(ls, 4));
  } else if constexpr (kKind == kIQ2S) {
    const __m512i pairs[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};  // grid words of entries 0, 1 | 2, 3
    eight_value_entries<spec.entries>(grid, codes, pairs, _mm512_loadu_si512(b + 128), kInOrder, w);
    const __m512 dc = _mm512_mul_ps(d, _mm512_set1_ps(0.125f));
    const __m512i ls = side_bytes(p, tile, sp, spec.side, 8 + s);
    scale[0] = odd_scale(dc, _mm512_and_si512(ls, _mm512_set1_epi32(15)));
    scale[1] = odd_scale(dc, _mm512_srli_epi32(ls, 4));
  } else if constexpr (kKind == kIQ3S) {
    const __m512i index[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};
    const __m512i signs = _mm512_loadu_si512(b + 128);
    const __m512i qh = side_bytes(p, tile, sp, spec.side, s);
    __m512i pairs[4];
    for (int k = 0; k < 4; ++k) pairs[k] = with_high_bits<1>(index_pair(index[k / 2], 2 * (k % 2)), qh, 2 * k, 1);
    four_value_entries<spec.entries>(grid, codes, pairs, signs, w);
    const __m512i ls = side_bytes(p, tile, sp, spec.side, 8 + s / 2);
    scale[0] = odd_scale(d, s % 2 ? _mm512_srli_epi32(ls, 4) : _mm512_and_si512(ls, _mm512_set1_epi32(15)));
  } else if constexpr (kKind == kIQ1S) {
    const __m512i pairs[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};  // grid words
    const __m512i qh = _mm512_or_si512(side_bytes(p, tile, sp, spec.side, 2 * s),
                                       _mm512_slli_epi32(side_bytes(p, tile, sp, spec.side, 2 * s + 1), 8));
    const __m512i delta_negative = _mm512_srai_epi32(_mm512_slli_epi32(qh, 16), 31);  // bit 15, in every bit
    eight_value_entries<spec.entries>(grid, codes, pairs, delta_negative, kInOrder, w);
    scale[0] = odd_scale(_mm512_mul_ps(d, _mm512_set1_ps(0.125f)), _mm512_and_si512(_mm512_srli_epi32(qh, 12), _mm512_set1_epi32(7)));
  } else if constexpr (kKind == kIQ1M) {
    const __m512i pairs[2] = {_mm512_loadu_si512(b), _mm512_loadu_si512(b + 64)};  // grid words
    const __m512i qh = _mm512_or_si512(side_bytes(p, tile, sp, spec.side, 2 * s),
                                       _mm512_slli_epi32(side_bytes(p, tile, sp, spec.side, 2 * s + 1), 8));
    // entry e's delta sign is bit 4 e + 3 of qh: as byte e all ones or zeros
    const __m512i doubled = _mm512_shuffle_epi8(qh, _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13)));
    const __m512i signs = _mm512_movm_epi8(_mm512_test_epi8_mask(doubled, _mm512_set1_epi32(static_cast<int32_t>(0x80088008))));
    eight_value_entries<spec.entries>(grid, codes, pairs, signs, kInOrder, w);
    const int u = 16 + 2 * (s / 2);  // the u16 of ls for this span's two groups of 16: fields 2 (s % 2), + 1
    const __m512i ls = _mm512_srli_epi32(_mm512_or_si512(side_bytes(p, tile, sp, spec.side, u),
                                                         _mm512_slli_epi32(side_bytes(p, tile, sp, spec.side, u + 1), 8)),
                                         6 * (s % 2));
    const __m512 dc = _mm512_mul_ps(d, _mm512_set1_ps(0.125f));
    scale[0] = odd_scale(dc, _mm512_and_si512(ls, _mm512_set1_epi32(7)));
    scale[1] = odd_scale(dc, _mm512_and_si512(_mm512_srli_epi32(ls, 3), _mm512_set1_epi32(7)));
  }
}

// The 16 lanes' value of group `at` of a stored table (scales or zeros): float32, float16, or integers
// (uint8, or int8 when `signed_ints`) times their float16 factor, as Table::factored16 (and
// table_values) compute them.
__attribute__((always_inline)) inline __m512 stored_column(const uint8_t* values, const uint8_t* factors,
                                                           int64_t bytes, bool signed_ints, int64_t at) {
  const uint8_t* v = values + at * 16 * bytes;
  if (bytes == 4) return _mm512_loadu_ps(v);
  if (bytes == 2) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  const __m256i f = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(factors + at / 8 * 32));
  const __m128i ints = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(signed_ints ? _mm512_cvtepi8_epi32(ints) : _mm512_cvtepu8_epi32(ints)),
                       _mm512_cvtph_ps(f));
}

// Span sp of a stored tile (group_quant_matmul_tiles) of kTileBits codes: plain loads (8-bit) or an unpack,
// and the span's scales and zeros. Inlined into the GEMM's loop, with the width a template argument: as a
// call, or with the width a branch inside it, the compiler kept the WideTileGroup in memory, and the
// single row's step stored and reloaded its eight vectors every span.
template <int kTileBits, int kG, bool kLevels = false, int kCodebook = 0>
__attribute__((always_inline)) inline void load_stored_tile_group(const Problem& p, int64_t n0, int64_t sp,
                                                                    WideTileGroup& t) {
  constexpr int kParts = 32 / kG;
  const int64_t spans = p.K / 32, groups = p.K / kG;
  const int64_t tile = n0 / kWideLanes;
  const uint8_t* span = p.tiles + (tile * spans + sp) * 64 * kTileBits;
  if constexpr (kCodebook != kNoCodebook) {  // scales from the blocks' own fields; no zeros
    if constexpr (codebook_group(kCodebook) == kG) unpack_codebook_span<kCodebook>(p, tile, sp, span, t.w, t.scale);
    t.zero[0] = t.zero[1] = _mm512_setzero_ps();
    return;
  } else if constexpr (kTileBits == 6) {
    unpack_six_bit_span(span, t.w);
  } else if constexpr (kTileBits == 5) {
    unpack_five_bit_span(span, t.w);
  } else if constexpr (kTileBits == 4) {
    unpack_four_bit_span(span, t.w);
    if constexpr (kLevels) {  // each index's unsigned code: a byte shuffle of the 16 levels in every 128-bit lane
      const __m512i levels = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.tile_levels)));
      for (int q = 0; q < 8; ++q) t.w[q] = _mm512_shuffle_epi8(levels, t.w[q]);
    }
  } else if constexpr (kTileBits == 3) {
    unpack_three_bit_span(span, t.w);
  } else if constexpr (kTileBits == 2) {
    unpack_two_bit_span(span, t.w);
  } else {
    for (int q = 0; q < 8; ++q) t.w[q] = _mm512_loadu_si512(span + 64 * q);
  }
  for (int h = 0; h < kParts; ++h) {
    const int64_t at = tile * groups + sp * kParts + h;
    t.scale[h] = stored_column(p.tile_scales, p.tile_factors, p.tile_scale_bytes, p.tile_signed_ints, at);
    t.zero[h] = p.tile_zeros ? stored_column(p.tile_zeros, p.tile_zero_factors, p.tile_zero_bytes, false, at)
                             : _mm512_setzero_ps();
  }
}

// A stored tile's form as template arguments: its width, and whether its codes are indices into levels.
template <int kBits, bool kLevels = false, int kCodebook = 0>
struct TileForm {
  static constexpr int value = kBits;
  static constexpr bool levels = kLevels;
  static constexpr int codebook = kCodebook;
};

// f(TileForm<bits, levels, codebook>) for the stored tiles' width p.tile_bits (and p.tile_levels), or their
// codebook p.tile_codebook (then tile_bits counts its 64-byte planes): the one place a form becomes template
// arguments.
template <typename F>
__attribute__((always_inline)) inline void with_tile_bits(const Problem& p, F&& f) {
  switch (p.tile_codebook) {
    case kIQ2XXS: f(TileForm<kCodebooks[kIQ2XXS].planes, false, kIQ2XXS>{}); return;
    case kIQ3XXS: f(TileForm<kCodebooks[kIQ3XXS].planes, false, kIQ3XXS>{}); return;
    case kIQ2XS: f(TileForm<kCodebooks[kIQ2XS].planes, false, kIQ2XS>{}); return;
    case kIQ2S: f(TileForm<kCodebooks[kIQ2S].planes, false, kIQ2S>{}); return;
    case kIQ3S: f(TileForm<kCodebooks[kIQ3S].planes, false, kIQ3S>{}); return;
    case kIQ1S: f(TileForm<kCodebooks[kIQ1S].planes, false, kIQ1S>{}); return;
    case kIQ1M: f(TileForm<kCodebooks[kIQ1M].planes, false, kIQ1M>{}); return;
    default: break;
  }
  switch (p.tile_bits) {
    case 2: f(TileForm<2>{}); break;
    case 3: f(TileForm<3>{}); break;
    case 4: p.tile_levels ? f(TileForm<4, true>{}) : f(TileForm<4>{}); break;
    case 5: f(TileForm<5>{}); break;
    case 6: f(TileForm<6>{}); break;
    default: f(TileForm<8>{}); break;
  }
}

template <int kBits, int kG = 32>
inline void load_wide_tile_group(const Problem& p, int64_t n0, int64_t rows, int64_t sp, WideTileGroup& t) {
  constexpr int kParts = 32 / kG;
  const int64_t groups = p.K / kG;
  if (kBits == 8 && p.tiles) {  // stored in this order already (group_quant_matmul_tiles)
    with_tile_bits(p, [&](auto form) {
      load_stored_tile_group<decltype(form)::value, kG, decltype(form)::levels, decltype(form)::codebook>(p, n0, sp, t);
    });
    return;
  }
  if (rows == 16 && kBits != 5 && groups >= 2) {
    if constexpr (kBits == 4) wide_codes_u4(p, n0, sp, t.w);
    if constexpr (kBits == 8) wide_codes_u8(p, n0, sp, t.w);
    for (const auto& [table, out] : {std::pair{&p.scale, t.scale}, std::pair{&p.zero, t.zero}}) {
      if (!*table) {
        out[0] = out[1] = _mm512_setzero_ps();
      } else if (kParts == 2 && table->kind == Table::kFactored) {
        table->factored16_pair(n0, 0xFFFF, 2 * sp, out[0], out[1]);
      } else {
        for (int h = 0; h < kParts; ++h) out[h] = table->column16(n0, 0xFFFF, sp * kParts + h);
      }
    }
    return;
  }
  __m256i lo[8], hi[8];
  for (int64_t i = 0; i < 8; ++i) {
    lo[i] = i < rows ? unsigned_codes<kBits>(p, n0 + i, sp) : _mm256_setzero_si256();
    hi[i] = i + 8 < rows ? unsigned_codes<kBits>(p, n0 + 8 + i, sp) : _mm256_setzero_si256();
  }
  transpose8x32(lo);
  transpose8x32(hi);
  for (int q = 0; q < 8; ++q) t.w[q] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[q]), hi[q], 1);
  for (int h = 0; h < kParts; ++h) {
    const int64_t g = sp * kParts + h;
    if (p.scale.kind == Table::kFactored && (!p.zero || p.zero.kind == Table::kFactored)) {
      const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
      t.scale[h] = p.scale.factored16(n0, live, g);
      t.zero[h] = p.zero ? p.zero.factored16(n0, live, g) : _mm512_setzero_ps();
      continue;
    }
    alignas(64) float sc[16] = {0.f}, ze[16] = {0.f};
    group_values(p, n0, rows, g, sc, ze);
    t.scale[h] = _mm512_load_ps(sc);
    t.zero[h] = _mm512_load_ps(ze);
  }
}

// acc + the products of w's unsigned bytes with the four signed bytes at x, broadcast to every lane: the
// broadcast is the multiply-add's own memory operand ({1to16}), where the compiler emitted a separate
// vpbroadcastd for each.
__attribute__((always_inline)) inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const int32_t* x) {
  __asm__("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*x));
  return acc;
}

// v + the int32 at x in every lane, the broadcast the addition's own memory operand ({1to16}): integer
// sums, so the same numbers in any order.
__attribute__((always_inline)) inline __m512i add_broadcast(__m512i v, const int32_t* x) {
  __asm__("vpaddd %[x]%{1to16%}, %[v], %[v]" : [v] "+v"(v) : [x] "m"(*x));
  return v;
}

#ifdef FS_AMX
// ---- AMX: a span's integer dot products on the tile unit ----------------------------------------
// TDPBSUD (AMX-INT8) adds to a tile C of up to 16 rows of 16 int32 the products of a tile A of signed
// bytes (rows of xq, k along the row) and a tile B of unsigned bytes whose row r holds, in dword n,
// bytes 4r .. 4r+3 of column n: a span's w[r] as the wide tiles hold it. One instruction does the
// dpbusd steps of 16 activation rows; the float step after it is the 16-lane kernel's own, so the
// results are those of the dpbusd path bit for bit (integer sums are exact in any order).
// Tiles: 0-3 C (row half r and group part h: 2 r + h), 4-5 A, 6-7 B (group part h).
constexpr int64_t kAmxMinRows = 4;  // activation rows of a pass from which the tiles take over

template <int kG>
inline void amx_configure() {
  struct alignas(64) Config {  // palette 1's layout: 16 bytes of header, then bytes per row and rows per tile
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int c = 0; c < 4; ++c) cfg.colsb[c] = 64, cfg.rows[c] = 16;
  for (int a = 4; a < 6; ++a) cfg.colsb[a] = kG, cfg.rows[a] = 16;
  for (int b = 6; b < 8; ++b) cfg.colsb[b] = 64, cfg.rows[b] = kG / 4;
  _tile_loadconfig(&cfg);
}

// dots[h][i]: the integer dot products of span sp's group part h (the span itself for kG = 32) with
// activation row m0 + i, i < mb <= 32, in 16 lanes; w: the span's 8 rows of 64 bytes. A tile reads 16
// rows of xq from m0, past M when mb < 16 (set_int8_activations pads xq to whole tiles).
template <int kG>
__attribute__((always_inline)) inline void amx_span_dots(const Problem& p, const void* w, int64_t m0, int64_t mb,
                                                         int64_t sp, int32_t (*dots)[kWideTileRows][16]) {
  const int8_t* x = p.xq + m0 * p.K + sp * 32;
  const int64_t stride = p.K;
  _tile_loadd(6, w, 64);
  _tile_zero(0);
  if constexpr (kG == 32) {
    _tile_loadd(4, x, stride);
    _tile_dpbsud(0, 4, 6);
    if (mb > 16) {  // the second row half in tiles of its own, so that it need not wait on the first
      _tile_zero(2);
      _tile_loadd(5, x + 16 * stride, stride);
      _tile_dpbsud(2, 5, 6);
    }
    _tile_stored(0, dots[0][0], 64);
    if (mb > 16) _tile_stored(2, dots[0][16], 64);
  } else {
    _tile_loadd(7, static_cast<const uint8_t*>(w) + 4 * 64, 64);
    _tile_zero(1);
    _tile_loadd(4, x, stride);
    _tile_loadd(5, x + 16, stride);
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 5, 7);
    if (mb > 16) {
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(4, x + 16 * stride, stride);
      _tile_loadd(5, x + 16 * stride + 16, stride);
      _tile_dpbsud(2, 4, 6);
      _tile_dpbsud(3, 5, 7);
    }
    _tile_stored(0, dots[0][0], 64);
    _tile_stored(1, dots[1][0], 64);
    if (mb > 16) {
      _tile_stored(2, dots[0][16], 64);
      _tile_stored(3, dots[1][16], 64);
    }
  }
}

// One TDPBSUD on pseudo-random bytes against the same sums done one product at a time.
bool amx_self_test() {
  alignas(64) int8_t a[16][64];
  alignas(64) uint8_t b[16][64];
  alignas(64) int32_t c[16][16];
  uint32_t state = 2463534242u;
  const auto next = [&] { state ^= state << 13, state ^= state >> 17, state ^= state << 5; return state >> 24; };
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 64; ++k) a[r][k] = static_cast<int8_t>(next()), b[r][k] = static_cast<uint8_t>(next());
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64};
    uint8_t rows[16] = {16, 16, 16};
  } cfg;
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_loadd(1, a, 64);
  _tile_loadd(2, b, 64);
  _tile_dpbsud(0, 1, 2);
  _tile_stored(0, c, 64);
  _tile_release();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      int32_t sum = 0;
      for (int k = 0; k < 64; ++k) sum += a[m][k] * b[k / 4][4 * n + k % 4];
      if (sum != c[m][n]) return false;
    }
  return true;
}

// Linux hands out the tile state (8 KiB a thread) only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), once for the whole process, Linux 5.16 on. Until then a tile instruction
// faults; where the request or the self-test fails, the dpbusd path stays in use.
bool amx_usable() {
  static const bool usable = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 && amx_self_test();
  }();
  return usable;
}
#endif  // FS_AMX

template <int kBits, int kG = 32>
void gemm_wide_tile(const Problem& p, const std::vector<WideTileGroup>* built, int64_t n0, int64_t rows, int64_t m0,
                    int64_t mb, int64_t next_n0, int64_t next_rows) {
  static_assert(kBits == 8 || kG == 32, "groups of 16 are for 8-bit codes");
  const int64_t spans = p.K / 32, groups = p.K / kG;
  const bool zeros = p.zero || p.tile_zeros;
  __m512 acc[kWideTileRows][8];
  for (int64_t i = 0; i < mb; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = _mm512_setzero_ps();
#ifdef FS_AMX
  const bool amx = mb >= kAmxMinRows && amx_usable();
  alignas(64) int32_t dots[32 / kG][kWideTileRows][16];
  if (amx) amx_configure<kG>();  // each pass: other code on this thread (oneDNN) may have configured its own
#endif
  // One span's products for rows [m0, m0 + mb), inlined in each of the loops below: a reference that
  // could be either a built group or a fresh one kept the fresh one in memory, not in registers.
  const auto span_step = [&](const WideTileGroup& t, int64_t sp) __attribute__((always_inline)) {
    const int64_t j = sp % 8;
#ifdef FS_AMX
    if (amx) amx_span_dots<kG>(p, t.w, m0, mb, sp, dots);
#endif
    for (int64_t i = 0; i < mb; ++i) {
      const int64_t m = m0 + i;
      const int32_t* x4 = reinterpret_cast<const int32_t*>(p.xq + m * p.K + sp * 32);
      if constexpr (kG == 32) {
        // Two chains, so that one product does not wait on the last (one chain: 1.04-1.10x the time);
        // the code offset's correction is added to their sum with its broadcast folded into the add
        // (starting a chain at a broadcast vector cost a vpbroadcastd a row and span).
        __m512i d32;
#ifdef FS_AMX
        if (amx) {
          d32 = _mm512_load_si512(dots[0][i]);
        } else
#endif
        {
          __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
          for (int q = 0; q < 8; q += 2) {
            even = dpbusd_broadcast(even, t.w[q], x4 + q);
            odd = dpbusd_broadcast(odd, t.w[q + 1], x4 + q + 1);
          }
          d32 = _mm512_add_epi32(even, odd);
        }
        if (p.xq_corr) d32 = add_broadcast(d32, p.xq_corr + m * spans + sp);
        __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d32), _mm512_mul_ps(t.scale[0], _mm512_set1_ps(p.dx[m * spans + sp])),
                                   acc[i][j]);
        if (zeros) a = _mm512_fmadd_ps(t.zero[0], _mm512_set1_ps(p.xsum[m * spans + sp]), a);
        acc[i][j] = a;
      } else {
        // The span's two groups of 16, two chains each (one chain a group: 1.5x the time at 32 rows, the
        // products waiting on each other), then the group's own correction, as above (its vpbroadcastd,
        // two a row and span here, made the groups of 16 1.3x the groups of 32 at 512 rows)
        __m512i d[2];
        for (int h = 0; h < 2; ++h) {
          const int q = 4 * h;
#ifdef FS_AMX
          if (amx) {
            d[h] = _mm512_load_si512(dots[h][i]);
            if (p.xq_corr) d[h] = add_broadcast(d[h], p.xq_corr + m * groups + 2 * sp + h);
            continue;
          }
#endif
          __m512i odd = dpbusd_broadcast(_mm512_setzero_si512(), t.w[q + 1], x4 + q + 1);
          d[h] = dpbusd_broadcast(_mm512_setzero_si512(), t.w[q], x4 + q);
          odd = dpbusd_broadcast(odd, t.w[q + 3], x4 + q + 3);
          d[h] = _mm512_add_epi32(dpbusd_broadcast(d[h], t.w[q + 2], x4 + q + 2), odd);
          if (p.xq_corr) d[h] = add_broadcast(d[h], p.xq_corr + m * groups + 2 * sp + h);
        }
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[1]), t.scale[1], _mm512_mul_ps(_mm512_cvtepi32_ps(d[0]), t.scale[0]));
        __m512 a = _mm512_fmadd_ps(v, _mm512_set1_ps(p.dx[m * spans + sp]), acc[i][j]);
        if (zeros) {
          a = _mm512_fmadd_ps(t.zero[0], _mm512_set1_ps(p.xsum[m * groups + 2 * sp]), a);
          a = _mm512_fmadd_ps(t.zero[1], _mm512_set1_ps(p.xsum[m * groups + 2 * sp + 1]), a);
        }
        acc[i][j] = a;
      }
    }
  };
  if (built) {
    for (int64_t sp = 0; sp < spans; ++sp) span_step((*built)[sp], sp);
  } else if (kBits == 8 && p.tiles) {
    with_tile_bits(p, [&](auto form) {
      for (int64_t sp = 0; sp < spans; ++sp) {
        prefetch_stored_span(p, next_n0, next_rows, sp, decltype(form)::value);
        WideTileGroup here;
        load_stored_tile_group<decltype(form)::value, kG, decltype(form)::levels, decltype(form)::codebook>(p, n0, sp, here);
        span_step(here, sp);
      }
    });
  } else {
    for (int64_t sp = 0; sp < spans; ++sp) {
      prefetch_group(p, next_n0, next_rows, sp);
      WideTileGroup here;
      load_wide_tile_group<kBits, kG>(p, n0, rows, sp, here);
      span_step(here, sp);
    }
  }
#ifdef FS_AMX
  if (amx) _tile_release();
#endif
  const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1);
  for (int64_t i = 0; i < mb; ++i) {
    const __m512* v = acc[i];  // canonical_sum's tree
    const __m512 out = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v[0], v[4]), _mm512_add_ps(v[2], v[6])),
                                     _mm512_add_ps(_mm512_add_ps(v[1], v[5]), _mm512_add_ps(v[3], v[7])));
    _mm512_mask_storeu_ps(p.y + (m0 + i) * p.N + n0, live, out);
  }
}

// The wide tiled GEMM over all of y. Needs p.xq_corr for 5- and 8-bit codes (code_offset's correction).
template <int kBits, int kG = 32>
void gemm_wide_tiled(const Problem& p) {
  over_tiles<WideTileGroup, 16, kWideTileRows, true>(p, load_wide_tile_group<kBits, kG>, gemm_wide_tile<kBits, kG>);
}
#endif  // FS_AVX512
#endif

// Code k of weight row n, in any layout above (the portable paths read codes one at a time).
inline int code_at(const uint8_t* codes, int64_t bits, int64_t K, int64_t n, int64_t k) {
  const int64_t j = k % 32;
  if (bits == 8) return reinterpret_cast<const int8_t*>(codes)[n * K + k];
  const uint8_t* group = codes + n * row_code_bytes(bits, K) + (k / 32) * (bits == 4 ? 16 : 20);
  const int q = j < 16 ? (group[j] & 0x0F) : (group[j - 16] >> 4);
  if (bits == 4) return q;
  return (q | (((group[16 + j / 8] >> (j % 8)) & 1) << 4)) - 16;
}

// Portable version of the same arithmetic (codes times scale, dotted with x, plus z * xsum).
void row_scalar(const Problem& p, int64_t n, int64_t m) {
  const int64_t groups = p.K / p.G;
  const float* xr = p.x + m * p.K;
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    float d = 0.f;
    for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) {
      const int q = code_at(p.codes, p.bits, p.K, n, k);
      d += static_cast<float>(q) * p.scale.at(n, g) * xr[k];
    }
    total += d;
    if (p.zero) total += p.zero.at(n, g) * p.xsum[m * groups + g];
  }
  p.y[m * p.N + n] = total;
}

// Portable version of the int8-activation arithmetic, in the canonical order described above.
void row_scalar_q8(const Problem& p, int64_t n, int64_t m) {
  const int64_t spans = p.K / 32, groups = p.K / p.G;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t sp = 0; sp < spans; ++sp) {
    int32_t d[2] = {0, 0};  // per group of the span
    for (int64_t k = sp * 32; k < sp * 32 + 32; ++k) d[k % 32 / p.G] += code_at(p.codes, p.bits, p.K, n, k) * p.xq[m * p.K + k];
    const float dx = p.dx[m * spans + sp];
    float a;
    if (p.G == 32) {
      a = std::fma(static_cast<float>(d[0]), p.scale.at(n, sp) * dx, acc[sp % 8]);
      if (p.zero) a = std::fma(p.zero.at(n, sp), p.xsum[m * groups + sp], a);
    } else {
      const int64_t g = 2 * sp;
      const float v = std::fma(static_cast<float>(d[1]), p.scale.at(n, g + 1), static_cast<float>(d[0]) * p.scale.at(n, g));
      a = std::fma(v, dx, acc[sp % 8]);
      if (p.zero) {
        a = std::fma(p.zero.at(n, g), p.xsum[m * groups + g], a);
        a = std::fma(p.zero.at(n, g + 1), p.xsum[m * groups + g + 1], a);
      }
    }
    acc[sp % 8] = a;
  }
  p.y[m * p.N + n] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

template <int MB>
void rows(const Problem& p, int64_t n, int64_t m0) {
#ifdef FS_AVX2
  if (p.xq)
    return p.bits == 4 ? gemv_4bit<MB>(p, n, m0)
           : p.bits == 5 ? gemv_s8<MB, 5>(p, n, m0)
           : p.G == 16   ? gemv_s8_g16<MB>(p, n, m0)
                         : gemv_s8<MB, 8>(p, n, m0);
  if (p.bits == 4) return row_int4<MB>(p, n, m0);
  if (p.bits == 5) return row_int5<MB>(p, n, m0);
  return row_int8<MB>(p, n, m0);
#else
  for (int i = 0; i < MB; ++i) p.xq ? row_scalar_q8(p, n, m0 + i) : row_scalar(p, n, m0 + i);
#endif
}

// Float activations: the zero term's float sums of x per group of `group` values (16 or 32).
void group_sums(const float* x, int64_t M, int64_t K, int64_t group, float* xsum) {
  at::parallel_for(0, M * (K / group), 256, [&](int64_t begin, int64_t end) {
    for (int64_t mg = begin; mg < end; ++mg) {
      const float* xp = x + mg * group;  // rows are contiguous, so group mg of the flat array
      float sum = 0.f;
      for (int64_t k = 0; k < group; ++k) sum += xp[k];
      xsum[mg] = sum;
    }
  });
}

// Int8 activations, per group of 32 values of x: the rounding dx = max|x| / 127, xq =
// round-half-even(x / dx) in [-127, 127], and per `sum_group` values (32, or 16 beside 8-bit weights
// in groups of 16) the sums of the rounded values: for the zero term, dx * sum(xq) (xsum), and for
// codes read with an offset, -offset * sum(xq) (xq_corr). Either may be null.
void prepare_activations(const float* x, int64_t M, int64_t K, int64_t sum_group, float* xsum, int8_t* xq, float* dx,
                         int32_t* xq_corr, int32_t offset) {
  const int64_t spans = K / 32, parts = 32 / sum_group;
  at::parallel_for(0, M * spans, 256, [&](int64_t begin, int64_t end) {
    for (int64_t ms = begin; ms < end; ++ms) {
      const float* xp = x + ms * 32;  // rows are contiguous, so span ms of the flat array
      int32_t qsum[2] = {0, 0};       // per sum group
#ifdef FS_AVX2
      // The same arithmetic as the scalar loop below, eight lanes at a time (round_ps to nearest
      // even is nearbyint's rounding; the scalar nearbyint is a libm call per value).
      __m256 v[4], vmax = _mm256_setzero_ps();
      const __m256 sign = _mm256_set1_ps(-0.f);
      for (int q = 0; q < 4; ++q) {
        v[q] = _mm256_loadu_ps(xp + 8 * q);
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[q]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      dx[ms] = amax / 127.f;
      __m256i qi[4];
      for (int q = 0; q < 4; ++q)
        qi[q] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[q], _mm256_set1_ps(inv)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // packs work per 128-bit lane: the permute puts the 32 bytes back in k order
      const __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + ms * 32), b);
      // lanes 0-3: the first 16 values' sums in pairs of vectors, 4-7: the last 16's
      const __m256i lo = _mm256_add_epi32(qi[0], qi[1]), hi = _mm256_add_epi32(qi[2], qi[3]);
      __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(lo, hi), _mm256_setzero_si256());
      s = _mm256_add_epi32(s, _mm256_permute2x128_si256(s, s, 0x01));  // [first, last, 0, 0, ...] twice
      qsum[0] = _mm256_extract_epi32(s, 0);
      qsum[1] = _mm256_extract_epi32(s, 1);
#else
      float amax = 0.f;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(xp[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      dx[ms] = amax / 127.f;
      for (int k = 0; k < 32; ++k) {
        xq[ms * 32 + k] = static_cast<int8_t>(std::nearbyint(xp[k] * inv));
        qsum[k / 16] += xq[ms * 32 + k];
      }
#endif
      if (parts == 1) qsum[0] += qsum[1];
      for (int64_t h = 0; h < parts; ++h) {
        if (xsum) xsum[ms * parts + h] = static_cast<float>(qsum[h]) * dx[ms];
        if (xq_corr) xq_corr[ms * parts + h] = -offset * qsum[h];
      }
    }
  });
}

// x's preparation for a call, in the calling thread's scratch (a decode step makes a few hundred
// calls, and allocating these each time was a measurable part of the small ones): x rounded to int8
// per 32 values with the sums per group of p.G that the zero term (xsum) and, for codes read with
// `offset` added (0: none), the correction (xq_corr) take.
void set_int8_activations(Problem& p, bool with_xsum, int32_t offset) {
  thread_local std::vector<float> xsum, dx;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<int32_t> xq_corr;
  const int64_t groups = p.M * (p.K / p.G);
  xq.resize((p.M + 15) / 16 * 16 * p.K);  // whole AMX tiles of 16 rows (amx_span_dots reads them)
  dx.resize(p.M * (p.K / 32));
  if (with_xsum) xsum.resize(groups);
  if (offset) xq_corr.resize(groups);
  prepare_activations(p.x, p.M, p.K, p.G, with_xsum ? xsum.data() : nullptr, xq.data(), dx.data(),
                      offset ? xq_corr.data() : nullptr, offset);
  p.xq = xq.data();
  p.dx = dx.data();
  p.xsum = with_xsum ? xsum.data() : nullptr;
  p.xq_corr = offset ? xq_corr.data() : nullptr;
}

// Float activations: the zero term's float sums of x per group, in the calling thread's scratch.
const float* float_group_sums(const Problem& p) {
  thread_local std::vector<float> xsum;
  xsum.resize(p.M * (p.K / p.G));
  group_sums(p.x, p.M, p.K, p.G, xsum.data());
  return xsum.data();
}

// A scale or zero tensor as a Table of (N, K/G) values: float32 or float16 (N, K/G), or factored,
// uint8 (N, K/G + K/(4G)) in the layout described at Table.
Table table_of(const at::Tensor& t, int64_t N, int64_t groups, const char* what) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kByte, "quantized matmul: ", what,
              " must be float32, float16 or factored (uint8), got ", type);
  const bool factored = type == at::kByte;
  TORCH_CHECK(!factored || groups % 8 == 0, "quantized matmul: a factored ", what, " needs K/G divisible by 8, got ",
              groups);
  const int64_t width = factored ? groups + groups / 4 : groups;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == width && t.is_contiguous(), "quantized matmul: ", what,
              " must be contiguous (", N, ", ", width, ") for K/G = ", groups, ", got ", t.sizes());
  return Table{static_cast<const uint8_t*>(t.data_ptr()),
               factored ? Table::kFactored : type == at::kHalf ? Table::kHalf : Table::kFloat, groups};
}

Table optional_table(const c10::optional<at::Tensor>& t, int64_t N, int64_t groups, const char* what) {
  return t.has_value() && t->defined() ? table_of(*t, N, groups, what) : Table{};
}

}  // namespace

at::Tensor group_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group,
                              bool int8_activations) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "group_quant_matmul: x must be (M, K) float32");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "group_quant_matmul: bits must be 4, 5 or 8");
  TORCH_CHECK(bits == 8 ? group % 16 == 0 : group == 32, "group_quant_matmul: unsupported group size ", group);
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = codes.size(0);
  TORCH_CHECK(K % group == 0 && codes.size(1) == row_code_bytes(bits, K), "group_quant_matmul: codes ",
              codes.sizes(), " do not match K = ", K);
  TORCH_CHECK(codes.is_contiguous(), "group_quant_matmul: codes must be contiguous");
  const Table scales = table_of(scale, N, K / group, "scale"), zeros = optional_table(zero, N, K / group, "zero");
  const bool has_zero = static_cast<bool>(zeros);
  auto y = at::empty({M, N}, xc.options());
  // The zero term needs per-group sums of x (of the rounded x with int8 activations, rounded per group).
  TORCH_CHECK(!int8_activations || group == 32 || (bits == 8 && group == 16 && K % 32 == 0),
              "group_quant_matmul: int8 activations need groups of 32, or 8-bit codes in groups of 16 with K % 32 == 0; "
              "got ", bits, "-bit codes in groups of ", group, ", K = ", K);
  const bool g16 = int8_activations && group == 16;
  Problem p{xc.data_ptr<float>(), nullptr, codes.data_ptr<uint8_t>(), scales, zeros, y.data_ptr<float>(), M, N, K,
            group, bits};
  if (int8_activations)  // xq_corr: for unsigned 5-bit codes (GEMV), the wide tiles' 5- and 8-bit
    set_int8_activations(p, has_zero, code_offset(bits));
  else if (has_zero)
    p.xsum = float_group_sums(p);
#ifdef FS_AVX2
  if (int8_activations && M >= gemm_min_rows(bits, K)) {
    if (M >= tile_min_rows(bits, K)) {
#ifdef FS_AVX512
      bits == 4 ? gemm_wide_tiled<4>(p) : bits == 5 ? gemm_wide_tiled<5>(p) : g16 ? gemm_wide_tiled<8, 16>(p) : gemm_wide_tiled<8>(p);
#else
      bits == 4 ? gemm_tiled<4>(p) : bits == 5 ? gemm_tiled<5>(p) : g16 ? gemm_tiled<8, 16>(p) : gemm_tiled<8>(p);
#endif
      return y;
    }
    // The calling thread's scratch, bound by reference: the workers of the parallel region must
    // see this thread's instance, not their own (a thread_local named inside the lambda would be).
    thread_local Q8Blocks scratch;
    const Q8Blocks& blocks = scratch;
    interleave_rows(p, scratch);
    at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
      const int64_t n_end = std::min(end * kRowsPerTask, N);
      // The task's weight rows stay in L1 while every block of activation rows passes them.
      for (int64_t blk = 0; blk < (M + 7) / 8; ++blk) {
        int64_t n = begin * kRowsPerTask;
        // Weight rows per call, measured (A/B builds alternated, M = 32, cycled weights): 4-bit
        // codes 2 rows (2-8% faster than 4, whose 32 float accumulators spill); 8-bit signed codes
        // one row (the LM head: 26.5 ms with 4 rows, 22.8 with 2, 19.6 with 1).
        if (bits == 4)
          for (; n + 2 <= n_end; n += 2) gemm_q8<2, 4>(p, blocks, n, blk);
        for (; n < n_end; ++n) {
          if (bits == 4) gemm_q8<1, 4>(p, blocks, n, blk);
          else if (bits == 5) gemm_q8<1, 5>(p, blocks, n, blk);
          else if (g16) gemm_q8<1, 8, 16>(p, blocks, n, blk);
          else gemm_q8<1, 8>(p, blocks, n, blk);
        }
      }
    });
    return y;
  }
  thread_local std::vector<int8_t> xq_nibbles;
  if (int8_activations && bits == 4) {
    nibble_rows(p, kNibbleRun, xq_nibbles);
    p.xq_nibbles = xq_nibbles.data();
  }
#endif
  at::parallel_for(0, (N + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_end = std::min(end * kRowsPerTask, N);
    // Activation rows in blocks of kMaxMB, each block against the task's rows while their
    // codes are in L1; the block of x is reused by every row of the task.
    const int64_t block = int8_activations ? kMaxMBInt8 : kMaxMB;
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t mb = std::min<int64_t>(block, M - m0);
      int64_t n = begin * kRowsPerTask;
#ifdef FS_AVX2
      // One activation row against short weight rows: two output rows at a time, so their
      // dependency chains overlap (A/B on cycled weights: qkv, o, gate_up 6-7% faster at K=576;
      // down, K=1536, 8-30% slower, so not there).
      if (int8_activations && bits == 4 && mb == 1 && K <= 1024)
        for (; n + 2 <= n_end; n += 2) gemv_4bit<1, 2>(p, n, m0);
#endif
      for (; n < n_end; ++n) {
        switch (mb) {
          case 6: rows<6>(p, n, m0); break;
          case 5: rows<5>(p, n, m0); break;
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

// x @ W^T for codes stored in the 16-lane tiles' order (GroupQuantWeight.to_wide_tiles): the tiled GEMM
// of every M, including the single row, reading each tile's group with plain loads (or an unpack) where
// row-major codes are transposed in registers per call (an A/B with the head of Gemma 3 so stored:
// RESULTS.md, issue 24). Int8 activations; the same products in the same float order as
// group_quant_matmul's, so the numbers are those of the row-major weight, bit for bit. Scales
// (T, K/G, 16), G = 32 or 16: float32, float16, or uint8 integers with float16 `factors` (T, K/(8G), 16).
// A stored table of the tiles (scales or zeros): (T, K/G, 16) float32, float16, or integers (uint8; int8
// only where `signed_allowed`) with float16 factors (T, K/(8G), 16). Returns its bytes a value.
int64_t check_tile_table(const at::Tensor& t, const c10::optional<at::Tensor>& factors, int64_t tiles, int64_t groups,
                         bool signed_allowed, const char* what) {
  const bool ints = t.scalar_type() == at::kByte || (signed_allowed && t.scalar_type() == at::kChar);
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.size(0) == tiles && t.size(1) == groups && t.size(2) == kWideLanes &&
                  (t.scalar_type() == at::kHalf || t.scalar_type() == at::kFloat || ints),
              "group_quant_matmul_tiles: ", what, " ", t.sizes(), " is not the tiles' float16, float32 or factored table");
  TORCH_CHECK(ints == (factors.has_value() && factors->defined()),
              "group_quant_matmul_tiles: factors go with a factored ", what, " table, and only with one");
  if (ints)
    TORCH_CHECK(groups % 8 == 0 && factors->scalar_type() == at::kHalf && factors->is_contiguous() &&
                    factors->dim() == 3 && factors->size(0) == tiles && factors->size(1) == groups / 8 &&
                    factors->size(2) == kWideLanes,
                "group_quant_matmul_tiles: ", what, " factors ", factors->sizes(), " are not float16 (", tiles, ", ",
                groups / 8, ", ", kWideLanes, ")");
  return t.element_size();
}

// 6-bit tiles (codes (T, K/32, 384), unpack_six_bit_span) hold u = c + 32, and their factored integers
// may be int8 (a negative scale's sign moved out of the codes): the same products again; 5-bit ones
// (T, K/32, 320) u = c + 16, 3-bit ones (T, K/32, 192) u = c + 4 (Q3_K's, their integers int8 as the 6-bit
// ones'), 4- and 2-bit ones (T, K/32, 256 and 128) u = c (tile_code_offset), or 4-bit indices into 16
// `levels` (IQ4's, or a codebook type's own values: u = levels[index], the level + 128, their integers
// int8 too). Zeros
// (optional) are stored as the scales are, and take x's sums per group as row-major zeros do.
at::Tensor group_quant_matmul_tiles(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                    const c10::optional<at::Tensor>& factors, int64_t N,
                                    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& zero_factors,
                                    const c10::optional<at::Tensor>& levels) {
#ifdef FS_AVX512
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "group_quant_matmul_tiles: x must be (M, K) float32");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), tiles = (N + kWideLanes - 1) / kWideLanes;
  const int64_t group = scale.dim() == 3 && scale.size(1) == K / 16 ? 16 : 32;  // the scales say which
  const int64_t tile_bits = codes.dim() == 3 ? codes.size(2) / (kWideLanes * 4) : 0;  // bytes of a span: 64 per bit
  TORCH_CHECK(K % 32 == 0 && codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) == tiles && codes.size(1) == K / 32 && codes.size(2) == kWideLanes * 4 * tile_bits &&
                  (tile_bits == 8 || tile_bits == 6 || tile_bits == 5 || tile_bits == 4 || tile_bits == 3 ||
                   tile_bits == 2),
              "group_quant_matmul_tiles: codes ", codes.sizes(), " are not the 8-, 6-, 5-, 4-, 3- or 2-bit tiles of ", N,
              " rows of ", K);
  const int64_t scale_bytes = check_tile_table(scale, factors, tiles, K / group, true, "scale");
  const bool with_zero = zero.has_value() && zero->defined();
  const int64_t zero_bytes = with_zero ? check_tile_table(*zero, zero_factors, tiles, K / group, false, "zero") : 0;
  auto y = at::empty({M, N}, xc.options());
  Problem p{xc.data_ptr<float>(), nullptr, nullptr, Table{}, Table{}, y.data_ptr<float>(), M, N, K, group, 8};
  const bool indexed = levels.has_value() && levels->defined();
  TORCH_CHECK(!indexed || (tile_bits == 4 && levels->scalar_type() == at::kByte && levels->numel() == 16 &&
                           levels->is_contiguous()),
              "group_quant_matmul_tiles: levels must be 16 uint8 values beside 4-bit tiles");
  set_int8_activations(p, with_zero, tile_code_offset(tile_bits, indexed));
  if (indexed) p.tile_levels = levels->data_ptr<uint8_t>();
  p.tiles = codes.data_ptr<uint8_t>();
  p.tile_bits = tile_bits;
  p.tile_signed_ints = scale.scalar_type() == at::kChar;
  p.tile_scales = static_cast<const uint8_t*>(scale.data_ptr());
  p.tile_scale_bytes = scale_bytes;
  if (scale_bytes == 1) p.tile_factors = static_cast<const uint8_t*>(factors->data_ptr());
  if (with_zero) {
    p.tile_zeros = static_cast<const uint8_t*>(zero->data_ptr());
    p.tile_zero_bytes = zero_bytes;
    if (zero_bytes == 1) p.tile_zero_factors = static_cast<const uint8_t*>(zero_factors->data_ptr());
  }
  group == 16 ? gemm_wide_tiled<8, 16>(p) : gemm_wide_tiled<8>(p);
  return y;
#else
  TORCH_CHECK(false, "group_quant_matmul_tiles: this build of the kernels has no 16-lane tiles (AVX-512)");
#endif
}

// x @ W^T for i-quant weights in codebook tiles (above), of type `type` (IQ2_XXS, ..., IQ1_M): tiles (T, K/32,
// 64 planes) uint8, d (T, K/256, 16) float16, side (T, K/256, side bytes, 16) uint8, grid the type's entries as
// int16 words of indices into its values (gathered grids: one word more), `codes` its values' unsigned codes
// (16 uint8). Int8 activations; the numbers of the same weight as exact 8-bit codes.
at::Tensor codebook_matmul_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& d, const at::Tensor& side,
                                 const at::Tensor& grid, const at::Tensor& codes, const std::string& type, int64_t N) {
#ifdef FS_AVX512
  int kind = kNoCodebook;
  for (int k = 1; k < static_cast<int>(std::size(kCodebooks)); ++k)
    if (type == kCodebooks[k].name) kind = k;
  TORCH_CHECK(kind != kNoCodebook, "codebook_matmul_tiles: no codebook type ", type);
  const CodebookSpec& spec = kCodebooks[kind];
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "codebook_matmul_tiles: x must be (M, K) float32");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), T = (N + kWideLanes - 1) / kWideLanes;
  TORCH_CHECK(K % 256 == 0 && tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 3 &&
                  tiles.size(0) == T && tiles.size(1) == K / 32 && tiles.size(2) == 64 * spec.planes,
              "codebook_matmul_tiles: tiles ", tiles.sizes(), " are not ", type, " tiles of ", N, " rows of ", K);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 3 && d.size(0) == T &&
                  d.size(1) == K / 256 && d.size(2) == kWideLanes,
              "codebook_matmul_tiles: d ", d.sizes(), " is not float16 (", T, ", ", K / 256, ", 16)");
  TORCH_CHECK(side.scalar_type() == at::kByte && side.is_contiguous() && side.dim() == 4 && side.size(0) == T &&
                  side.size(1) == K / 256 && side.size(2) == spec.side && side.size(3) == kWideLanes,
              "codebook_matmul_tiles: side ", side.sizes(), " is not uint8 (", T, ", ", K / 256, ", ", spec.side, ", 16)");
  const int64_t words = spec.entries;  // a grid looked up when stored is not read: any size
  TORCH_CHECK(grid.scalar_type() == at::kShort && grid.is_contiguous() && (words == 0 || grid.numel() == words) &&
                  codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == 16,
              "codebook_matmul_tiles: ", type, "'s grid must be ", words, " int16 words and its codes 16 uint8");
  auto y = at::empty({M, N}, xc.options());
  Problem p{xc.data_ptr<float>(), nullptr, nullptr, Table{}, Table{}, y.data_ptr<float>(), M, N, K, spec.group, 8};
  set_int8_activations(p, false, tile_code_offset(8));
  p.tiles = tiles.data_ptr<uint8_t>();
  p.tile_bits = spec.planes;
  p.tile_codebook = kind;
  p.tile_grid = grid.data_ptr<int16_t>();
  p.tile_grid_codes = codes.data_ptr<uint8_t>();
  p.tile_d = reinterpret_cast<const uint16_t*>(d.data_ptr());
  p.tile_side = side.data_ptr<uint8_t>();
  spec.group == 16 ? gemm_wide_tiled<8, 16>(p) : gemm_wide_tiled<8>(p);
  return y;
#else
  TORCH_CHECK(false, "codebook_matmul_tiles: this build of the kernels has no 16-lane tiles (AVX-512)");
#endif
}

bool amx_ready() {
#ifdef FS_AMX
  return amx_usable();
#else
  return false;
#endif
}

int64_t wide_tile_lanes() {
#ifdef FS_AVX512
  return kWideLanes;
#else
  return 0;
#endif
}

// Rows [start, end) of W = q * s + z as float32 (rows, K): the large-M path's weight, multiplied
// by a float32 GEMM. The product and the sum are rounded separately (as torch's mul then add,
// and as gguf's dequantization computes them); the build turns off FMA contraction for that.
at::Tensor group_dequantize(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                            int64_t bits, int64_t group, int64_t start, int64_t end) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "group_dequantize: bits must be 4, 5 or 8");
  TORCH_CHECK(bits == 8 ? group % 16 == 0 : group == 32, "group_dequantize: unsupported group size ", group);
  TORCH_CHECK(codes.is_contiguous(), "group_dequantize: contiguous codes expected");
  const int64_t bytes = codes.size(1), N = codes.size(0);
  const int64_t K = bits == 4 ? bytes * 2 : bits == 5 ? bytes / 20 * 32 : bytes, groups = K / group;
  TORCH_CHECK(0 <= start && start <= end && end <= N, "group_dequantize: rows [", start, ", ", end, ") out of ", N);
  const Table s = table_of(scale, N, groups, "scale"), z = optional_table(zero, N, groups, "zero");
  auto out = at::empty({end - start, K}, scale.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(start, end, 16, [&](int64_t begin, int64_t stop) {
    for (int64_t n = begin; n < stop; ++n) {
      float* dst = o + (n - start) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float sg = s.at(n, g), zg = z ? z.at(n, g) : 0.f;
        float* d = dst + g * group;
        if (bits == 4) {
          const uint8_t* b = c + n * (K / 2) + g * 16;
#ifdef FS_AVX2
          const __m256i codes32 = codes_u4(b);  // the group's 32 codes in k order
          const __m256 sv = _mm256_set1_ps(sg), zv = _mm256_set1_ps(zg);
          for (int q = 0; q < 4; ++q) {
            const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                reinterpret_cast<const uint8_t*>(&codes32) + 8 * q));
            const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight)), sv);
            _mm256_storeu_ps(d + 8 * q, _mm256_add_ps(w, zv));
          }
          continue;
#endif
          for (int j = 0; j < 16; ++j) {
            d[j] = static_cast<float>(b[j] & 0x0F) * sg + zg;
            d[j + 16] = static_cast<float>(b[j] >> 4) * sg + zg;
          }
        } else if (bits == 5) {
          for (int64_t j = 0; j < 32; ++j) d[j] = static_cast<float>(code_at(c, 5, K, n, g * 32 + j)) * sg + zg;
        } else {
          const int8_t* b = reinterpret_cast<const int8_t*>(c) + n * K + g * group;
          for (int64_t j = 0; j < group; ++j) d[j] = static_cast<float>(b[j]) * sg + zg;
        }
      }
    }
  });
  return out;
}
