// New tokens' K or V rows into their slots of a paged cache side (num_blocks, block_size, H, D) in any
// layout, read from its strides (the engine's transposes K within a block, kernels/ops.py): what
// cache.view(-1, H, D).index_copy_(0, slots, rows.to(cache.dtype)) does for a contiguous cache, with the
// same rounding (to nearest even into float16 and bfloat16).
#include "kernels.h"

namespace {

template <typename S, typename C>
void write_rows(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  const int64_t T = rows.size(0), H = rows.size(1), D = rows.size(2), bs = cache.size(1);
  const int64_t s_blk = cache.stride(0), s_tok = cache.stride(1), s_h = cache.stride(2), s_d = cache.stride(3);
  const S* src = rows.data_ptr<S>();
  C* base = cache.data_ptr<C>();
  for (int64_t t = 0; t < T; ++t) {
    C* slot = base + (slots[t] / bs) * s_blk + (slots[t] % bs) * s_tok;
    for (int64_t h = 0; h < H; ++h) {
      const S* row = src + t * rows.stride(0) + h * rows.stride(1);
      C* dst = slot + h * s_h;
      for (int64_t d = 0; d < D; ++d) dst[d * s_d] = static_cast<C>(static_cast<float>(row[d * rows.stride(2)]));
    }
  }
}

template <typename S>
void write_from(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  switch (cache.scalar_type()) {
    case at::kHalf: return write_rows<S, at::Half>(rows, cache, slots);
    case at::kBFloat16: return write_rows<S, at::BFloat16>(rows, cache, slots);
    case at::kFloat: return write_rows<S, float>(rows, cache, slots);
    default: TORCH_CHECK(false, "write_kv_slots: a float32, float16 or bfloat16 cache expected, got ", cache.scalar_type());
  }
}

}  // namespace

void write_kv_slots(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(rows.dim() == 3 && cache.dim() == 4 && rows.size(1) == cache.size(2) && rows.size(2) == cache.size(3),
              "write_kv_slots: rows (T, H, D) and a cache (blocks, block_size, H, D) expected");
  TORCH_CHECK(slot_mapping.numel() == rows.size(0), "write_kv_slots: one slot per row expected");
  const auto slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* ids = slots.data_ptr<int64_t>();
  const int64_t capacity = cache.size(0) * cache.size(1);
  for (int64_t t = 0; t < rows.size(0); ++t)
    TORCH_CHECK(ids[t] >= 0 && ids[t] < capacity, "write_kv_slots: slot ", ids[t], " outside the cache's ", capacity);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "write_kv_slots",
                                  [&] { write_from<scalar_t>(rows, cache, ids); });
}
