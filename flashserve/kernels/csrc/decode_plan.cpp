// A decode step run layer after layer in C++: the same kernels, in the same order, on the same
// tensors as the Python modules call them, so the hidden states are bit-identical, but without the
// Python and dispatch cost of ~15 calls per layer (about 0.25 ms per layer, a third of a
// single-stream step, measured). Two layer layouts (q|k|v and gate|up projections, RoPE, SwiGLU or
// GeGLU in both):
//   pre-norm (Llama, Qwen2):  h = x + attn(norm(x));  x = h + mlp(norm(h))   (fused residual adds)
//   sandwich (Gemma 3):       h = x + norm(attn(norm(x)));  x = h + norm(mlp(norm(h))),
//                             with q and k normalized per head before RoPE
// The Python side (flashserve/runner/decode_plan.py) decides when it applies.
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>

#include <vector>

#include "kernels.h"
#include "python_bindings.h"

namespace {

// One packed weight of the project's kernel: group-quantized codes with their scales and zeros, by
// rows or stored in the 16-lane tiles' order (then with a factored scale's factors apart).
struct PackedPart {
  at::Tensor codes, scale, zero;
  int64_t bits = 0, group = 0;
  bool int8_activations = false, tiled = false;
  at::Tensor tile_factors;
  int64_t out_features = 0;
  at::Tensor tile_zero_factors;
  at::Tensor tile_levels;
  // codebook tiles (codes, d as the scale): their type, grid, its values' codes and the blocks' side bytes
  std::string codebook;
  at::Tensor grid, grid_codes, side;

  at::Tensor operator()(const at::Tensor& x) const {
    auto optional = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    if (!codebook.empty()) return codebook_matmul_tiles(x, codes, scale, side, grid, grid_codes, codebook, out_features);
    if (tiled)
      return group_quant_matmul_tiles(x, codes, scale, optional(tile_factors), out_features, optional(zero),
                                      optional(tile_zero_factors), optional(tile_levels));
    return group_quant_matmul(x, codes, scale, optional(zero), bits, group, int8_activations);
  }
};

// A linear layer as the Python modules hold it: a float weight, or packed parts stacked along the
// output rows (one, or several when merged projections differ in type: RowSegments); an optional
// bias added after the product.
struct PlanLinear {
  at::Tensor weight, bias;  // weight defined <=> not packed
  std::vector<PackedPart> parts;

  at::Tensor operator()(const at::Tensor& x) const {  // as Linear.forward: F.linear, or kernel(s) + bias
    if (weight.defined()) return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
    at::Tensor y;
    if (parts.size() == 1) {
      y = parts[0](x);
    } else {  // as RowSegments.forward: each part's rows, concatenated
      std::vector<at::Tensor> ys;
      for (const PackedPart& part : parts) ys.push_back(part(x));
      y = at::cat(ys, 1);
    }
    return bias.defined() ? y + bias : y;
  }
};

struct PlanLayer {
  at::Tensor input_norm, post_norm, k_cache, v_cache;  // caches (num_blocks, block_size, Hk, D)
  at::Tensor cos, sin;  // this layer's RoPE tables (max_pos, D/2): Gemma 3 has two bases
  at::Tensor q_norm, k_norm, pre_ffw_norm, post_ffw_norm;  // defined <=> sandwich layout
  PlanLinear qkv, o, gate_up, down;
  int64_t sliding_window;  // -1: none
};

class DecodePlan {
 public:
  DecodePlan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double attn_scale,
             double logit_softcap, bool gelu_tanh, bool sandwich, int64_t split_tokens)
      : Hq_(num_heads), Hk_(num_kv_heads), D_(head_dim), eps_(eps), scale_(attn_scale), softcap_(logit_softcap),
        gelu_tanh_(gelu_tanh), sandwich_(sandwich), split_tokens_(split_tokens) {}

  // (weight, bias, parts), each part (codes, scale, zero, bits, group, int8_activations, tiled,
  // tile_factors, out_features, tile_zero_factors, tile_levels, codebook): GroupQuantWeight.plan_part;
  // codebook None, or (type, grid, grid codes, side) (CodebookWeight.plan_part)
  static PlanLinear linear(py::tuple t) {
    auto opt = [](py::handle h) { return h.is_none() ? at::Tensor() : h.cast<at::Tensor>(); };
    PlanLinear l;
    l.weight = opt(t[0]), l.bias = opt(t[1]);
    for (py::handle h : t[2].cast<py::list>()) {
      const py::tuple p = h.cast<py::tuple>();
      PackedPart part{opt(p[0]), opt(p[1]), opt(p[2]), p[3].cast<int64_t>(), p[4].cast<int64_t>(),
                      p[5].cast<bool>(), p[6].cast<bool>(), opt(p[7]), p[8].cast<int64_t>(), opt(p[9]), opt(p[10])};
      if (!p[11].is_none()) {
        const py::tuple c = p[11].cast<py::tuple>();
        part.codebook = c[0].cast<std::string>();
        part.grid = c[1].cast<at::Tensor>(), part.grid_codes = c[2].cast<at::Tensor>(), part.side = c[3].cast<at::Tensor>();
      }
      l.parts.push_back(std::move(part));
    }
    return l;
  }

