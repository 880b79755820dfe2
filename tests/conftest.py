"""Test set-up: the mode the kernels run in, chosen before triton is imported.

  * with a CUDA GPU: compiled kernels on it;
  * on the fake GPU of fractal_kernels.testing (the GPU's registration and compile path, every
    launch run by the interpreter): with FRACTAL_KERNELS_FAKE_GPU=1, with ``-m fake_gpu``, or
    when every test file the session is given is marked ``fake_gpu`` (a file run alone runs);
  * otherwise: the Triton interpreter on CPU tensors (TRITON_INTERPRET=1; importing torch does not
    import triton).

Markers (pytest.ini) say which session a test belongs to: ``fake_gpu`` tests run on the GPU's
registration and launch path and skip, saying so, in the interpreter; ``both_sessions`` tests run in each
session of `make test`; ``either_session`` tests run no kernel of their session's own, and `make
test` runs them once, on the fake GPU's side.
"""

import ast
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# A fresh Inductor cache for each session: torch.compile's FX graph cache keys on the kernels'
# source but not on the ops' fake functions, so one left by an older checkout replays outputs of
# stale shapes.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fractal-kernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def marked_fake_gpu(path: Path) -> bool:
    """Whether the test file at ``path`` marks all its tests fake_gpu (``pytestmark``), read
    without importing it (triton must not be imported before the mode is chosen)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
               and "fake_gpu" in ast.unparse(node.value) for node in tree.body)


def wants_fake_gpu(config) -> bool:
    if os.environ.get("FRACTAL_KERNELS_FAKE_GPU") == "1" or config.option.markexpr.strip() == "fake_gpu":
        return True
    files = [Path(str(arg).split("::")[0]) for arg in config.args]
    return bool(files) and all(path.suffix == ".py" and marked_fake_gpu(path) for path in files)


def pytest_configure(config):
    if torch.cuda.is_available():
        return
    if wants_fake_gpu(config):
        from fractal_kernels.testing import fake_gpu

        fake_gpu.install()
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from helpers import GPU_PATH

    if GPU_PATH:
        return
    skip = pytest.mark.skip(reason="runs on the GPU's registration and launch path: run it on a GPU, run its file "
                                   "alone, or set FRACTAL_KERNELS_FAKE_GPU=1 (the second session of make test)")
    for item in items:
        if item.get_closest_marker("fake_gpu"):
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with torch.compile's caches reset (the cases share code
    objects, so caches would hit recompile limits)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
