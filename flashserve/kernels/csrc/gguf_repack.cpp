// Load-time conversions of GGUF blocks into the kernels' layouts, where torch's element-wise passes
// (a float copy of the weight, then one pass per operation) cost a large share of a start.
#include <cmath>


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
