"""The op registry: each op declared once with attribute schema, type rule, torch reference
and (for domain ops) a decomposition into primitives.

    RMS = defop("norm.rms", inputs="x weight", attrs={"eps": Attr(float, 1e-6)}, doc="...")

    @RMS.infer
    def _(x, weight, *, eps): return x

    @RMS.reference
    def _(x, weight, *, eps): ...

Inputs are a space-separated list; a trailing `name?` is optional, `*name` takes the
rest (e.g. per-expert weights). References get torch tensors and attrs as keywords
and may return any float dtype: the interpreter casts to the declared output type.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import ShapeError, UnknownOpError
from ..symbolic import Sym, simplify

_REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """One attribute: its Python type(s), default (omit for required) and allowed values."""

    type: type | tuple[type, ...]
    default: Any = _REQUIRED
    choices: tuple | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    doc: str
    num_outputs: int = 1
    level: str = "primitive"  # "primitive" | "domain" | "collective" (ops/dist.py)
    infer_fn: Callable | None = None
    reference_fn: Callable | None = None
    decompose_fn: Callable | None = None
    shape_attrs: tuple[str, ...] = field(default=())  # attrs holding dims; resolved to ints before the reference runs

    # decorators ------------------------------------------------------------
    def infer(self, fn: Callable) -> Callable:
        self.infer_fn = fn
        return fn

    def reference(self, fn: Callable) -> Callable:
        self.reference_fn = fn
        return fn

    def decomposition(self, fn: Callable) -> Callable:
        self.decompose_fn = fn
        return fn

    # checking --------------------------------------------------------------
    def check_arity(self, n: int) -> None:
        fixed = [i for i in self.inputs if not i.startswith("*")]
        required = [i for i in fixed if not i.endswith("?")]
        variadic = any(i.startswith("*") for i in self.inputs)
        if n < len(required) or (not variadic and n > len(fixed)):
            raise ShapeError(f"{self.name} takes inputs ({' '.join(self.inputs)}), got {n} inputs")

    def normalize_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, reject unknown or ill-typed attributes, make lists tuples."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; "
                             f"known: {sorted(self.attrs)}")
        out = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                value = _freeze(attrs[key])
            elif spec.required:
                raise ShapeError(f"{self.name}: missing required attribute {key!r}")
            else:
                value = spec.default
            if value is not None:
                types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
                if float in types and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                    raise ShapeError(f"{self.name}: attribute {key}={value!r} should be "
                                     f"{' or '.join(t.__name__ for t in types)}")
                if spec.choices is not None and value not in spec.choices:
                    raise ShapeError(f"{self.name}: attribute {key}={value!r} not in {spec.choices}")
            out[key] = value
        return out

    def infer_types(self, input_types: list, attrs: dict) -> list:
        if self.infer_fn is None:
            raise UnknownOpError(f"op {self.name} has no type rule")
        out = self.infer_fn(*input_types, **attrs)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if self.num_outputs >= 0 and len(out) != self.num_outputs:
            raise ShapeError(f"{self.name}: type rule gave {len(out)} outputs, declared {self.num_outputs}")
        return out


def _freeze(value: Any) -> Any:
    """Attributes are plain data: lists become tuples, symbolic dims their text ("B*S")."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Sym):
        d = simplify(value)
        return d if isinstance(d, int) else str(d)
    return value


_REGISTRY: dict[str, OpDef] = {}


def defop(name: str, inputs: str = "", attrs: dict[str, Attr] | None = None, doc: str = "",
          num_outputs: int = 1, level: str = "primitive", shape_attrs: tuple[str, ...] = ()) -> OpDef:
    """Declare an op; its infer/reference/decomposition are attached with decorators."""
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} registered twice")
    op = OpDef(name, tuple(inputs.split()), dict(attrs or {}), doc, num_outputs, level, shape_attrs=shape_attrs)
    _REGISTRY[name] = op
    return op


@contextmanager
def scratch_ops():
    """Ops defined inside this block are unregistered when it exits.

    The registry is global and other code walks it (completeness checks, exporters), so
    tests and experiments that declare throw-away ops do it here."""
    before = set(_REGISTRY)
    try:
        yield
    finally:
        for name in set(_REGISTRY) - before:
            del _REGISTRY[name]


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownOpError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_REGISTRY))}") from None


def all_ops(level: str | None = None) -> list[OpDef]:
    return [op for op in _REGISTRY.values() if level is None or op.level == level]


def expect(cond: bool, message: str | Callable[[], str]) -> None:
    """Raise ShapeError(message) unless cond; type rules use it so failures read like sentences. Rules run for
    every node of a 671B-parameter graph on each verify, so a hot rule passes a lambda, formatted only on error."""
    if not cond:
        raise ShapeError(message() if callable(message) else message)


def iter_registered() -> Iterable[str]:
    return iter(_REGISTRY)
