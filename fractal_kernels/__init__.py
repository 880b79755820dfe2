"""Triton kernels for FractalNet: drop-path-aware masked join, fused BatchNorm+ReLU and the fused
join+BatchNorm+ReLU that ends every fractal column."""

from .common import count_launches
from .ops import BACKENDS, get_backend, masked_join, use_backend

__all__ = ["BACKENDS", "count_launches", "get_backend", "masked_join", "use_backend"]
__version__ = "0.1.0"
