// Load-time conversions of GGUF blocks into the kernels' layouts, where torch's element-wise passes
// (a float copy of the weight, then one pass per operation) cost a large share of a start.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kQ6KBytes = 210;  // ql[128] | qh[64] | scales[16] int8 | d float16 (ggml-common.h, block_q6_K)
constexpr int64_t kSuper = 256;
constexpr int64_t kGroup = 32;

// The 256 weights of one Q6_K block as gguf-py computes them in float32: (d * sc_j) * (q - 32), q the
// 6-bit code (low nibble from ql, two high bits from qh), sc_j the int8 scale of sub-block j of 16.
void q6k_block(const uint8_t* b, float* w) {
  const float d = static_cast<float>(c10::Half(*reinterpret_cast<const uint16_t*>(b + 208), c10::Half::from_bits()));
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  for (int64_t h = 0; h < 2; ++h) {  // two halves of 128: ql[64 h ..], qh[32 h ..]
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int64_t i = 0; i < 128; ++i) {
      const int low = i < 64 ? (ql[i] & 0x0F) : (ql[i - 64] >> 4);
      const int high = (qh[i % 32] >> (2 * (i / 32))) & 3;
      const int64_t e = 128 * h + i;
      const float ds = d * static_cast<float>(sc[e / 16]);
      w[e] = ds * static_cast<float>((low | (high << 4)) - 32);
    }
  }
}

}  // namespace

// Q6_K rows (N, K / 256 * 210 bytes) -> int8 codes (N, K) and float32 scales (N, K / 32), symmetric per
// group of 32: scale = max|w| / 127 (1 for an all-zero group), code = round-half-even(w / scale),
// clamped to +-127. The same float32 operations as torch_int_weights.quantize_groups on gguf-py's
// dequantization, so the result is theirs bit for bit, in one pass and without the float copy.
std::tuple<at::Tensor, at::Tensor> q6k_requantize_int8(const at::Tensor& blocks) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) % kQ6KBytes == 0,
              "q6k_requantize_int8: expected contiguous uint8 (N, K / 256 * 210) Q6_K blocks");
  const int64_t n = blocks.size(0), nb = blocks.size(1) / kQ6KBytes, k = nb * kSuper;
  auto codes = at::empty({n, k}, blocks.options().dtype(at::kChar));
  auto scale = at::empty({n, k / kGroup}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  int8_t* cp = codes.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float w[kSuper];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < nb; ++j) {
        q6k_block(bp + (r * nb + j) * kQ6KBytes, w);
        for (int64_t g = 0; g < kSuper / kGroup; ++g) {
          const float* wg = w + g * kGroup;
          float amax = 0.0f;
          for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(wg[i]));
          const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
          sp[r * (k / kGroup) + j * (kSuper / kGroup) + g] = s;
          int8_t* c = cp + r * k + j * kSuper + g * kGroup;
          for (int64_t i = 0; i < kGroup; ++i) {
            const float q = std::nearbyint(wg[i] / s);
            c[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
          }
        }
      }
    }
  });
  return {codes, scale};
}

namespace {
constexpr int64_t kQ4KBytes = 144;  // d float16 | dmin float16 | scales[12] | qs[128] (ggml-common.h, block_q4_K)
}  // namespace

