"""The fractalnet command as a first-time user meets it: help, version, python -m, and a missing
[train] extra named in one line."""

import subprocess
import sys

import pytest
from helpers import command_env

import fractal_kernels

pytestmark = pytest.mark.either_session


def fractalnet(*argv: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m fractalnet ARGV`` from outside the tree (``prelude`` runs first, in-process)."""
    code = f"{prelude}\nimport runpy; runpy.run_module('fractalnet', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd="/",
                          env=command_env())


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []], ids=["--help", "-h", "bare"])
def test_help_describes_every_command(argv):
    result = fractalnet(*argv)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps to the terminal's width
    assert "FractalNet (Larsson, Maire, Shakhnarovich, ICLR 2017)" in text
    for command in ("train", "experiments", "depth, drop-path, anytime, deepest or all", "anytime"):
        assert command in text


def test_help_imports_no_torch():
    """The command's help comes at once: nothing imports torch (seconds) before it."""
    code = ("import runpy, sys\ntry:\n    runpy.run_module('fractalnet', run_name='__main__')\n"
            "except SystemExit:\n    print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd="/",
                            env=command_env())
    assert result.stdout.rstrip().endswith("torch imported: False"), result.stdout[-300:] + result.stderr


def test_version_is_the_package_version():
    result = fractalnet("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"fractalnet {fractal_kernels.__version__} (torch ")


def test_an_unknown_command_is_an_error():
    result = fractalnet("trian")
    assert result.returncode == 2 and "invalid choice: 'trian'" in result.stderr


@pytest.mark.parametrize("command", ["train", "experiments", "anytime"])
def test_command_help_is_plain_text(command):
    result = fractalnet(command, "--help")
    assert result.returncode == 0 and f"usage: fractalnet {command}" in result.stdout
    assert "``" not in result.stdout


@pytest.mark.parametrize("command", [["train"], ["experiments", "depth", "--out", "unused"],
                                     ["anytime", "--checkpoint", "unused.pt", "--calibrate"]])
def test_a_missing_train_extra_is_named_in_one_line(command):
    result = fractalnet(*command, prelude="import sys; sys.modules['tqdm'] = None")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fractalnet {command[0]}: error: fractalnet {command[0]} needs tqdm, which "
                                     "the [train] extra installs: pip install 'fractal-kernels[train]'")
