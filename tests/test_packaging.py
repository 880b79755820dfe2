"""The wheel a user installs: every subpackage, py.typed, the license and the metadata, one
version everywhere; installed apart from the tree, it imports and its commands run."""

import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import fractal_kernels

pytestmark = pytest.mark.either_session

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fractal_kernels", "fractalnet")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built with the setuptools at hand (no download: the GPU machines have no network).
    setuptools = pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools installed")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"pyproject.toml's build-system needs setuptools>=77, this Python has {setuptools.__version__}")
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("fractal_kernels-*.whl")
    return path


def test_every_subpackage_and_marker_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            assert init.relative_to(ROOT).as_posix() in names
        assert f"{package}/py.typed" in names
    assert "fractal_kernels/testing/fake_gpu.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_metadata_says_what_is_tested(wheel):
    archive = zipfile.ZipFile(wheel)
    (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Version"] == fractal_kernels.__version__
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert metadata["Requires-Python"] == ">=3.10"
    requires = metadata.get_all("Requires-Dist")
    assert "torch<2.14,>=2.11" in requires and any(r.startswith("triton<3.7,>=3.6") for r in requires)
    core = [r for r in requires if "extra ==" not in r]
    assert {re.split(r"[<>=;]", r)[0] for r in core} == {"torch", "triton", "numpy"}
    train = {re.split(r"[<>=;]", r)[0] for r in requires if 'extra == "train"' in r}
    assert train == {"tqdm", "matplotlib", "scikit-learn", "pillow"}
    entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    assert "fractalnet = fractalnet.cli:console" in entry_points


def test_one_version_everywhere():
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", citation, re.M).group(1) == fractal_kernels.__version__


def test_the_installed_wheel_imports_and_runs_outside_the_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import fractal_kernels, fractal_kernels.testing, fractalnet, fractalnet.training\n"
            "assert fractal_kernels.__file__.startswith(%r), fractal_kernels.__file__" % str(target))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    script = str(target / "bin" / "fractalnet")
    for command in ([script, "--version"], [sys.executable, "-m", "fractalnet", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert result.returncode == 0 and result.stdout.startswith(f"fractalnet {fractal_kernels.__version__}"), \
            result.stderr
