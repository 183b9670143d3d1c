// A decode step of a Llama-family model (pre-norm, q|k|v and gate|up projections, RoPE, SwiGLU or
// GeGLU) run layer after layer in C++: the same kernels, in the same order, on the same tensors as
// the Python modules call them, so the hidden states are bit-identical, but without the Python
// and dispatch cost of ~15 calls per layer (about 0.25 ms per layer, a third of a single-stream
// step, measured). The Python side (flashserve/model/decode_plan.py) decides when it applies.
#include <torch/extension.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

// A linear layer as the Python modules hold it: packed group-quantized codes for the project's
// kernel, or a float weight; an optional bias added after the product.
struct PlanLinear {
  at::Tensor codes, scale, zero, weight, bias;  // weight defined <=> not packed
  int64_t bits = 0, group = 0;
  bool int8_activations = false;

  at::Tensor operator()(const at::Tensor& x) const {  // as Linear.forward: F.linear, or kernel + bias
    if (weight.defined()) return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
    const at::Tensor y = group_quant_matmul(x, codes, scale, zero.defined() ? c10::optional<at::Tensor>(zero) : c10::nullopt,
                                            bits, group, int8_activations);
    return bias.defined() ? y + bias : y;
  }
};

struct PlanLayer {
  at::Tensor input_norm, post_norm, k_cache, v_cache;  // caches (num_blocks, block_size, Hk, D)
  PlanLinear qkv, o, gate_up, down;
  int64_t sliding_window;  // -1: none
};

// K/V rows of the new tokens into their cache slots (what index_copy_ does: plain copies for a
// float32 cache, rounded to nearest-even for a float16 or bfloat16 one, as torch's .to() rounds).
template <typename C>
void write_slots_as(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  const int64_t T = rows.size(0), H = rows.size(1), D = rows.size(2);
  C* base = cache.data_ptr<C>();
  const float* src = rows.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      C* dst = base + (slots[t] * H + h) * D;
      const float* row = src + t * rows.stride(0) + h * rows.stride(1);
      if constexpr (std::is_same_v<C, float>) {
        std::memcpy(dst, row, D * sizeof(float));
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<C>(row[d]);
      }
    }
}

void write_slots(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  switch (cache.scalar_type()) {
    case at::kHalf: return write_slots_as<at::Half>(rows, cache, slots);
    case at::kBFloat16: return write_slots_as<at::BFloat16>(rows, cache, slots);
    default: return write_slots_as<float>(rows, cache, slots);
  }
}

class DecodePlan {
 public:
  DecodePlan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double attn_scale,
             at::Tensor cos, at::Tensor sin, bool gelu_tanh, int64_t split_tokens)
      : Hq_(num_heads), Hk_(num_kv_heads), D_(head_dim), eps_(eps), scale_(attn_scale), cos_(std::move(cos)),
        sin_(std::move(sin)), gelu_tanh_(gelu_tanh), split_tokens_(split_tokens) {}

  static PlanLinear linear(py::tuple t) {  // (codes, scale, zero, weight, bias, bits, group, int8_activations)
    PlanLinear l;
    auto opt = [&](int i) { return t[i].is_none() ? at::Tensor() : t[i].cast<at::Tensor>(); };
    l.codes = opt(0), l.scale = opt(1), l.zero = opt(2), l.weight = opt(3), l.bias = opt(4);
    l.bits = t[5].cast<int64_t>(), l.group = t[6].cast<int64_t>(), l.int8_activations = t[7].cast<bool>();
    return l;
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, py::tuple qkv, py::tuple o, py::tuple gate_up,
                 py::tuple down, at::Tensor k_cache, at::Tensor v_cache, int64_t sliding_window) {
    const auto kv_type = k_cache.scalar_type();
    TORCH_CHECK((kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16) &&
                    v_cache.scalar_type() == kv_type && k_cache.is_contiguous() && v_cache.is_contiguous(),
                "decode plan: contiguous float32, float16 or bfloat16 KV caches expected");
    layers_.push_back({std::move(input_norm), std::move(post_norm), std::move(k_cache), std::move(v_cache),
                       linear(qkv), linear(o), linear(gate_up), linear(down), sliding_window});
  }

  // x: (T, d) embedded tokens, one new token per sequence → (T, d) hidden states after `final_norm`.
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& final_norm) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decode plan: x must be (T, d) float32");
    const int64_t T = x_in.size(0), q_size = Hq_ * D_, kv_size = Hk_ * D_;
    const auto slots = slot_mapping.to(at::kLong).contiguous();
    at::Tensor x = x_in, residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const PlanLayer& L = layers_[i];
      at::Tensor h;
      if (i == 0) {
        residual = x;
        h = rms_norm(x, L.input_norm, eps_);
      } else {
        h = add_rms_norm_(x, residual, L.input_norm, eps_);
      }
      const at::Tensor qkv = L.qkv(h);  // (T, q + 2 kv)
      at::Tensor q = qkv.narrow(1, 0, q_size).view({T, Hq_, D_});
      at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, Hk_, D_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, Hk_, D_});
      rotary_(q, positions, cos_, sin_);
      rotary_(k, positions, cos_, sin_);
      write_slots(k, L.k_cache, slots.data_ptr<int64_t>());
      write_slots(v, L.v_cache, slots.data_ptr<int64_t>());
      const at::Tensor attn = paged_decode_attention(q, L.k_cache, L.v_cache, block_table, seq_lens, scale_,
                                                     L.sliding_window, 0.0, split_tokens_);
      h = add_rms_norm_(L.o(attn.reshape({T, q_size})), residual, L.post_norm, eps_);
      x = L.down(act_and_mul(L.gate_up(h), gelu_tanh_));
    }
    return add_rms_norm_(x, residual, final_norm, eps_);
  }

  size_t num_layers() const { return layers_.size(); }

 private:
  int64_t Hq_, Hk_, D_;
  double eps_, scale_;
  at::Tensor cos_, sin_;
  bool gelu_tanh_;
  int64_t split_tokens_;
  std::vector<PlanLayer> layers_;
};

}  // namespace

void bind_decode_plan(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan", "A Llama-family decode step run layer after layer in C++")
      .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, bool, int64_t>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("attn_scale"),
           py::arg("cos"), py::arg("sin"), py::arg("gelu_tanh"), py::arg("split_tokens"))
      .def("add_layer", &DecodePlan::add_layer)
      .def("forward", &DecodePlan::forward, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &DecodePlan::num_layers);
}