// Q4_K rows (N, K / 256 * 144 bytes), the rows of several parts stacked in their order (q|k|v,
// gate|up: no copy of them joined first, nor of the results) -> the factored form of
// gguf_blocks.q4k_factored, equal to it byte for byte: codes (N, K / 2) with byte j of each
// 32-value group holding code j (low nibble) and j + 16 (high) (a block's qs hold sub-block 2c in the
// low nibbles of chunk c, 2c + 1 in the high), the 6-bit scales and mins (N, K / 32) unpacked as
// ggml's get_scale_min_k4, d and -dmin (N, K / 256) float16. One pass over the bytes, where numpy's
// took one per operation.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> q4k_factored_parts(
    const std::vector<at::Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), "q4k_factored_parts: no parts");
  int64_t n = 0;
  for (const auto& blocks : parts) {
    TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                    blocks.size(1) % kQ4KBytes == 0 && blocks.size(1) == parts[0].size(1),
                "q4k_factored_parts: expected contiguous uint8 (N, K / 256 * 144) Q4_K blocks, one K for all");
    n += blocks.size(0);
  }
  const int64_t nb = parts[0].size(1) / kQ4KBytes, k = nb * kSuper;
  const auto bytes = parts[0].options();
  auto codes = at::empty({n, k / 2}, bytes);
  auto sc = at::empty({n, k / kGroup}, bytes);
  auto mn = at::empty({n, k / kGroup}, bytes);
  auto d = at::empty({n, nb}, bytes.dtype(at::kHalf));
  auto neg_dmin = at::empty({n, nb}, bytes.dtype(at::kHalf));
  uint8_t* cp = codes.data_ptr<uint8_t>();
  uint8_t* scp = sc.data_ptr<uint8_t>();
  uint8_t* mnp = mn.data_ptr<uint8_t>();
  auto* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
  auto* mp = reinterpret_cast<uint16_t*>(neg_dmin.data_ptr<at::Half>());
  int64_t first_block = 0;  // of this part, among all the parts' blocks
  for (const auto& blocks : parts) {
    const uint8_t* bp = blocks.data_ptr<uint8_t>();
    at::parallel_for(0, blocks.size(0) * nb, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint8_t* b = bp + i * kQ4KBytes;
        const int64_t blk = first_block + i;
        uint16_t dbits, mbits;
        std::memcpy(&dbits, b, 2);
        std::memcpy(&mbits, b + 2, 2);
        dp[blk] = dbits;
        mp[blk] = mbits ^ 0x8000;  // -dmin: the sign bit flipped, as float16 negation does
        const uint8_t* s = b + 4;  // scales: a = s[0..4), b = s[4..8), c = s[8..12)
        uint8_t* so = scp + blk * 8;
        uint8_t* mo = mnp + blk * 8;
        for (int j = 0; j < 4; ++j) {
          so[j] = s[j] & 0x3F;
          mo[j] = s[4 + j] & 0x3F;
          so[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 6) << 4);
          mo[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
        }
        const uint8_t* qs = b + 16;
        uint8_t* out = cp + blk * (kSuper / 2);
        for (int c = 0; c < 4; ++c) {  // chunk c: bytes j and j + 16 give codes j and j + 16 of two groups
          const uint8_t* first = qs + 32 * c;
          const uint8_t* second = first + 16;
          uint8_t* low = out + 32 * c;  // group 2c
          uint8_t* high = low + 16;     // group 2c + 1
          for (int j = 0; j < 16; ++j) {
            low[j] = static_cast<uint8_t>((first[j] & 0x0F) | (second[j] << 4));
            high[j] = static_cast<uint8_t>((first[j] >> 4) | (second[j] & 0xF0));
          }
        }
      }
    });
    first_block += blocks.size(0) * nb;
  }
  return {codes, sc, d, mn, neg_dmin};
}

