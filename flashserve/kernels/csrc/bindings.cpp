// Python bindings of the CPU kernels (one extension module, several sources).
#include "kernels.h"
#include "python_bindings.h"

void bind_decode_plan(py::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Paged Flash-Decoding attention");
  m.def("paged_prefill_attention", &paged_prefill_attention, "FlashAttention-tiled prefill over the paged cache");
  m.def("write_kv_slots", &write_kv_slots, "K or V rows (T, H, D) into cache slots (T,), any cache layout");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x (in place), then RMSNorm of the sum");
  m.def("rotary_", &rotary_, "rotate-half RoPE in place on (T, H, D)");
  m.def("act_and_mul", &act_and_mul, "act(gate) * up on [gate | up] (SiLU or tanh-GELU)");
  m.def("argmax_rows", &argmax_rows, "per row, the index of the first maximum (of the first NaN if any)");
  m.def("group_quant_matmul", &group_quant_matmul, "x @ W^T, W = q * s + z per group along K (4/8-bit codes)",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group"),
        py::arg("int8_activations") = false);
  m.def("group_quant_matmul_tiles", &group_quant_matmul_tiles,
        "x @ W^T, W = q * s (+ z), codes and tables stored tile-major (16 output rows a tile)", py::arg("x"),
        py::arg("codes"), py::arg("scale"), py::arg("factors"), py::arg("N"), py::arg("zero") = py::none(),
        py::arg("zero_factors") = py::none(), py::arg("levels") = py::none());
  m.def("code_levels", &code_levels, "the distinct codes of 8-bit tiles' first N rows, ascending, if at most 16; else None",
        py::arg("codes"), py::arg("N"));
  m.def("level_tiles_", &level_tiles_,
        "8-bit tiles rewritten in place as 4-bit indices into 16 levels where every group's codes are levels (or "
        "their negatives); the signs moved to the scales, or None",
        py::arg("codes"), py::arg("ints"), py::arg("group"), py::arg("levels"), py::arg("N"));
  m.def("narrow_tiles_", &narrow_tiles_,
        "8-bit tiles rewritten in place as 6- or 3-bit ones where every group fits; the signs moved to the scales, or None",
        py::arg("codes"), py::arg("ints"), py::arg("group"), py::arg("bits"));
  m.def("rows_to_tiles_", &rows_to_tiles_, "8-bit codes by rows (N, K) rearranged in place into the 16-lane tiles' order, plus 128");
  m.def("nibble_tiles", &nibble_tiles, "4- or 5-bit codes by rows -> the 16-lane tiles' nibble (and fifth-bit) planes");
  m.def("two_bit_tiles_", &two_bit_tiles_,
        "8-bit codes 0..3 by rows rewritten in place as the 16-lane tiles' 2-bit planes; False (untouched) if one is not");
  m.def("amx_ready", &amx_ready, "whether this build uses AMX tiles: built in, granted by the OS, self-tested");
  m.def("codebook_matmul_tiles", &codebook_matmul_tiles,
        "x @ W^T for i-quant weights in codebook tiles at their own bits (int8 activations)", py::arg("x"),
        py::arg("tiles"), py::arg("d"), py::arg("side"), py::arg("grid"), py::arg("codes"), py::arg("type"), py::arg("n"));
  m.def("wide_tile_lanes", &wide_tile_lanes, "output rows of a stored tile in this build; 0 when it has none");
  m.def("group_dequantize", &group_dequantize, "rows [start, end) of W = q * s + z as float32",
        py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group"), py::arg("start"),
        py::arg("end"));
  m.def("q4k_factored_parts", &q4k_factored_parts,
        "Q4_K blocks of parts stacked by rows -> codes (byte j: codes j, j + 16 of a group), 6-bit scales, d, "
        "6-bit mins, -dmin");
  m.def("q6k_requantize_int8", &q6k_requantize_int8, "Q6_K blocks -> int8 codes and float32 scales per group of 32");
  m.def("shm_arrive_and_wait", &shm_arrive_and_wait,
        "announce this rank's arrival (sequence number) in shared flags and wait for every rank's",
        py::arg("flags"), py::arg("rank"), py::arg("world"), py::arg("seq"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>());
  m.def("allocate_in_huge_pages", &allocate_in_huge_pages,
        "while on, CPU allocations of 2 MiB or more start huge-page-aligned and advised; returns the previous setting");
  bind_decode_plan(m);
}
