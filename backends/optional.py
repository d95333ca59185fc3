"""Optional heavy dependencies named at a module's top, imported at their first use.

    relax = optional("tvm.relax", extra="tvm")     # top of a lowering module: imports nothing yet
    ...
    y = relax.op.add(a, b)                          # TVM's Relax is imported here, on first attribute read

A backend's compiler half needs TVM or ONNX throughout, yet `import dsgraph.backends` must not load them: they
are optional extras, and a runtime-only TVM process (loading a saved module) must never load TVM's compiler.
So those modules import each other normally, at the top, and only the dependency itself waits. Reading an
attribute of a missing dependency is a BackendUnavailable naming the extra that installs it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from dsgraph.errors import BackendUnavailable


class OptionalModule:
    """Stands for module `name` until an attribute is read, then forwards to the imported module."""

    def __init__(self, name: str, extra: str):
        self._name = name
        self._extra = extra
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if attr.startswith("__"):   # copy/pickle/inspect probing the proxy: not a use of the module
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def _load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)  # the optional dependency, at its first use
            except ImportError as e:
                raise BackendUnavailable(f"{self._name} could not be imported ({e}); install the extra: "
                                         f"pip install 'dsgraph[{self._extra}]'") from e
        return self._module

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<optional module {self._name} ({state})>"


def optional(name: str, extra: str) -> OptionalModule:
    """Module `name` of the optional extra `extra`, imported when first used."""
    return OptionalModule(name, extra)