namespace {

constexpr int64_t kTileLanes = 16, kEightBitSpan = 512, kVector = 64;

// One of a tile's 64-byte vectors as a GCC vector: its byte-wise operations compile to whatever SIMD the
// build's level has (two AVX2 halves, one AVX-512 register, or scalar code).
using Bytes64 = uint8_t __attribute__((vector_size(kVector)));

Bytes64 load64(const uint8_t* p) {
  Bytes64 v;
  std::memcpy(&v, p, kVector);
  return v;
}

void store64(uint8_t* p, Bytes64 v) { std::memcpy(p, &v, kVector); }

// 0xff in each byte of the lanes (4 bytes each) whose sign is negative, else 0.
Bytes64 negative_lanes(const int8_t* signs) {
  uint32_t words[kTileLanes];
  for (int64_t l = 0; l < kTileLanes; ++l) words[l] = signs[l] < 0 ? 0xffffffffu : 0u;
  Bytes64 mask;
  std::memcpy(&mask, words, kVector);
  return mask;
}

// The in-place rewrite of 8-bit tiles (T, S, 512; tile t, span s: byte 64 q + 4 lane + b = code 4 q + b of
// the span in row 16 t + lane, plus 128) that narrow_tiles_ and level_tiles_ share. First, per (tile,
// group), signs_of(vectors, count, first row, integers or null, signs) reads the group's `count` 64-byte
// vectors and writes each of its 16 lanes' sign: +1, or -1 (the sign that moves from the codes to the
// scale); it returns false when a lane's group does not fit, and then nothing is written. Then each
// span's vectors w[q] become u[q] = narrow(w[q], negative) (negative: 0xff in the bytes of the lanes
// whose sign is -1), and pack(u, out) writes them as span_bytes. In place, a chunk of tiles at a time: the chunk's narrow bytes end before
// the next chunk's 8-bit ones begin, so each chunk is packed into a buffer (its spans in parallel) and
// copied down. Returns the signs (T, K/G, 16) int8, or an undefined tensor.
template <typename SignsOf, typename Narrow, typename Pack>
at::Tensor rewrite_tiles(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group, int64_t span_bytes,
                         const char* what, SignsOf signs_of, Narrow narrow, Pack pack) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(2) == kEightBitSpan && (group == 16 || group == 32),
              what, ": codes ", codes.sizes(), " are not 8-bit tiles of 16 lanes, or group ", group, " not 16 or 32");
  const int64_t T = codes.size(0), S = codes.size(1), parts = 32 / group, per = 8 / parts, G = S * parts;
  const bool factored = ints.has_value() && ints->defined();
  if (factored)
    TORCH_CHECK(ints->scalar_type() == at::kByte && ints->is_contiguous() && ints->dim() == 3 && ints->size(0) == T &&
                    ints->size(1) == G && ints->size(2) == kTileLanes,
                what, ": integers ", ints->sizes(), " are not the tiles' (", T, ", ", G, ", 16) uint8 table");
  auto signs = at::empty({T, G, kTileLanes}, codes.options().dtype(at::kChar));
  uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* in = factored ? ints->data_ptr<uint8_t>() : nullptr;
  int8_t* sg = signs.data_ptr<int8_t>();
  std::atomic<bool> fits{true};
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end && fits.load(std::memory_order_relaxed); ++ts)
      for (int64_t h = 0; h < parts; ++h) {
        const int64_t at = ((ts / S) * G + (ts % S) * parts + h) * kTileLanes;
        if (!signs_of(c + ts * kEightBitSpan + kVector * h * per, per, (ts / S) * kTileLanes, in ? in + at : nullptr,
                      sg + at))
          fits = false;
      }
  });
  if (!fits) return at::Tensor();
  const int64_t chunk = std::max<int64_t>(1, 1024 / S);  // tiles a buffer holds: ~1024 spans
  std::vector<uint8_t> packed(chunk * S * span_bytes);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t spans = (std::min(T, t0 + chunk) - t0) * S;
    at::parallel_for(0, spans, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t ts = t0 * S + j, t = ts / S, s = ts % S;
        Bytes64 u[8], negative;
        for (int64_t q = 0; q < 8; ++q) {
          if (q % per == 0) negative = negative_lanes(sg + (t * G + s * parts + q / per) * kTileLanes);
          u[q] = narrow(load64(c + ts * kEightBitSpan + kVector * q), negative);
        }
        pack(u, packed.data() + j * span_bytes);
      }
    });
    std::memcpy(c + t0 * S * span_bytes, packed.data(), spans * span_bytes);
  }
  return signs;
}

// Per lane of a group's `count` vectors (lane l: bytes 4 l .. 4 l + 3 of each), the least and greatest byte.
void lane_min_max(const uint8_t* vectors, int64_t count, uint8_t* lo, uint8_t* hi) {
  Bytes64 low = load64(vectors), high = low;
  for (int64_t q = 1; q < count; ++q) {
    const Bytes64 v = load64(vectors + kVector * q);
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  for (int64_t l = 0; l < kTileLanes; ++l) {
    lo[l] = std::min({low[4 * l], low[4 * l + 1], low[4 * l + 2], low[4 * l + 3]});
    hi[l] = std::max({high[4 * l], high[4 * l + 1], high[4 * l + 2], high[4 * l + 3]});
  }
}

}  // namespace

