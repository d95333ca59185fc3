"""ONNX export of dsgraph graphs (export.py) and the `onnx` comparison backend (ONNX Runtime).

Standard ONNX only (opset >= 17, default 21; no custom domain): see export.py for how ops are converted and
domain.py for the forms chosen for attention and MoE. Importing the package registers the backend without
importing onnx (deps.py: it is imported at its first use); exporting needs the [onnx] extra.
"""
from . import backend  # noqa: F401  (registers the "onnx" backend)
