"""Imports: the import graph of the project's own modules has no circle (every import, at module
level or inside a function, of one module of fractal_kernels, fractalnet or benchmarks by another
is an edge; a package's implicit import when one of its modules is imported is not), and the
package imports and runs where triton is missing."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.either_session

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fractal_kernels", "fractalnet", "benchmarks")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``import a.b``, ``from a import b`` (b a module, or a
    name of package a), relative forms resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                edges.add(submodule if submodule in known else base)
    return {edge for edge in edges if edge in known and edge != name}


def test_no_import_circle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert graph["fractalnet.experiments"] >= {"fractalnet.training"}  # the scan sees what it should
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None                       # every import of triton raises ImportError
import torch
import fractal_kernels as fk
from fractal_kernels import *                      # noqa: F403 (__all__ names only what exists)
import fractalnet, fractalnet.training

assert not fk.HAS_TRITON and fk.get_backend() == "auto"
model = fractalnet.FractalNet(10, widths=(4, 8), dropout=(0.0, 0.1), columns=2)
model(torch.randn(2, 3, 8, 8)).sum().backward()
for attempt in (lambda: fk.use_backend("triton").__enter__(), lambda: fk.dropout_mask):
    try:
        attempt()
    except RuntimeError as error:
        print(error)
"""


def test_imports_and_runs_the_reference_without_triton():
    """Where triton is missing (macOS, Windows) the package imports, the model trains on the
    reference backend, and what needs Triton says so."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "FRACTAL_KERNELS_BACKEND": "auto"})
    assert result.returncode == 0, result.stderr
    messages = result.stdout.splitlines()
    assert len(messages) == 2 and all("needs triton, which is not installed" in m for m in messages), result.stdout
    assert messages[0].startswith("the Triton backend") and messages[1].startswith("fractal_kernels.dropout_mask")


def test_triton_backend_from_the_environment_without_triton_raises_on_the_first_op():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fractal_kernels as fk\nfk.masked_join([torch.ones(2)])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "FRACTAL_KERNELS_BACKEND": "triton"})
    assert result.returncode != 0
    assert "RuntimeError: the Triton backend (FRACTAL_KERNELS_BACKEND=triton) needs triton" in result.stderr