  // norms: (input, post_attention) for pre-norm layers; (input, post_attention, q, k, pre_ffw, post_ffw)
  // for sandwich ones.
  void add_layer(std::vector<at::Tensor> norms, py::tuple qkv, py::tuple o, py::tuple gate_up, py::tuple down,
                 at::Tensor k_cache, at::Tensor v_cache, at::Tensor cos, at::Tensor sin, int64_t sliding_window) {
    TORCH_CHECK(norms.size() == (sandwich_ ? 6u : 2u), "decode plan: ", sandwich_ ? 6 : 2, " norms per layer expected");
    const auto kv_type = k_cache.scalar_type();
    TORCH_CHECK((kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16) &&
                    v_cache.scalar_type() == kv_type && v_cache.stride(3) == 1,
                "decode plan: float32, float16 or bfloat16 KV caches with V's head_dim contiguous expected");
    PlanLayer L{norms[0], norms[1], std::move(k_cache), std::move(v_cache), std::move(cos), std::move(sin)};
    if (sandwich_) L.q_norm = norms[2], L.k_norm = norms[3], L.pre_ffw_norm = norms[4], L.post_ffw_norm = norms[5];
    L.qkv = linear(qkv), L.o = linear(o), L.gate_up = linear(gate_up), L.down = linear(down);
    L.sliding_window = sliding_window;
    layers_.push_back(std::move(L));
  }

  // x: (T, d) embedded tokens, one new token per sequence → (T, d) hidden states after `final_norm`.
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& final_norm) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decode plan: x must be (T, d) float32");
    const auto slots = slot_mapping.to(at::kLong).contiguous();
    at::Tensor x = x_in, residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const PlanLayer& L = layers_[i];
      if (sandwich_) {
        const at::Tensor o = attention(L, rms_norm(x, L.input_norm, eps_), positions, slots, block_table, seq_lens);
        x = x + rms_norm(o, L.post_norm, eps_);
        const at::Tensor m = mlp(L, rms_norm(x, L.pre_ffw_norm, eps_));
        x = x + rms_norm(m, L.post_ffw_norm, eps_);
        continue;
      }
      at::Tensor h;
      if (i == 0) {
        residual = x;
        h = rms_norm(x, L.input_norm, eps_);
      } else {
        h = add_rms_norm_(x, residual, L.input_norm, eps_);
      }
      h = add_rms_norm_(attention(L, h, positions, slots, block_table, seq_lens), residual, L.post_norm, eps_);
      x = mlp(L, h);
    }
    return sandwich_ ? rms_norm(x, final_norm, eps_) : add_rms_norm_(x, residual, final_norm, eps_);
  }

  size_t num_layers() const { return layers_.size(); }

 private:
  // h: (T, d) normalized input → (T, d) output projection of the attention over the paged cache.
  at::Tensor attention(const PlanLayer& L, const at::Tensor& h, const at::Tensor& positions, const at::Tensor& slots,
                       const at::Tensor& block_table, const at::Tensor& seq_lens) const {
    const int64_t T = h.size(0), q_size = Hq_ * D_, kv_size = Hk_ * D_;
    const at::Tensor qkv = L.qkv(h);  // (T, q + 2 kv)
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, Hq_, D_});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, Hk_, D_});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, Hk_, D_});
    if (L.q_norm.defined()) {  // per-head norms give new tensors, which RoPE then rotates in place
      q = rms_norm(q, L.q_norm, eps_);
      k = rms_norm(k, L.k_norm, eps_);
    }
    rotary_(q, positions, L.cos, L.sin);
    rotary_(k, positions, L.cos, L.sin);
    write_kv_slots(k, L.k_cache, slots);
    write_kv_slots(v, L.v_cache, slots);
    const at::Tensor attn = paged_decode_attention(q, L.k_cache, L.v_cache, block_table, seq_lens, scale_,
                                                   L.sliding_window, softcap_, split_tokens_);
    return L.o(attn.reshape({T, q_size}));
  }

  at::Tensor mlp(const PlanLayer& L, const at::Tensor& h) const { return L.down(act_and_mul(L.gate_up(h), gelu_tanh_)); }

  int64_t Hq_, Hk_, D_;
  double eps_, scale_, softcap_;
  bool gelu_tanh_, sandwich_;
  int64_t split_tokens_;
  std::vector<PlanLayer> layers_;
};

}  // namespace

void bind_decode_plan(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan", "A decode step run layer after layer in C++")
      .def(py::init<int64_t, int64_t, int64_t, double, double, double, bool, bool, int64_t>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("attn_scale"),
           py::arg("logit_softcap"), py::arg("gelu_tanh"), py::arg("sandwich"), py::arg("split_tokens"))
      .def("add_layer", &DecodePlan::add_layer)
      .def("forward", &DecodePlan::forward, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &DecodePlan::num_layers);
}
