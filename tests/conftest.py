"""Test set-up: without a GPU every kernel runs in the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported (importing torch does not import it).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Absolute and relative tolerances against an fp64 reference, per storage dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compares a result stored in ``dtype`` with an fp64 reference, within that dtype's tolerance."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last else x.contiguous()


def train_step(model, x, seed=5, **kwargs):
    """Output and parameter gradients of one training forward/backward with a seeded RNG."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x, **kwargs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def freeze_batchnorm(model):
    """Training mode, but every BatchNorm uses (and keeps) its running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
