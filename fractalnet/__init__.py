"""FractalNet on the fused Triton ops of fractal_kernels: the model, drop-path, the paper's
configurations, anytime prediction and single-column extraction.

Each name is imported from its module when first asked for, so that ``import fractalnet`` (and
the ``fractalnet`` command's help) costs no torch import."""

import importlib
from typing import TYPE_CHECKING

#: Each public name and the module of this package that defines it.
_MODULES = {"ConvUnit": "model", "DropPath": "drop_path", "FractalBlock": "model", "FractalNet": "model",
            "create_model": "configs", "list_models": "configs", "load": "training", "model_config": "configs"}

__all__ = ["ConvUnit", "DropPath", "FractalBlock", "FractalNet", "create_model", "list_models", "load",
           "model_config"]

if TYPE_CHECKING:
    from .configs import create_model, list_models, model_config
    from .drop_path import DropPath
    from .model import ConvUnit, FractalBlock, FractalNet
    from .training import load


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'fractalnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
