"""make's set-up: a Python that already has the stack (a GPU machine's image, with no network)
runs the targets from the tree as it is, downloading nothing; any other gets .venv."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.skipif(shutil.which("make") is None, reason="needs make"), pytest.mark.either_session]


def planned(*args: str) -> str:
    """The commands ``make -n ARGS`` would run (none is run), as from a shell: not the variables
    of a make that runs this suite (make test-compat's VENV and TORCH, say)."""
    inherited = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTHON", "VENV", "TORCH", "USE_PYTHON_AS_IS")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    result = subprocess.run(["make", "-n", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("target", ["test", "check", "demo"])
def test_a_python_with_the_stack_runs_as_it_is_and_downloads_nothing(target):
    commands = planned(target, f"PYTHON={sys.executable}", "USE_PYTHON_AS_IS=yes")
    assert "pip" not in commands and " venv " not in commands
    assert f"{sys.executable} -m" in commands


def test_the_suite_imports_are_what_this_python_has():
    """USE_PYTHON_AS_IS is decided by importing the suite's modules: this test's Python (which
    runs the suite) has them all, so make picks it as it is."""
    commands = planned("check", f"PYTHON={sys.executable}")
    assert "pip" not in commands and f"{sys.executable} -m pytest" in commands


def test_a_bare_python_gets_the_venv_and_pins(tmp_path):
    commands = planned("check", "PYTHON=/nonexistent/python3", f"VENV={tmp_path}/venv")
    assert f"/nonexistent/python3 -m venv {tmp_path}/venv" in commands
    assert "pip install --no-compile torch==2.13.0" in commands and "pip install --no-compile triton==3.6.0" in commands
    assert f"{tmp_path}/venv/bin/python -m compileall" in commands  # what pip no longer compiles
    assert f"{tmp_path}/venv/bin/python -m pytest" in commands


def test_compat_targets_torch_2_11_in_its_own_venv():
    commands = planned("test-compat")
    assert "VENV=.venv-compat" in commands and "TORCH=2.11.0" in commands and "USE_PYTHON_AS_IS=no" in commands
