"""Triton source generation for fused elementwise and row-reduction chains.

Each generator returns a `KernelSource`: readable Triton source specialised to the graph's shapes and dtypes
(constants are baked in), headed by a comment listing the graph nodes it implements, plus the name of its host
launcher. `load_kernel` writes it to a real file (Triton's `@triton.jit` needs one) and imports it.
"""
from .source import KernelSource, load_kernel  # noqa: F401
