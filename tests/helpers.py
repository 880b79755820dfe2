"""Shared test code: the device, per-dtype tolerances against fp64 references, small builders."""

import os
from pathlib import Path

import pytest
import torch

from fractal_kernels.testing import TOLERANCES, fake_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Whether the ops take the GPU's registration path (triton_op): on a GPU or the fake GPU.
GPU_PATH = torch.cuda.is_available() or fake_gpu.installed()

#: Tolerances of per-channel statistics (running mean and variance): fp32 for every storage
#: dtype but fp64 (fp64 statistics, fp64 momentum).
STAT_TOLERANCES = {
    torch.float64: TOLERANCES[torch.float64],
    torch.float32: (1e-6, 1e-6),
    torch.float16: TOLERANCES[torch.float16],
    torch.bfloat16: TOLERANCES[torch.bfloat16],
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent


def command_env() -> dict:
    """The environment of a command a test starts (fractalnet and its experiments): the tree on
    PYTHONPATH and, without a GPU, the Triton interpreter whichever session starts it. Its
    tensors are CPU ones, which the reference ops run; the GPU's registration path would only
    add its imports (torch.library.triton_op imports Inductor: 1.5 s a process)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def gpu_path_env(**extra: str) -> dict:
    """The environment of a process that runs the GPU path (a GPU's, or a fake GPU it installs):
    this one's without TRITON_INTERPRET, which a session of the interpreter sets, with ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **extra}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compares a result stored in ``dtype`` with an fp64 reference, within that dtype's tolerance."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def gradcheck(fn, inputs) -> bool:
    """torch.autograd.gradcheck in its fast mode, as PyTorch's own op tests run it: it compares
    u^T J v of random u and v, analytic against finite differences along v, instead of every
    entry of J. Every entry enters with a random weight, so a wrong one shows; it takes two
    evaluations of ``fn`` per input tensor instead of two per element, and one backward instead
    of one per output element (each a run of the kernels, interpreted on a CPU)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last else x.contiguous()


def make_inputs(sizes, sample_shape, dtype=torch.float32, channels_last=False, seed=0, spread=True):
    """Leaf inputs (requires_grad) of ``sizes[i]`` rows of ``sample_shape`` each, drawn in fp64
    and stored in ``dtype`` and layout; with ``spread`` input i is scaled by i + 1 and shifted by
    i, so that inputs differ in their statistics."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, *sample_shape, generator=gen, dtype=torch.float64) for size in sizes]
    if spread:
        xs = [x * (i + 1) + i for i, x in enumerate(xs)]
    return [to_layout(x.to(dtype), channels_last).to(DEVICE).requires_grad_() for x in xs]


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


def make_rows(sizes, batch: int, seed: int = 0) -> torch.Tensor:
    """A gather table [len(sizes), batch]: input i holds a random subset of sizes[i] of the
    samples, row j of it the j-th sample of the subset; -1 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((len(sizes), batch), -1, dtype=torch.int64)
    for i, size in enumerate(sizes):
        rows[i, torch.randperm(batch, generator=gen)[:size]] = torch.arange(size)
    return rows.to(DEVICE)
