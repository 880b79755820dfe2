"""The ``fractalnet`` command (also ``python -m fractalnet``): ``fractalnet train [options]``,
``fractalnet experiments EXPERIMENT [options]`` and ``fractalnet anytime --checkpoint PATH ...``.

Apart from both commands' modules, so that neither imports the other's (experiments builds on
train; train knows nothing of experiments), and importing them only for their own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .extras import installed_version

#: Each command and the module whose main(argv) runs it.
COMMANDS = {"train": "fractalnet.train", "experiments": "fractalnet.experiments", "anytime": "fractalnet.anytime_cli"}

DESCRIPTION = """FractalNet (Larsson, Maire, Shakhnarovich, ICLR 2017) on the fused Triton kernels of
fractal-kernels: train it, rerun the paper's experiments, and serve its sub-networks within a
latency budget."""

EPILOG = """examples:
  fractalnet train --dataset digits --widths 32,64,128 --dropout 0,0.1,0.2 --image-size 16 --epochs 30
  fractalnet train --dataset cifar10 --data ~/data --amp bf16 --channels-last
  fractalnet experiments all --dataset digits --out runs/experiments
  fractalnet anytime --checkpoint runs/demo/last.pt --calibrate
  fractalnet anytime --checkpoint runs/demo/last.pt --budget-ms 0.5,2

'fractalnet COMMAND --help' lists a command's options."""


def version() -> str:
    """This package's version, and the torch and triton it runs on."""
    import torch

    from fractal_kernels import __version__

    triton = installed_version("triton") or "not installed"
    return f"fractalnet {__version__} (torch {torch.__version__}, triton {triton})"


class VersionAction(argparse.Action):
    """--version, which imports torch only when asked (argparse's own takes the text up front)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help="show the versions and exit"):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalnet", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=VersionAction)
    commands = p.add_subparsers(title="commands", metavar="COMMAND")
    commands.add_parser("train", help="train and evaluate a FractalNet (the paper's recipe by default)")
    commands.add_parser("experiments", help="the paper's experiments: depth, drop-path, anytime, deepest or all")
    commands.add_parser("anytime", help="calibrate each sub-network of a trained model; serve within a latency budget")
    return p


def console(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    p = parser()
    if not argv:
        p.print_help()
        return 0
    p.parse_args(argv)  # --help and --version exit here; anything else is an error (exit 2)
    return 2


if __name__ == "__main__":
    sys.exit(console())
