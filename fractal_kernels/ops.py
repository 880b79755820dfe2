"""The public ops: argument checks, backend dispatch and the torch.library composites.

Each public op checks its arguments (a ValueError or TypeError naming the argument, before any
launch), then runs either the Triton ops registered by the op files or the plain-PyTorch reference.

Backends (``FRACTAL_KERNELS_BACKEND`` or :func:`use_backend`):
  * ``auto`` (default): Triton for CUDA tensors, the reference otherwise;
  * ``triton``: always Triton; CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set
    before triton is imported);
  * ``reference``: always the reference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch

from . import join, reference
from .common import check_launchable, check_mask, check_tensor_list

BACKENDS = ("auto", "triton", "reference")


def _checked_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_backend = _checked_backend(os.environ.get("FRACTAL_KERNELS_BACKEND", "auto"), "FRACTAL_KERNELS_BACKEND")


def get_backend() -> str:
    """The current backend: 'auto', 'triton' or 'reference'."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the block with backend ``name`` ('auto', 'triton' or 'reference')."""
    global _backend
    previous, _backend = _backend, _checked_backend(name, "backend")
    try:
        yield
    finally:
        _backend = previous


def _use_triton(x: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "auto":
        return x.device.type == "cuda"
    check_launchable(x)
    return True


def masked_join(inputs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean of the inputs that survive drop-path.

    Args:
        inputs: k >= 1 tensors of one shape [B, ...], dtype and device (contiguous or channels-last
            avoid copies).
        mask: None (plain mean) or a [k, B] bool or 0/1 float tensor; input i is kept for sample b
            where mask[i, b] is nonzero.

    Returns:
        out with out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b]; 0 (and a 0 gradient) for a sample
        with no surviving input. Dropped inputs never contribute, even when they hold NaN or Inf.
    """
    inputs = check_tensor_list("inputs", inputs)
    x = inputs[0]
    if x.dim() < 1:
        raise ValueError("inputs must have a batch dimension (rank >= 1), got 0-dimensional tensors")
    check_mask(mask, len(inputs), x.shape[0], x.device)
    if _use_triton(x):
        return join.masked_join_forward(inputs, mask)
    return reference.masked_join(inputs, mask)
