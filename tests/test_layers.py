"""The layer table (docs/design.md): each package imports only the packages below it, no
two modules import each other (directly or round a longer loop), and only the CLI entry
point looks upward. Function-level imports count as much as module-level ones."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = ("methods", "benchmark", "slurm")

# package -> the project packages it may import (besides itself), bottom to top
LAYERS: dict[str, set[str]] = {
    "methods": set(),
    "benchmark.common": set(),
    "benchmark.engine": {"benchmark.common", "methods"},
    "benchmark.runs": {"benchmark.common"},
    "benchmark.data": {"benchmark.common", "methods"},
    "benchmark.detectors": {"benchmark.common", "benchmark.engine", "benchmark.runs", "methods"},
    "benchmark.stages": {"benchmark.common", "benchmark.engine", "benchmark.data", "benchmark.detectors", "methods"},
    "benchmark.experiments": {"benchmark.common", "benchmark.runs", "benchmark.data", "benchmark.detectors",
                              "methods"},
    "benchmark.reporting": {"benchmark.common", "benchmark.runs", "benchmark.detectors", "benchmark.experiments",
                            "methods"},
    "benchmark.runner": {"benchmark.common", "benchmark.engine", "benchmark.runs", "benchmark.data",
                         "benchmark.stages"},
    "slurm": {"benchmark.common", "benchmark.engine", "benchmark.runs", "benchmark.experiments",
              "benchmark.reporting", "benchmark.runner"},
}
ENTRY = "benchmark.cli"   # the one upward-looking module: above everything it imports


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for top in OWN:
        for f in (root / top).rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in the file, function-level included."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m.split(".")[0] in OWN]


def _layer(module: str) -> str | None:
    if module == ENTRY or module.startswith(ENTRY + "."):
        return ENTRY
    best = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return max(best, key=len) if best else None


def _graph(root: Path) -> dict[str, dict[str, int]]:
    mods = _modules(root)
    g: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in mods.items():
        for target, line in _imports(name, path):
            if target in mods and target != name:
                g[name].setdefault(target, line)
    return g


def layer_violations(root: Path) -> list[str]:
    bad = []
    for src, targets in _graph(root).items():
        a = _layer(src)
        for dst, line in targets.items():
            b = _layer(dst)
            if b == ENTRY and a != ENTRY:
                bad.append(f"{src}:{line} imports the CLI entry {dst}")
            elif a not in (ENTRY, b) and b not in LAYERS[a]:
                bad.append(f"{src}:{line} ({a}) imports {dst} ({b})")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    g = _graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer():
    stray = [m for m in _modules(ROOT) if _layer(m) is None and m != "benchmark"]
    assert not stray, f"modules outside the layer table: {stray}"


def test_each_package_imports_only_the_layers_below_it():
    bad = layer_violations(ROOT)
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    assert not cycles(ROOT)


def test_the_checks_see_a_planted_upward_import_and_cycle(tmp_path):
    files = {"methods/__init__.py": "", "methods/m.py": "from benchmark.runner import run_job\n",
             "benchmark/__init__.py": "", "benchmark/runner.py": "",
             "benchmark/data/__init__.py": "", "benchmark/data/a.py": "def f():\n    from benchmark.data import b\n",
             "benchmark/data/b.py": "from benchmark.data.a import f\n", "benchmark/cli.py": "import slurm.local\n",
             "slurm/__init__.py": "", "slurm/local.py": "from benchmark.runner import run_job\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert layer_violations(tmp_path) == ["methods.m:1 (methods) imports benchmark.runner (benchmark.runner)"]
    assert cycles(tmp_path) == [["benchmark.data.a", "benchmark.data.b"]]


@pytest.mark.parametrize("package", ["methods", "benchmark.common", "benchmark.runs", "benchmark.engine"])
def test_importing_a_layer_loads_nothing_above_it(package):
    allowed = LAYERS[package] | {package}
    code = (f"import sys, {package}; print(sorted({{m for m in sys.modules if m.split('.')[0] in {OWN!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    above = [m for m in loaded if _layer(m) not in allowed and m != "benchmark"]
    assert not above, above
