"""dsgraph: a compiler for DeepSeek-family language models.

    import dsgraph
    model = dsgraph.load("deepseek-v3-tiny")
    exe = dsgraph.compile(model, backend="eager")
    tokens = exe.generate(prompt_ids, max_new_tokens=16)
"""
from .analysis import summarize, to_networkx
from .builder import GraphBuilder
from .errors import (
    ArtifactError,
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    DeviceMemoryError,
    DSGraphError,
    InputError,
    PassError,
    ShapeError,
    UnknownOpError,
    VerifyError,
)
from .interpreter import Interpreter, run
from .ir import Graph, Node, Value
from .serialize import graph_from_json, graph_to_json, load_graph, save_graph
from .symbolic import Sym
from .types import TensorType, tt
from .weights import WeightStore

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "BackendUnavailable", "CheckpointError", "ConfigError", "DeviceMemoryError", "DSGraphError",
    "Graph", "GraphBuilder", "InputError", "Interpreter", "Node", "PassError", "ShapeError", "Sym",
    "TensorType", "UnknownOpError", "Value", "VerifyError", "WeightStore", "graph_from_json", "graph_to_json",
    "load_graph", "run", "save_graph", "summarize", "to_networkx", "tt", "__version__",
]


def __getattr__(name):
    # the public API layer wires models/passes/backends together; import lazily so the
    # IR core never depends on them (DESIGN: no back edges into dsgraph).
    if name in ("load", "compile", "load_artifact", "Model", "Executable"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'dsgraph' has no attribute {name!r}")