// 8-bit tiles rewritten in place (rewrite_tiles) as `bits`-bit tiles (6 or 3; group_quant_weight.py,
// "Narrow tiles") when each group's codes fit: the sign is -1 where the codes reach +half (half =
// 2^(bits - 1); or the factored integer is 128, which int8 holds only as -128), so that u = sign * c +
// half lies in 0..2 half - 1; no sign fits a group with -half and +half, a code outside them, or an
// integer over 128. Layouts: unpack_six_bit_span and unpack_three_bit_span (quant_matmul.cpp).
at::Tensor narrow_tiles_(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group, int64_t bits) {
  TORCH_CHECK(bits == 6 || bits == 3, "narrow_tiles_: bits ", bits, " not 6 or 3");
  const int half = 1 << (bits - 1), lowest = 128 - half, highest = 128 + half;
  auto signs_of = [&](const uint8_t* vectors, int64_t count, int64_t, const uint8_t* integers, int8_t* signs) {
    uint8_t lo[kTileLanes], hi[kTileLanes];
    lane_min_max(vectors, count, lo, hi);
    for (int64_t l = 0; l < kTileLanes; ++l) {
      const int integer = integers ? int{integers[l]} : -1;
      const bool negative = hi[l] == highest || integer == 128;
      if (lo[l] < lowest || hi[l] > highest || (negative && lo[l] == lowest) || integer > 128) return false;
      signs[l] = negative ? -1 : 1;
    }
    return true;
  };
  // sign * c + half: v - lowest, or highest - v = 2 half - (v - lowest)
  auto narrow = [&](Bytes64 v, Bytes64 negative) {
    const Bytes64 up = v - static_cast<uint8_t>(lowest);
    return (negative & (static_cast<uint8_t>(2 * half) - up)) | (~negative & up);
  };
  auto pack = [&](const Bytes64* u, uint8_t* o) {
    if (bits == 6) {  // four vectors of nibbles, then two of 2-bit fields (the top 2 bits)
      for (int64_t j = 0; j < 4; ++j) store64(o + 64 * j, (u[j] & 15) | ((u[j + 4] & 15) << 4));
      for (int64_t j = 0; j < 2; ++j)
        store64(o + 256 + 64 * j, (u[j] >> 4) | ((u[j + 2] >> 4) << 2) | ((u[j + 4] >> 4) << 4) | ((u[j + 6] >> 4) << 6));
    } else {  // two vectors of 2-bit fields (the low 2 bits), then one of third bits
      for (int64_t j = 0; j < 2; ++j)
        store64(o + 64 * j, (u[j] & 3) | ((u[j + 2] & 3) << 2) | ((u[j + 4] & 3) << 4) | ((u[j + 6] & 3) << 6));
      Bytes64 top = (u[0] >> 2);
      for (int64_t q = 1; q < 8; ++q) top |= (u[q] >> 2) << q;
      store64(o + 128, top);
    }
  };
  return rewrite_tiles(codes, ints, group, 64 * bits, "narrow_tiles_", signs_of, narrow, pack);
}

// 8-bit tiles rewritten in place (rewrite_tiles) as 4-bit tiles of indices into 16 `levels` (int8; IQ4's,
// or the weight's own few values: code_levels), the layout of unpack_four_bit_span: the sign is +1 where every code is a level, else -1
// where every code's negative is (and -1 where the factored integer is 128, which int8 holds only as
// -128); no sign fits a group whose codes are neither, or an integer over 128. Rows from N on pad the
// last tile (codes 0, scales 0): index 0.
at::Tensor level_tiles_(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group,
                        const at::Tensor& levels, int64_t N) {
  TORCH_CHECK(levels.scalar_type() == at::kChar && levels.numel() == 16 && levels.is_contiguous(),
              "level_tiles_: levels must be 16 int8 values");
  // index[b]: the level that the byte b = c + 128 stands for, or -1; negated[b] the same for -c
  int index[256], negated[256];
  std::fill(index, index + 256, -1);
  std::fill(negated, negated + 256, -1);
  const int8_t* lv = levels.data_ptr<int8_t>();
  for (int i = 0; i < 16; ++i) {
    index[lv[i] + 128] = i;
    if (lv[i] != -128) negated[-lv[i] + 128] = i;
  }
  auto signs_of = [&](const uint8_t* vectors, int64_t count, int64_t first_row, const uint8_t* integers, int8_t* signs) {
    uint8_t plain[kVector], minus[kVector];  // per byte: every code of its column a level (its negative one)
    std::fill(plain, plain + kVector, 1);
    std::fill(minus, minus + kVector, 1);
    for (int64_t q = 0; q < count; ++q)
      for (int64_t i = 0; i < kVector; ++i) {
        plain[i] &= index[vectors[kVector * q + i]] >= 0;
        minus[i] &= negated[vectors[kVector * q + i]] >= 0;
      }
    for (int64_t l = 0; l < kTileLanes; ++l) {
      if (first_row + l >= N) {
        signs[l] = 1;
        continue;
      }
      const int integer = integers ? int{integers[l]} : -1;
      const bool negative = !(plain[4 * l] & plain[4 * l + 1] & plain[4 * l + 2] & plain[4 * l + 3]) || integer == 128;
      if ((negative && !(minus[4 * l] & minus[4 * l + 1] & minus[4 * l + 2] & minus[4 * l + 3])) || integer > 128)
        return false;
      signs[l] = negative ? -1 : 1;
    }
    return true;
  };
  auto narrow = [&](Bytes64 v, Bytes64 negative) {
    Bytes64 u;
    for (int64_t i = 0; i < kVector; ++i) {
      const int at = negative[i] ? negated[v[i]] : index[v[i]];
      u[i] = static_cast<uint8_t>(at < 0 ? 0 : at);  // a padding row's codes: index 0
    }
    return u;
  };
  auto pack = [](const Bytes64* u, uint8_t* o) {
    for (int64_t j = 0; j < 4; ++j) store64(o + 64 * j, u[j] | (u[j + 4] << 4));
  };
  return rewrite_tiles(codes, ints, group, 256, "level_tiles_", signs_of, narrow, pack);
}

