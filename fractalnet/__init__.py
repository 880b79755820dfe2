"""FractalNet on the fused Triton ops of fractal_kernels: the model, drop-path, the paper's
configurations, anytime prediction and single-column extraction."""

from .drop_path import DropPath
from .model import ConvUnit, FractalBlock, FractalNet, create_model, list_models, model_config

__all__ = ["ConvUnit", "DropPath", "FractalBlock", "FractalNet", "create_model", "list_models", "model_config"]
