"""Which backend runs the ops, and whether Triton is there at all.

Backends (``FRACTAL_KERNELS_BACKEND`` or :func:`use_backend`):
  * ``auto`` (default): Triton for CUDA tensors, the reference otherwise;
  * ``triton``: always Triton; CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set
    before triton is imported);
  * ``reference``: always the plain-PyTorch reference.

Where triton cannot be imported (macOS, Windows), ``auto`` runs the reference on every device
and asking for ``triton`` raises.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

try:
    import triton  # noqa: F401  (imported here once: whether the Triton backend exists)
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

BACKENDS = ("auto", "triton", "reference")


def require_triton(what: str) -> None:
    """Raises a RuntimeError saying that ``what`` needs triton, where triton is missing."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs triton, which is not installed (it runs on Linux: pip install triton); "
                           "the reference backend runs without it")


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
    name = _checked_backend(name, "backend")
    if name == "triton":
        require_triton("the Triton backend")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the Triton kernels under the current backend (checking, for
    ``triton``, that they can run on x's device). Every op asks, once per call."""
    if _backend == "reference":
        return False
    if _backend == "auto":
        return HAS_TRITON and x.device.type == "cuda"
    require_triton("the Triton backend (FRACTAL_KERNELS_BACKEND=triton)")
    check_launchable(x)
    return True


if HAS_TRITON:  # imported once, not on every call of use_triton (launch needs triton)
    from .launch import check_launchable
