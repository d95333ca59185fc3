"""The onnx package as the exporter uses it, imported at its first use (backends/optional.py): importing
`dsgraph.backends` registers the onnx backend without loading onnx."""
from __future__ import annotations

from ..optional import optional

onnx = optional("onnx", extra="onnx")
