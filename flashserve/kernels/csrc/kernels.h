// The CPU kernels' entry points, shared by the Python bindings and the decode plan.
#pragma once
// The ATen headers these kernels use, not <torch/extension.h>: parsing that one (the whole C++ API and
// pybind11) took ~25 s of every source's ~27 s of compilation; only the bindings need it.
#include <string>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window, double softcap, int64_t split_tokens);
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_ids, int64_t seq_len, double scale, int64_t sliding_window,
                                   double softcap);
void write_kv_slots(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& slot_mapping);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_(at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor act_and_mul(const at::Tensor& gate_up, bool gelu_tanh);
at::Tensor argmax_rows(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> q4k_factored_parts(
    const std::vector<at::Tensor>& parts);
std::tuple<at::Tensor, at::Tensor> q6k_requantize_int8(const at::Tensor& blocks);
at::Tensor narrow_tiles_(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group, int64_t bits);
at::Tensor nibble_tiles(const at::Tensor& codes, int64_t bits);
void rows_to_tiles_(at::Tensor& codes);
at::Tensor group_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero, int64_t bits, int64_t group,
                              bool int8_activations);
at::Tensor group_quant_matmul_tiles(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                    const c10::optional<at::Tensor>& factors, int64_t N,
                                    const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& zero_factors,
                                    const c10::optional<at::Tensor>& levels);
at::Tensor code_levels(const at::Tensor& codes, int64_t N);
at::Tensor level_tiles_(at::Tensor& codes, const c10::optional<at::Tensor>& ints, int64_t group, const at::Tensor& levels,
                        int64_t N);
bool two_bit_tiles_(at::Tensor& codes);
bool amx_ready();  // AMX tiles built in, granted by the OS and self-tested (the kernels use them then)
at::Tensor codebook_matmul_tiles(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& d, const at::Tensor& side,
                                 const at::Tensor& grid, const at::Tensor& codes, const std::string& type, int64_t N);
int64_t wide_tile_lanes();  // output rows of a stored tile in this build (16 with AVX-512), 0 without
at::Tensor group_dequantize(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                            int64_t bits, int64_t group, int64_t start, int64_t end);
void shm_arrive_and_wait(const at::Tensor& flags, int64_t rank, int64_t world, int64_t seq, double timeout_s);
// Large CPU allocations in 2 MiB-aligned, MADV_HUGEPAGE mappings while on; returns the previous setting.
bool allocate_in_huge_pages(bool on);
