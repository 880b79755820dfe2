"""Triton kernels for FractalNet: drop-path-aware masked join, fused BatchNorm+ReLU and the fused
join+BatchNorm+ReLU that ends every fractal column."""

from .backends import BACKENDS, HAS_TRITON, get_backend, require_triton, use_backend
from .modules import FusedBatchNormReLU2d, FusionReport, MaskedJoin, batchnorm_arguments, fuse_batchnorm_relu
from .ops import bn_relu, gather_join, gather_join_bn_relu, join_bn_relu, masked_join
from .recompute import recompute_activations

#: What only the Triton backend provides: without triton these names raise on use.
_TRITON_ONLY = ("count_launches", "dropout_mask")
if HAS_TRITON:
    from .batchnorm import dropout_mask as dropout_mask
    from .launch import count_launches as count_launches

__all__ = [
    "BACKENDS",
    "FusedBatchNormReLU2d",
    "HAS_TRITON",
    "FusionReport",
    "MaskedJoin",
    "batchnorm_arguments",
    "bn_relu",
    "fuse_batchnorm_relu",
    "gather_join",
    "gather_join_bn_relu",
    "get_backend",
    "join_bn_relu",
    "masked_join",
    "recompute_activations",
    "use_backend",
    *(_TRITON_ONLY if HAS_TRITON else ()),
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _TRITON_ONLY:
        require_triton(f"fractal_kernels.{name}")
    raise AttributeError(f"module 'fractal_kernels' has no attribute {name!r}")
