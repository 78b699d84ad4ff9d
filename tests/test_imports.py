"""The package's import graph, read with ``ast`` (module-level and function-level imports alike):
no cycles, no ``_private`` name taken from another module, and imports flow one way down the layers
data -> stages -> formats -> pipeline / runtime -> metrics, server -> cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmslim

ROOT = Path(llmslim.__file__).parent

# Lower layers never import higher ones. A module's layer is that of its longest listed prefix.
LAYERS = {
    "llmslim": 0, "llmslim.errors": 0, "llmslim.util": 0, "llmslim.pack": 0, "llmslim.grid": 0,
    "llmslim.nn": 0, "llmslim.ggml_quants": 0, "llmslim.config": 0, "llmslim.corpora": 0, "llmslim.data": 0, "llmslim.models": 0,
    "llmslim.shards": 0,
    "llmslim.quant": 1,
    "llmslim.formats": 2, "llmslim.loader": 2,
    "llmslim.pipeline": 3, "llmslim.runtime": 3,
    "llmslim.metrics": 4, "llmslim.server": 4, "llmslim.tune": 4,
    "llmslim.cli": 5,
}


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = ["llmslim", *f.relative_to(ROOT).with_suffix("").parts]
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (f, pkg)
    return out


def resolve(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> modules it imports (package ``llmslim`` itself excluded), and private imports."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, (f, pkg) in mods.items():
        here = m if pkg else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.split(".")[0] != "llmslim":
                    continue
                for alias in node.names:
                    target = resolve(f"{base}.{alias.name}", mods) or resolve(base, mods)
                    if target and target not in (m, "llmslim"):
                        graph[m].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and resolve(base, mods) != m:
                        private.append(f"{m} imports {base}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = resolve(alias.name, mods)
                    if alias.name.startswith("llmslim") and target and target not in (m, "llmslim"):
                        graph[m].add(target)
    return graph, private


def layer(module: str) -> int:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def test_no_cycles():
    graph, _ = edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(" -> ".join(path[path.index(w):] + [w]))
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles


def test_no_private_names_across_modules():
    _, private = edges()
    assert not private, private


def test_imports_flow_down_the_layers():
    graph, _ = edges()
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in graph.items() for t in targets if layer(t) > layer(m)]
    assert not upward, upward


def test_every_module_has_a_layer():
    """A new top-level module must be given its place in LAYERS (not inherit the root's)."""
    unplaced = [m for m in modules() if m != "llmslim"
                and not any(m == k or m.startswith(k + ".") for k in LAYERS if k != "llmslim")]
    assert not unplaced, unplaced


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    """The checks themselves can fail: a planted cycle and private import are found."""
    pkg = tmp_path / "llmslim"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import _hidden\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n_hidden = 1\n")
    globals()["ROOT"] = pkg
    try:
        graph, private = edges()
        assert "llmslim.sub.b" in graph["llmslim.a"] and "llmslim.a" in graph["llmslim.sub.b"]
        assert private == ["llmslim.a imports llmslim.sub.b._hidden"]
        with pytest.raises(AssertionError):
            test_no_cycles()
    finally:
        globals()["ROOT"] = Path(llmslim.__file__).parent
