"""dsgraph: a compiler for DeepSeek-family language models.

    import dsgraph
    model = dsgraph.load("deepseek-v3-tiny")
    exe = dsgraph.compile(model, backend="eager")
    tokens = exe.generate(prompt_ids, max_new_tokens=16)

The package is layered (docs/architecture.md): the core IR (this folder's modules), `dsgraph.passes`,
`dsgraph.backends`, `dsgraph.runtime`, `dsgraph.models` and the application layer `dsgraph.app`, whose public
functions this module re-exports. Nothing inside the package imports this module: it is the users' entry point.
"""
from .analysis import summarize, to_networkx
from .app.api import compile, compile_graph, load, load_artifact
from .builder import GraphBuilder
from .errors import (
    ArtifactError,
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    DeviceMemoryError,
    DSGraphError,
    InputError,
    NumericsError,
    PassError,
    ShapeError,
    UnknownOpError,
    VerifyError,
)
from .interpreter import Interpreter, run
from .ir import Graph, Node, Value
from .models import Model
from .runtime.executable import Executable
from .serialize import graph_from_json, graph_to_json, load_graph, save_graph
from .serve.engine import Engine
from .symbolic import Sym
from .types import TensorType, tt
from .version import __version__
from .weights import WeightStore

__all__ = [
    "ArtifactError", "BackendUnavailable", "CheckpointError", "ConfigError", "DeviceMemoryError", "DSGraphError",
    "Engine", "Executable", "Graph", "GraphBuilder", "InputError", "Interpreter", "Model", "Node", "NumericsError",
    "PassError", "ShapeError", "Sym", "TensorType", "UnknownOpError", "Value", "VerifyError", "WeightStore", "compile",
    "compile_graph", "graph_from_json", "graph_to_json", "load", "load_artifact", "load_graph", "run", "save_graph",
    "summarize", "to_networkx", "tt", "__version__",
]
