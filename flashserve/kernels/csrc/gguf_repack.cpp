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

// The in-place rewrite of 8-bit tiles (T, S, 512; tile t, span s: byte 64 q + 4 lane + b = code 4 q + b of
// the span in row 16 t + lane, plus 128) that narrow_tiles_ and level_tiles_ share. First, per (tile,
// group, lane), sign_of(bytes, count, lane index, integer or -1) says +1, -1 (the sign that moves from the
// codes to the scale) or 0 (the group does not fit: nothing is written). Then each span's bytes of lane
// i / 4, u[q] = narrowed(byte of w[q], negative), are packed by pack(u, out, i) into span_bytes. In place,
// a tile at a time: tile t's narrow bytes end before tile t + 1's 8-bit ones begin, so each tile is packed
// into a buffer (its spans in parallel) and copied down. Returns the signs (T, K/G, 16) int8 or undefined.
template <typename SignOf, typename Narrowed, typename Pack>
at::Tensor rewrite_tiles(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group, int64_t span_bytes,
                         const char* what, SignOf sign_of, Narrowed narrowed, Pack pack) {
  constexpr int64_t kLanes = 16, kEight = 512;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(2) == kEight && (group == 16 || group == 32),
              what, ": codes ", codes.sizes(), " are not 8-bit tiles of 16 lanes, or group ", group, " not 16 or 32");
  const int64_t T = codes.size(0), S = codes.size(1), parts = 32 / group, per = 8 / parts, G = S * parts;
  const bool factored = ints.has_value() && ints->defined();
  if (factored)
    TORCH_CHECK(ints->scalar_type() == at::kByte && ints->is_contiguous() && ints->dim() == 3 && ints->size(0) == T &&
                    ints->size(1) == G && ints->size(2) == kLanes,
                what, ": integers ", ints->sizes(), " are not the tiles' (", T, ", ", G, ", 16) uint8 table");
  auto signs = at::empty({T, G, kLanes}, codes.options().dtype(at::kChar));
  uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* in = factored ? ints->data_ptr<uint8_t>() : nullptr;
  int8_t* sg = signs.data_ptr<int8_t>();
  std::atomic<bool> fits{true};
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end && fits.load(std::memory_order_relaxed); ++ts) {
      const uint8_t* span = c + ts * kEight;
      for (int64_t h = 0; h < parts; ++h)
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          uint8_t bytes[32];
          for (int64_t q = h * per, k = 0; q < (h + 1) * per; ++q)
            for (int64_t b = 0; b < 4; ++b) bytes[k++] = span[64 * q + 4 * lane + b];
          const int64_t at = ((ts / S) * G + (ts % S) * parts + h) * kLanes + lane;
          const int sign = sign_of(bytes, 4 * per, (ts / S) * kLanes + lane, in ? int{in[at]} : -1);
          if (sign == 0) fits = false;
          sg[at] = static_cast<int8_t>(sign < 0 ? -1 : 1);
        }
    }
  });
  if (!fits) return at::Tensor();
  std::vector<uint8_t> packed(S * span_bytes);
  for (int64_t t = 0; t < T; ++t) {
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const uint8_t* span = c + (t * S + s) * kEight;
        uint8_t* o = packed.data() + s * span_bytes;
        for (int64_t i = 0; i < 64; ++i) {  // byte i of each vector w[q]: lane i / 4
          uint8_t u[8];
          for (int64_t q = 0; q < 8; ++q)
            u[q] = narrowed(span[64 * q + i], sg[((t * G) + s * parts + q / per) * kLanes + i / 4] < 0);
          pack(u, o, i);
        }
      }
    });
    std::memcpy(c + t * S * span_bytes, packed.data(), S * span_bytes);
  }
  return signs;
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
  auto sign_of = [&](const uint8_t* bytes, int64_t count, int64_t, int integer) {
    const auto [lo, hi] = std::minmax_element(bytes, bytes + count);
    const bool negative = *hi == highest || integer == 128;
    if (*lo < lowest || *hi > highest || (negative && *lo == lowest) || integer > 128) return 0;
    return negative ? -1 : 1;
  };
  auto narrowed = [&](uint8_t v, bool negative) { return static_cast<uint8_t>(negative ? highest - v : v - lowest); };
  auto pack = [&](const uint8_t* u, uint8_t* o, int64_t i) {
    if (bits == 6) {  // four vectors of nibbles, then two of 2-bit fields (the top 2 bits)
      for (int64_t j = 0; j < 4; ++j) o[64 * j + i] = static_cast<uint8_t>((u[j] & 15) | ((u[j + 4] & 15) << 4));
      for (int64_t j = 0; j < 2; ++j)
        o[256 + 64 * j + i] = static_cast<uint8_t>((u[j] >> 4) | ((u[j + 2] >> 4) << 2) | ((u[j + 4] >> 4) << 4) |
                                                   ((u[j + 6] >> 4) << 6));
    } else {  // two vectors of 2-bit fields (the low 2 bits), then one of third bits
      for (int64_t j = 0; j < 2; ++j)
        o[64 * j + i] = static_cast<uint8_t>((u[j] & 3) | ((u[j + 2] & 3) << 2) | ((u[j + 4] & 3) << 4) |
                                             ((u[j + 6] & 3) << 6));
      uint8_t top = 0;
      for (int64_t q = 0; q < 8; ++q) top = static_cast<uint8_t>(top | ((u[q] >> 2) << q));
      o[128 + i] = top;
    }
  };
  return rewrite_tiles(codes, ints, group, 64 * bits, "narrow_tiles_", sign_of, narrowed, pack);
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
  auto sign_of = [&](const uint8_t* bytes, int64_t count, int64_t row, int integer) {
    if (row >= N) return 1;
    const bool plain = std::all_of(bytes, bytes + count, [&](uint8_t v) { return index[v] >= 0; });
    const bool minus = std::all_of(bytes, bytes + count, [&](uint8_t v) { return negated[v] >= 0; });
    const bool negative = !plain || integer == 128;
    return (negative && !minus) || integer > 128 ? 0 : negative ? -1 : 1;
  };
  auto narrowed = [&](uint8_t v, bool negative) {
    const int at = negative ? negated[v] : index[v];
    return static_cast<uint8_t>(at < 0 ? 0 : at);  // a padding row's codes: index 0
  };
  auto pack = [](const uint8_t* u, uint8_t* o, int64_t i) {
    for (int64_t j = 0; j < 4; ++j) o[64 * j + i] = static_cast<uint8_t>(u[j] | (u[j + 4] << 4));
  };
  return rewrite_tiles(codes, ints, group, 256, "level_tiles_", sign_of, narrowed, pack);
}

