"""The layer rules, checked on a static import graph built here from the source (function-level imports included).

import-linter (`make lint`) checks the layer order; this checks what it cannot: no import cycle between modules, no
module importing (or reaching through an imported module for) another module's ``_private`` names, benchmarks
included; no module importing the package root; the kernels imported only by the engines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The package as installed: streammerge/ plus the top-level kernels/ folder shipped as streammerge.kernels.
PACKAGE_DIRS = {"streammerge": ROOT / "streammerge", "streammerge.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, base in PACKAGE_DIRS.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if "kernels" in rel.parts and prefix == "streammerge":
                continue  # the symlink to kernels/: counted once, under its own prefix
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        parts = [p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement anywhere in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.module, node.level)
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not subs:
                found.append((target, rest, node.lineno))
    return found


def _internal(target: str) -> str | None:
    """The module of ours that ``target`` names (a dotted name may end in an attribute), or None."""
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


GRAPH: dict[str, set[str]] = {
    m: {t for t in (_internal(x) for x, _, _ in _imports(m)) if t is not None and t != m} for m in MODULES
}


def _package_of(m: str) -> str:
    return m if _is_package(m) else m.rsplit(".", 1)[0]


def test_graph_sees_every_layer() -> None:
    assert {"streammerge.api", "streammerge.run", "streammerge.kernels.reference", "streammerge.engines.cpu"} <= set(
        MODULES
    )
    assert "streammerge.kernels.reference" in GRAPH["streammerge.engines.cpu"]


def test_no_import_cycle() -> None:
    """Between modules; a package's __init__ may re-export its own submodules (an edge into the package counts
    as an edge to its __init__, so a submodule importing its package's re-exports would show as a cycle)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_private_name_crosses_modules() -> None:
    bad = []
    for m in MODULES:
        tree = ast.parse(MODULES[m].read_text())
        aliases: dict[str, str] = {}  # local name -> our module it is bound to
        for target, names, line in _imports(m):
            mod = _internal(target)
            if mod is None or mod == m:
                continue
            bad += [f"{m}:{line} imports {n} from {mod}" for n in names if n.startswith("_") and not n.startswith("__")]
            if mod.rsplit(".", 1)[-1].startswith("_") and not mod.endswith("__main__"):
                bad.append(f"{m}:{line} imports the private module {mod}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.names:
                base = _resolve(m, node.module, node.level)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES:
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m}:{node.lineno} touches {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_package_root() -> None:
    """streammerge/__init__.py only re-exports; inside the package nobody imports it (the version has a module)."""
    bad = [m for m, ts in GRAPH.items() if "streammerge" in ts and m.startswith("streammerge.")]
    assert not bad, bad


def test_kernels_are_imported_only_by_the_engines() -> None:
    allowed = ("streammerge.engines", "streammerge.kernels", "benchmarks")
    bad = [
        f"{m} imports {t}"
        for m, ts in GRAPH.items()
        for t in ts
        if t.startswith("streammerge.kernels") and not m.startswith(allowed)
    ]
    assert not bad, bad


def test_kernels_import_only_the_base_layer() -> None:
    base = {"streammerge.dtypes", "streammerge.errors"}
    for m in (m for m in MODULES if m.startswith("streammerge.kernels")):
        ours = {t for t in GRAPH[m] if not t.startswith("streammerge.kernels")}
        assert ours <= base, f"{m} imports {sorted(ours - base)}"


def test_every_module_says_its_job() -> None:
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a one-line docstring: {missing}"
