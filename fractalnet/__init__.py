"""FractalNet on the fused Triton ops of fractal_kernels: the model, drop-path, the paper's
configurations, anytime prediction and single-column extraction."""

from .drop_path import DropPath
from .configs import create_model, list_models, model_config
from .model import ConvUnit, FractalBlock, FractalNet

__all__ = ["ConvUnit", "DropPath", "FractalBlock", "FractalNet", "create_model", "list_models", "load",
           "model_config"]


def __getattr__(name: str):
    # fractalnet.load (a train checkpoint's model) lives with training, imported when asked for.
    if name == "load":
        from .training import load

        return load
    raise AttributeError(f"module 'fractalnet' has no attribute {name!r}")
