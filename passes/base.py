"""What a pass is: a small named object mapping (Graph, WeightStore) -> PassResult.

Like xDSL's `ModulePass` dataclasses and torch.fx's `PassResult`, a pass keeps its
options as dataclass fields and is registered once by name with a one-line
description, so the CLI (`--passes`, `--dump-after`) and pipelines find it by name.

A pass never mutates its inputs: `Pass.__call__` copies the graph and the weight
store first and hands the copies to `run`, which edits them in place through the
graph's own editing methods and returns its statistics.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from dsgraph.errors import PassError, UnknownOpError
from dsgraph.ir import Graph
from dsgraph.weights import WeightStore


@dataclass
class PassResult:
    """The rewritten graph and weights, whether anything changed, and what the pass counted."""

    graph: Graph
    weights: WeightStore
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses are dataclasses (options as fields) with `name`, `description`, `run`.

    `requires` lists passes that must have run first; `check_preconditions` verifies
    that on the graph itself (a pass checks the graph, not the pipeline's history,
    so it also holds for graphs rewritten elsewhere) and raises PassError saying
    which pass to run first.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph, weights: WeightStore) -> dict[str, Any]:
        """Rewrite `graph`/`weights` (already copies) in place; return stats with an int `rewritten`."""
        raise NotImplementedError

    def check_preconditions(self, graph: Graph) -> None:
        """Raise PassError if the graph is not in the form this pass needs."""

    def __call__(self, graph: Graph, weights: WeightStore | None = None) -> PassResult:
        graph, weights = graph.copy(), (weights if weights is not None else WeightStore()).copy()
        self.check_preconditions(graph)
        stats = dict(self.run(graph, weights) or {})
        stats.setdefault("rewritten", 0)
        return PassResult(graph, weights, stats["rewritten"] > 0, stats)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) \
            else {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"


@dataclass(frozen=True)
class PassInfo:
    name: str
    description: str
    factory: Callable[..., Pass]
    requires: tuple[str, ...]


_REGISTRY: dict[str, PassInfo] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a Pass subclass under `cls.name`."""
    if not cls.name or not cls.description:
        raise ValueError(f"pass class {cls.__name__} needs a name and a one-line description")
    if cls.name in _REGISTRY and _REGISTRY[cls.name].factory is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _REGISTRY[cls.name] = PassInfo(cls.name, cls.description, cls, tuple(cls.requires))
    return cls


def unregister(name: str) -> None:
    """Remove a pass (tests and tutorials that register throwaway passes clean up with this)."""
    _REGISTRY.pop(name, None)


def get(name: str, **options) -> Pass:
    """A fresh instance of the pass registered as `name`, with `options` as its fields."""
    if name not in _REGISTRY:
        raise UnknownOpError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name].factory(**options)
    except TypeError as e:
        raise PassError(f"pass {name!r}: bad options {options}: {e}") from None


def info(name: str) -> PassInfo:
    get(name)
    return _REGISTRY[name]


def list_passes() -> dict[str, str]:
    """{name: one-line description} of every registered pass."""
    return {n: p.description for n, p in sorted(_REGISTRY.items())}
