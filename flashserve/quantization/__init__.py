"""Quantized weights: GGUF block layouts (gguf_blocks), weights packed for CPU int4/int8
kernels (packed: the interface; group_quant_weight: this project's C++ kernel; torch_int_weights: torch's
int4/int8 kernels), and which packed form each GGUF type gets (gguf_method); int8 weights times int8
activations applied at load (activation_methods: SmoothQuant, LLM.int8())."""