// The distinct codes of 8-bit tiles (as narrow_tiles_ takes them) in rows [0, N), ascending, as int8,
// when there are at most 16 of them (a codebook type's signed grid values: IQ2_*'s six, IQ3_XXS's
// sixteen); an undefined tensor when there are more.
at::Tensor code_levels(const at::Tensor& codes, int64_t N) {
  constexpr int64_t kLanes = 16, kEight = 512;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == kEight,
              "code_levels: codes ", codes.sizes(), " are not 8-bit tiles of 16 lanes");
  const int64_t T = codes.size(0), S = codes.size(1);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  std::vector<std::atomic<bool>> seen(256);
  std::atomic<int> distinct{0};
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end && distinct.load(std::memory_order_relaxed) <= 16; ++ts) {
      const int64_t lanes = std::min(kLanes, N - (ts / S) * kLanes);  // padding rows hold code 0: not counted
      for (int64_t i = 0; i < kEight; ++i)
        if ((i % 64) / 4 < lanes && !seen[c[ts * kEight + i]].load(std::memory_order_relaxed) &&
            !seen[c[ts * kEight + i]].exchange(true))
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

// 4- or 5-bit codes by rows -> nibble tiles (T, K/32, 64 bits), T the tiles of 16 rows (padding rows:
// c = 0). Rows: per 32 codes 16 bytes of nibbles (code j low, j + 16 high: GGUF's Q4_0/Q5_0 order), and
// for 5 bits then a u32 whose bit j is bit 4 of code j (q = c + 16). Tiles: per span the four vectors of
// nibbles (byte i = 4 lane + b of vector j: q of code 4 j + b, low nibble, and of code 4 (j + 4) + b,
// high), and for 5 bits one of fifth bits (bit q of byte i: bit 4 of code 4 q + b): the kernel's
// unpack_four_bit_span and unpack_five_bit_span.
at::Tensor nibble_tiles(const at::Tensor& codes, int64_t bits) {
  constexpr int64_t kLanes = 16;
  const int64_t block = bits == 5 ? 20 : 16, span_bytes = 64 * bits;
  TORCH_CHECK((bits == 4 || bits == 5) && codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(1) % block == 0,
              "nibble_tiles: codes ", codes.sizes(), " are not ", bits, "-bit rows (N, K/32 * ", block, ") uint8");
  const int64_t N = codes.size(0), S = codes.size(1) / block, T = (N + kLanes - 1) / kLanes;
  auto out = at::empty({T, S, span_bytes}, codes.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, T * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ts = begin; ts < end; ++ts) {
      const int64_t t = ts / S, s = ts % S;
      uint8_t* span = o + ts * span_bytes;
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        const int64_t n = t * kLanes + lane;
        uint8_t q[32];
        if (n < N) {
          const uint8_t* b = c + (n * S + s) * block;
          uint32_t high = 0;
          if (bits == 5) std::memcpy(&high, b + 16, 4);
          for (int64_t j = 0; j < 16; ++j) {
            q[j] = static_cast<uint8_t>((b[j] & 15) | ((high >> j) & 1) << 4);
            q[j + 16] = static_cast<uint8_t>((b[j] >> 4) | ((high >> (j + 16)) & 1) << 4);
          }
        } else {
          std::memset(q, bits == 5 ? 16 : 0, sizeof(q));
        }
        for (int64_t bi = 0; bi < 4; ++bi) {
          const int64_t i = 4 * lane + bi;
          for (int64_t j = 0; j < 4; ++j) span[64 * j + i] = static_cast<uint8_t>((q[4 * j + bi] & 15) | (q[4 * (j + 4) + bi] & 15) << 4);
          if (bits == 5) {
            uint8_t top = 0;
            for (int64_t v = 0; v < 8; ++v) top |= static_cast<uint8_t>((q[4 * v + bi] >> 4) << v);
            span[256 + i] = top;
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
  constexpr int64_t kLanes = 16, kTwo = 128;
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) % 32 == 0,
              "two_bit_tiles_: codes ", codes.sizes(), " are not 8-bit rows (N, K) uint8, K a multiple of 32");
  const int64_t N = codes.size(0), K = codes.size(1), S = K / 32, T = (N + kLanes - 1) / kLanes;
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
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          const int64_t n = t * kLanes + lane;
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
