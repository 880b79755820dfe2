"""Triton kernels for FractalNet: drop-path-aware masked join, fused BatchNorm+ReLU and the fused
join+BatchNorm+ReLU that ends every fractal column."""

from .batchnorm import dropout_mask
from .launch import count_launches
from .modules import FusedBatchNormReLU2d, FusionReport, MaskedJoin, batchnorm_arguments, fuse_batchnorm_relu
from .ops import (
    BACKENDS,
    bn_relu,
    gather_join,
    gather_join_bn_relu,
    get_backend,
    join_bn_relu,
    masked_join,
    use_backend,
)
from .recompute import recompute_activations

__all__ = [
    "BACKENDS",
    "FusedBatchNormReLU2d",
    "FusionReport",
    "MaskedJoin",
    "batchnorm_arguments",
    "bn_relu",
    "count_launches",
    "dropout_mask",
    "fuse_batchnorm_relu",
    "gather_join",
    "gather_join_bn_relu",
    "get_backend",
    "join_bn_relu",
    "masked_join",
    "recompute_activations",
    "use_backend",
]
__version__ = "0.1.0"