// The distinct codes of 8-bit tiles (as narrow_tiles_ takes them) in rows [0, N), ascending, as int8,
// when there are at most 16 of them (a codebook type's signed grid values: IQ2_*'s six, IQ3_XXS's
// sixteen); an undefined tensor when there are more.
at::Tensor code_levels(const at::Tensor& codes, int64_t N) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(2) == kEightBitSpan,
              "code_levels: codes ", codes.sizes(), " are not 8-bit tiles of 16 lanes");
  const int64_t T = codes.size(0), S = codes.size(1);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  std::vector<std::atomic<bool>> seen(256);
  std::atomic<int> distinct{0};
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end && distinct.load(std::memory_order_relaxed) <= 16; ++ts) {
      const int64_t lanes = std::min(kTileLanes, N - (ts / S) * kTileLanes);  // padding rows hold code 0: not counted
      for (int64_t i = 0; i < kEightBitSpan; ++i)
        if ((i % 64) / 4 < lanes && !seen[c[ts * kEightBitSpan + i]].load(std::memory_order_relaxed) &&
            !seen[c[ts * kEightBitSpan + i]].exchange(true))
          distinct.fetch_add(1);
    }
  });
  if (distinct > 16) return at::Tensor();
  std::vector<int8_t> values;
  for (int b = 0; b < 256; ++b)
    if (seen[b]) values.push_back(static_cast<int8_t>(b - 128));
  auto out = at::empty({static_cast<int64_t>(values.size())}, codes.options().dtype(at::kChar));
  std::memcpy(out.data_ptr<int8_t>(), values.data(), values.size());
  return out;
}

// 8-bit codes by rows (N, K; N a multiple of 16) rearranged in place into the 8-bit tiles' order (T, K/32,
// 512): byte 64 q + 4 lane + b of span s of tile t = code 32 s + 4 q + b of row 16 t + lane, plus 128 (the
// kernel's vectors w[q], unsigned). A tile's rows and its tile are the same bytes, so the tiles go in
// parallel, each through a buffer of its own.
void rows_to_tiles_(at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) % kTileLanes == 0 && codes.size(1) % 32 == 0,
              "rows_to_tiles_: codes ", codes.sizes(), " are not 8-bit rows (N, K) uint8, N a multiple of 16, K of 32");
  const int64_t K = codes.size(1), S = K / 32, T = codes.size(0) / kTileLanes;
  uint8_t* c = codes.data_ptr<uint8_t>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(kTileLanes * K);
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* tile = c + t * kTileLanes * K;
      std::memcpy(rows.data(), tile, rows.size());
      for (int64_t s = 0; s < S; ++s)
        for (int64_t q = 0; q < 8; ++q)
          for (int64_t lane = 0; lane < kTileLanes; ++lane) {
            uint32_t four;
            std::memcpy(&four, rows.data() + lane * K + 32 * s + 4 * q, 4);
            four ^= 0x80808080u;
            std::memcpy(tile + s * kEightBitSpan + kVector * q + 4 * lane, &four, 4);
          }
    }
  });
}

