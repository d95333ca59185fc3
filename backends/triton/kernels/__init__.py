"""Hand-written Triton kernel templates: MoE (grouped GEMM, routing), FP8 block GEMM and attention."""
