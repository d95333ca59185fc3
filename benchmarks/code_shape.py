"""The large shape of the code, counted: import cycles, function-level imports, lowering registries, lines.

    python benchmarks/code_shape.py [REPO_DIR]      # default: this checkout

Works on any checkout, before or after the layered redesign (issue 17): the packages are imported from REPO_DIR as
they are laid out there (top-level `passes`/`backends`/`models`, or the `dsgraph` namespace of an install). Cycles
are strongly connected components of the module import graph (grimp, import-linter's engine), counting imports
inside functions too, since those are what hid them.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FOLDERS = ("dsgraph", "passes", "backends", "models")


def _py_files(root: Path):
    for folder in FOLDERS:
        yield from sorted((root / folder).rglob("*.py"))


def function_level_imports(root: Path) -> int:
    count = 0
    for path in _py_files(root):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn))
    return count


def lowering_tables(root: Path) -> tuple[int, int]:
    """(tables, protocols): module-level tables that map op names to lowering functions, and how many distinct
    mechanisms they are built on. Old-style tables were dicts with their own decorator and signature
    (`_LOWERINGS`, `CONVERTERS`, `TABLE = {}`), one protocol each; `LoweringTable(...)` instances share one."""
    pat = re.compile(r"^(\w+)\s*(:[^=]+)?=\s*((?:\w+\.)?LoweringTable\(|\{\}|dict\()", re.M)
    names = ("_LOWERINGS", "CONVERTERS", "TABLE", "LOWERINGS")
    tables = shared = 0
    for path in _py_files(root):
        for m in pat.finditer(path.read_text()):
            if m.group(3).endswith("LoweringTable("):
                shared += 1
            elif m.group(1) in names:
                tables += 1
    return tables + shared, tables + (1 if shared else 0)


def executors(root: Path) -> list[str]:
    """Classes (other than passes) that walk a graph's nodes or a plan's steps in a run method of their own,
    rather than extending the Interpreter (a subclass that overrides only the per-step hook is not one)."""
    found = []
    for path in _py_files(root):
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef) or any(ast.unparse(b).endswith(("Interpreter", "Pass"))
                                                        for b in cls.bases):
                continue
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name in ("run", "__call__") and any(
                        isinstance(n, ast.For) and re.search(r"\.(nodes|steps|plan)\b", ast.unparse(n.iter))
                        for n in ast.walk(fn)):
                    found.append(f"{path.relative_to(root)}:{cls.name}")
                    break
    return found


def lines(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in _py_files(root))


def cycles(root: Path) -> list[list[str]]:
    """Import cycles (SCCs of more than one module) among the project's modules, as installed from `root`."""
    with tempfile.TemporaryDirectory() as tmp:
        namespaced = "package-dir" in (root / "pyproject.toml").read_text()
        if namespaced:  # a real install puts passes/backends/models under dsgraph/
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", tmp, str(root)], check=True, capture_output=True)
            path, packages = tmp, ["dsgraph"]
        else:
            path, packages = str(root), [f for f in FOLDERS if (root / f / "__init__.py").exists()]
        code = ("import grimp, json, sys; g = grimp.build_graph(*sys.argv[1:], cache_dir=None); "
                "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))")
        out = subprocess.run([sys.executable, "-c", code, *packages], cwd=path, capture_output=True, text=True,
                             env={"PYTHONPATH": path, "PATH": ""}, check=True).stdout
    import json
    edges = json.loads(out)
    return [c for c in _sccs(edges) if len(c) > 1]


def _sccs(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(edges.get(w, ()))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["."])[0]).resolve()
    cyc = cycles(root)
    print(f"{root}")
    print(f"  import cycles (module SCCs)   {len(cyc)}" + "".join(f"\n    {' <-> '.join(c[:6])}" for c in cyc))
    print(f"  function-level imports        {function_level_imports(root)}")
    tables, protocols = lowering_tables(root)
    print(f"  lowering tables / protocols   {tables} / {protocols}")
    execs = executors(root)
    print(f"  step executors                {len(execs)}  ({', '.join(execs)})")
    print(f"  lines of Python (4 packages)  {lines(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