// 4- or 5-bit codes by rows -> nibble tiles (T, K/32, 64 bits), T the tiles of 16 rows (padding rows:
// c = 0). Rows: per 32 codes 16 bytes of nibbles (code j low, j + 16 high: GGUF's Q4_0/Q5_0 order), and
// for 5 bits then a u32 whose bit j is bit 4 of code j (q = c + 16). Tiles: per span the four vectors of
// nibbles (byte i = 4 lane + b of vector j: q of code 4 j + b, low nibble, and of code 4 (j + 4) + b,
// high), and for 5 bits one of fifth bits (bit q of byte i: bit 4 of code 4 q + b): the kernel's
// unpack_four_bit_span and unpack_five_bit_span.
at::Tensor nibble_tiles(const at::Tensor& codes, int64_t bits) {
  const int64_t block = bits == 5 ? 20 : 16, span_bytes = 64 * bits;
  TORCH_CHECK((bits == 4 || bits == 5) && codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(1) % block == 0,
              "nibble_tiles: codes ", codes.sizes(), " are not ", bits, "-bit rows (N, K/32 * ", block, ") uint8");
  const int64_t N = codes.size(0), S = codes.size(1) / block, T = (N + kTileLanes - 1) / kTileLanes;
  auto out = at::empty({T, S, span_bytes}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end; ++ts) {
      const int64_t t = ts / S, s = ts % S;
      uint8_t* span = o + ts * span_bytes;
      // The nibble byte of vector j, lane l, b is row l's byte 4 j + b (code 4 j + b low, 4 (j + 4) + b high):
      // four bytes of a row at a time. Fifth bits: bit v of byte 4 l + b is bit 4 v + b of row l's u32.
      for (int64_t lane = 0; lane < kTileLanes; ++lane) {
        const int64_t n = t * kTileLanes + lane;
        const uint8_t* b = n < N ? c + (n * S + s) * block : nullptr;
        for (int64_t j = 0; j < 4; ++j) {
          uint32_t four = 0;  // padding rows: nibbles 0 (4-bit c = 0; 5-bit q = 16, its fifth bit below)
          if (b) std::memcpy(&four, b + 4 * j, 4);
          std::memcpy(span + 64 * j + 4 * lane, &four, 4);
        }
        if (bits == 5) {
          uint32_t high = 0xffffffffu;
          if (b) std::memcpy(&high, b + 16, 4);
          for (int64_t bi = 0; bi < 4; ++bi) {
            uint8_t top = 0;
            for (int64_t v = 0; v < 8; ++v) top = static_cast<uint8_t>(top | ((high >> (4 * v + bi)) & 1) << v);
            span[256 + 4 * lane + bi] = top;
          }
        }
      }
    }
  });
  return out;
}

// 8-bit codes 0..3 by rows (N, K; Q2_K's exact form) rewritten in place as 2-bit tiles (T, K/32, 128)
// over the front of the same storage, T the tiles of 16 rows (padding rows: 0): per span two vectors,
// bits 2r..2r+1 of byte i = 4 lane + b of vector j holding code 4 (j + 2r) + b of row 16 t + lane, the
// kernel's unpack_two_bit_span. A tile at a time (its spans in parallel into a buffer, then copied
// down): tile t's 2-bit bytes end at 4 K (t + 1), before tile t + 1's rows begin at 16 K (t + 1).
// Returns whether every code was in 0..3; if not, the codes are untouched.
bool two_bit_tiles_(at::Tensor& codes) {
  constexpr int64_t kTwo = 128;
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) % 32 == 0,
              "two_bit_tiles_: codes ", codes.sizes(), " are not 8-bit rows (N, K) uint8, K a multiple of 32");
  const int64_t N = codes.size(0), K = codes.size(1), S = K / 32, T = (N + kTileLanes - 1) / kTileLanes;
  uint8_t* c = codes.data_ptr<uint8_t>();
  std::atomic<bool> fits{true};
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * K; i < end * K && fits.load(std::memory_order_relaxed); ++i)
      if (c[i] > 3) fits = false;
  });
  if (!fits) return false;
  std::vector<uint8_t> packed(S * kTwo);
  for (int64_t t = 0; t < T; ++t) {
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        uint8_t* span = packed.data() + s * kTwo;
        for (int64_t lane = 0; lane < kTileLanes; ++lane) {
          const int64_t n = t * kTileLanes + lane;
          const uint8_t* row = n < N ? c + n * K + s * 32 : nullptr;
          for (int64_t b = 0; b < 4; ++b)
            for (int64_t j = 0; j < 2; ++j) {
              uint8_t v = 0;
              for (int64_t r = 0; r < 4 && row; ++r) v = static_cast<uint8_t>(v | row[4 * (j + 2 * r) + b] << (2 * r));
              span[64 * j + 4 * lane + b] = v;
            }
        }
      }
    });
    std::memcpy(c + t * S * kTwo, packed.data(), S * kTwo);
  }
  return true;
}
