"""ONNX export of dsgraph graphs and the `onnx` comparison backend (ONNX Runtime).

Standard ONNX only (opset >= 17, default 21; no custom domain): see export.py for how
ops are converted and domain.py for the forms chosen for attention and MoE.
"""
from . import backend  # noqa: F401  (registers the "onnx" backend)
from .export import OPSET, export_onnx, save_onnx  # noqa: F401
