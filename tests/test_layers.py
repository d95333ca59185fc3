"""The package's large shape (docs/architecture.md): installed under one `dsgraph` namespace, a light
`import dsgraph`, nothing inside importing the package root, and function-level imports only for optional
heavy dependencies. The layer contract itself is import-linter's (pyproject.toml), run by .ci/run."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dsgraph": "dsgraph", "passes": "dsgraph.passes", "backends": "dsgraph.backends", "models": "dsgraph.models"}
# imported inside functions on purpose: optional extras, or Triton (imported only after the backend has chosen
# its interpreter or GPU mode, which must happen before triton's first import)
OPTIONAL = ("tvm", "tvm_ffi", "onnx", "onnxruntime", "matplotlib", "networkx", "torch._dynamo", "torch.distributed",
            "triton", "transformers", "PIL", "fastapi", "uvicorn", "prometheus_client")


def _package_files():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_package_folder_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in _package_files() if p.name == "__init__.py"}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: add {sorted(found - listed)}, " \
                            f"drop {sorted(listed - found)}"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_import_dsgraph_is_light_and_generic_names_are_not_installed(tmp_path):
    heavy = ["tvm", "onnx", "onnxruntime", "matplotlib", "networkx", "transformers"]
    proc = _run(f"import sys, dsgraph; print([m for m in {heavy!r} if m in sys.modules])", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"import dsgraph imported {proc.stdout.strip()}"
    for name in ("models", "passes", "backends"):
        proc = _run(f"import importlib.util; print(importlib.util.find_spec({name!r}))", tmp_path)
        assert proc.stdout.strip() == "None", f"a top-level {name!r} package is importable: {proc.stdout}"
    proc = _run("import dsgraph.passes, dsgraph.models, dsgraph.backends.triton, dsgraph.runtime.executable", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _imports(tree, module: str):
    """(node, absolute module name, inside a function) for every import statement of `module`."""
    package = module.removesuffix(".__init__") if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    def absolute(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = package.split(".")
        base = base[:len(base) - node.level + 1] if node.level else []
        mod = ".".join(base + ([node.module] if node.module else []))
        return [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]

    def walk(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for mod in absolute(child):
                    yield child, mod, fn
            yield from walk(child, fn)
    yield from walk(tree, False)


def _heavy_modules(trees) -> set[str]:
    """Project modules that import an optional dependency at their top, directly or through other such modules:
    importing one of them inside a function is deferring that dependency."""
    def optional(mod):
        return any(mod == o or mod.startswith(o + ".") for o in OPTIONAL)
    top = {m: [i for _, i, fn in _imports(t, m) if not fn] for m, t in trees.items()}
    heavy = {m for m, imps in top.items() if any(optional(i) for i in imps)}
    while True:
        more = {m for m, imps in top.items()
                if m not in heavy and any(i in heavy or f"{i}.__init__" in heavy for i in imps)}
        if not more:
            return heavy | {m.removesuffix(".__init__") for m in heavy}
        heavy |= more


def _trees():
    return {_module_name(p) + (".__init__" if p.name == "__init__.py" else ""): (p, ast.parse(p.read_text()))
            for p in _package_files()}


def test_nothing_inside_the_package_imports_its_root():
    """dsgraph/__init__.py re-exports the application layer; a module importing it would close a cycle."""
    bad = []
    for module, (path, tree) in _trees().items():
        if module == "dsgraph.__init__":
            continue
        for node, mod, _ in _imports(tree, module):
            root_names = isinstance(node, ast.ImportFrom) and node.module == "dsgraph" and not node.level \
                and not all(_is_submodule(a.name) for a in node.names)
            if root_names or (isinstance(node, ast.Import) and mod == "dsgraph"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "import what you need from its module, not the package root:\n" + "\n".join(bad)


def _is_submodule(name: str) -> bool:
    return name in ("passes", "backends", "models") or (ROOT / "dsgraph" / name).is_dir() \
        or (ROOT / "dsgraph" / f"{name}.py").exists()


def test_function_level_imports_are_only_for_optional_dependencies():
    bad = []
    trees = _trees()
    heavy = _heavy_modules({m: t for m, (_, t) in trees.items()})
    for module, (path, tree) in trees.items():
        lines = path.read_text().splitlines()
        for node, mod, in_fn in _imports(tree, module):
            if not in_fn:
                continue
            optional = mod in heavy or any(mod == o or mod.startswith(o + ".") for o in OPTIONAL)
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if not (optional and commented):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not bad, ("imports inside functions dodge the layer contract; import at the top of the module (only "
                     "optional heavy dependencies stay inside, with a comment saying why):\n" + "\n".join(bad))


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_modules_stay_small(folder):
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 480]
    assert not big, "split these by concept (STYLE.md: modules under ~400 lines):\n" + "\n".join(big)
