"""Symbolic dimensions: integer polynomials over named sizes ("B", "S", "T").

One graph serves every batch size and sequence length because its dims may be
symbols. Most shape rules need only +, - and * of dims (a cache grows T -> T+S, a
reshape merges B*S), so a dim is either an int or a `Sym` polynomial with
integer coefficients, kept in a canonical form so equal dims compare equal.
A compressed cache holds one entry per m tokens, so a dim may also floor-divide
by a positive int (`T//4`): the floor is an atom of the polynomial (named by its
text, e.g. "(S+T)//4"), with the terms m divides pulled out, so that
T//4 + ((T+S)//4 - T//4) is (S+T)//4.
"""
from __future__ import annotations

import re
from typing import Mapping, Union

from .errors import ShapeError

Monomial = tuple[str, ...]  # sorted symbol names or floor atoms; () is the constant term
_FLOORS: dict[str, tuple["Sym", int]] = {}   # floor atom name -> (numerator, divisor)


class Sym:
    """A polynomial in named dims; `Sym("B") * 2 + 1` prints as `2*B+1`."""

    __slots__ = ("terms",)

    def __init__(self, name_or_terms: str | Mapping[Monomial, int]):
        if isinstance(name_or_terms, str):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name_or_terms):
                raise ShapeError(f"invalid dim symbol {name_or_terms!r}: use an identifier like 'B'")
            terms = {(name_or_terms,): 1}
        else:
            terms = {m: c for m, c in name_or_terms.items() if c != 0}
        self.terms: dict[Monomial, int] = dict(sorted(terms.items()))

    # arithmetic -----------------------------------------------------------
    @staticmethod
    def _terms(x: "Dim") -> dict[Monomial, int]:
        if isinstance(x, Sym):
            return x.terms
        return {(): int(x)} if int(x) else {}

    def __add__(self, other: "Dim") -> "Dim":
        out = dict(self.terms)
        for m, c in self._terms(other).items():
            out[m] = out.get(m, 0) + c
        return simplify(Sym(out))

    __radd__ = __add__

    def __neg__(self) -> "Dim":
        return simplify(Sym({m: -c for m, c in self.terms.items()}))

    def __sub__(self, other: "Dim") -> "Dim":
        return self + (-other if isinstance(other, Sym) else -int(other))

    def __rsub__(self, other: "Dim") -> "Dim":
        return -self + other

    def __mul__(self, other: "Dim") -> "Dim":
        out: dict[Monomial, int] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in self._terms(other).items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return simplify(Sym(out))

    __rmul__ = __mul__

    def __floordiv__(self, m: int) -> "Dim":
        return floordiv(self, m)

    # comparison, hashing, printing ---------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Sym, int)):
            return self._terms(other) == self.terms
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.terms.items()))

    def symbols(self) -> set[str]:
        """The named sizes the dim depends on (those inside a floor atom too)."""
        out: set[str] = set()
        for m in self.terms:
            for s in m:
                out |= floor_atom(s)[0].symbols() if "//" in s else {s}
        return out

    def evaluate(self, env: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            v = c
            for s in m:
                if "//" in s:
                    num, div = floor_atom(s)
                    v *= num.evaluate(env) // div
                    continue
                if s not in env:
                    raise ShapeError(f"dim symbol {s!r} has no value bound")
                v *= env[s]
            total += v
        return total

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda mc: (-len(mc[0]), mc[0])):
            body = "*".join(m)
            if any("//" in a for a in m) and (len(m) > 1 or c != 1):   # -(T//4), 2*(T//4): not (-T)//4
                body = "*".join(f"({a})" if "//" in a else a for a in m)
            if not body:
                txt = str(abs(c))
            elif abs(c) == 1:
                txt = body
            else:
                txt = f"{abs(c)}*{body}"
            parts.append(("-" if c < 0 else "+") + txt)
        s = "".join(parts) or "0"
        return s[1:] if s.startswith("+") else s

    def __repr__(self) -> str:
        return f"Sym({str(self)!r})"


Dim = Union[int, Sym]


def floordiv(x: Dim, m: int) -> Dim:
    """x // m for a positive int m: the terms m divides leave the floor ((m*a + r) // m = a + r // m for integer
    a), the rest becomes one floor atom."""
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ShapeError(f"a dim floor-divides by a positive int, not {m!r}")
    if not isinstance(x, Sym):
        return int(x) // m
    whole: dict[Monomial, int] = {}
    rest: dict[Monomial, int] = {}
    for mono, c in x.terms.items():
        if mono == ():
            whole[()], r = divmod(c, m)
            if r:
                rest[()] = r
        elif c % m == 0:
            whole[mono] = c // m
        else:
            rest[mono] = c
    if all(mono == () for mono in rest):      # 0 <= r < m: r // m = 0
        return simplify(Sym(whole))
    num = Sym(rest)
    txt = str(num)
    name = f"{txt if re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', txt) else f'({txt})'}//{m}"
    _FLOORS[name] = (num, m)
    return simplify(Sym(whole)) + Sym({(name,): 1})


def floor_atom(name: str) -> tuple["Sym", int]:
    """(numerator, divisor) of a floor atom, parsed from its name where this process has not made it yet."""
    if name not in _FLOORS:
        parse_dim(name)
    return _FLOORS[name]


def simplify(d: Dim) -> Dim:
    """A Sym that is a constant becomes an int."""
    if isinstance(d, Sym) and all(m == () for m in d.terms):
        return d.terms.get((), 0)
    return d


_TOKEN = re.compile(r"\s*(\d+|[A-Za-z_][A-Za-z0-9_]*|//|[-+*()])")


def parse_dim(text: "Dim | str") -> Dim:
    """Parse "B", "T+S", "2*B*S", "(T+S)//4" or an int into a dim."""
    if isinstance(text, Sym):
        return simplify(text)
    if isinstance(text, bool):
        raise ShapeError(f"a dim must be an int or a symbol, not {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ShapeError(f"negative dim {text}")
        return text
    if not isinstance(text, str):
        raise ShapeError(f"a dim must be an int or a symbol string, not {type(text).__name__}")
    tokens = _TOKEN.findall(text)
    if "".join(tokens).replace(" ", "") != text.replace(" ", ""):
        raise ShapeError(f"cannot parse dim {text!r}: use symbols, ints, + - * // and ()")
    pos = 0

    def expr() -> Dim:
        nonlocal pos
        v = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            rhs = term()
            v = v + rhs if op == "+" else v - rhs
        return v

    def term() -> Dim:
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] in ("*", "//"):
            pos += 1
            if tokens[pos - 1] == "*":
                v = v * atom()
                continue
            m = atom()
            if not isinstance(m, int) or m <= 0:
                raise ShapeError(f"cannot parse dim {text!r}: // takes a positive int divisor, not {m}")
            v = floordiv(v, m)
        return v

    def atom() -> Dim:
        nonlocal pos
        if pos >= len(tokens):
            raise ShapeError(f"cannot parse dim {text!r}: unexpected end")
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            v = expr()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ShapeError(f"cannot parse dim {text!r}: missing ')'")
            pos += 1
            return v
        if tok == "-":
            return -atom()
        if tok.isdigit():
            return int(tok)
        if tok in ("+", "*", ")", "//"):
            raise ShapeError(f"cannot parse dim {text!r}: unexpected {tok!r}")
        return Sym(tok)

    out = expr()
    if pos != len(tokens):
        raise ShapeError(f"cannot parse dim {text!r}: trailing {tokens[pos]!r}")
    return simplify(out)


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    return d.evaluate(env) if isinstance(d, Sym) else d


def dim_str(d: Dim) -> str:
    return str(d)
