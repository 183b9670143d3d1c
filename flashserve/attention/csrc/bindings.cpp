// Python bindings of the CPU kernels (one extension module, several sources).
#include <torch/extension.h>

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, double softcap, int64_t split_tokens);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor act_and_mul(const at::Tensor& gate_up, bool gelu_tanh);
at::Tensor group_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group,
                              bool int8_activations);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged Flash-Decoding attention");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x (in place), then RMSNorm of the sum");
  m.def("rotary_", &rotary_, "rotate-half RoPE in place on (T, H, D)");
  m.def("act_and_mul", &act_and_mul, "act(gate) * up on [gate | up] (SiLU or tanh-GELU)");
  m.def("group_quant_matmul", &group_quant_matmul, "x @ W^T, W = q * s + z per group along K (4/8-bit codes)",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group"),
        py::arg("int8_activations") = false);
}
