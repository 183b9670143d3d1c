"""Quantized weights: GGUF block layouts (gguf_blocks), weights packed for torch's CPU int4/int8
kernels (packed), and which packed form each GGUF type gets (gguf_method); int8 weights times int8
activations applied at load (activation_methods: SmoothQuant, LLM.int8())."""
