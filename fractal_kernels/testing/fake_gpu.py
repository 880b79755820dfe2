"""A fake GPU: the package registers and launches exactly as it does on an sm_90 GPU, while each
kernel launch runs in the Triton interpreter on CPU tensors.

    from fractal_kernels.testing import fake_gpu
    fake_gpu.install()          # in a process where TRITON_INTERPRET is not set

Under it the ops are ``triton_op``s, torch.compile traces their launches through ``wrap_triton``
and torch's kernel-mutation analysis compiles each kernel to TTIR for an sm_90 target: the path
every GPU user runs, which the interpreter mode (custom ops over interpreted kernels) never
exercises. Numerics come from the interpreter, so they match the interpreter mode's.

It relies on Triton internals (the interpreter's InterpretedFunction and its language patching);
a Triton without them fails here, at install, not silently later.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.jit import JITFunction

from .. import launch

#: The target the fake GPU reports (an H100's).
TARGET = GPUTarget("cuda", 90, 32)

try:
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
except ImportError as error:  # pragma: no cover - depends on the Triton version
    raise ImportError(f"the fake GPU needs Triton's interpreter internals (triton {triton.__version__}): {error}")


class FakeDriver(DriverBase):
    """A Triton driver that reports an sm_90 CUDA target and has no device."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the fake GPU builds no launcher")

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the fake GPU times nothing")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


_interpreted: dict = {}
_stubbed = [False]
#: A function whose globals hold triton.language and its core module, so that patching the
#: language for it covers the standard-library helpers (tl.zeros, tl.sum, ...) too.
_LANGUAGE_SCOPE = types.FunctionType((lambda: None).__code__, {"tl": tl, "core": tl.core})


def _interpreter(fn) -> InterpretedFunction:
    if fn not in _interpreted:
        _interpreted[fn] = InterpretedFunction(fn)
    return _interpreted[fn]


def _run(self: JITFunction, *args, grid, warmup, **kwargs):
    """JITFunction.run: the launch, interpreted."""
    if _stubbed[0] or warmup:
        return None
    scope = _patch_lang(_LANGUAGE_SCOPE)
    try:
        return _interpreter(self.fn).run(*args, grid=grid, warmup=False, **kwargs)
    finally:
        scope.restore()


def _device_call(self: JITFunction, *args, **kwargs):
    """JITFunction.__call__: a helper called from an interpreted kernel (the language is patched)."""
    return _interpreter(self.fn).rewrite()(*args, **kwargs)


_installed = [False]


def install() -> None:
    """Makes this process a fake-GPU one (idempotent)."""
    if launch.INTERPRETING:
        raise RuntimeError("the fake GPU compiles kernels to TTIR: unset TRITON_INTERPRET before triton is imported")
    if _installed[0]:
        return
    triton.runtime.driver.set_active(FakeDriver())
    JITFunction.run = _run
    JITFunction.__call__ = _device_call
    launch._runs_on_cpu = True
    _installed[0] = True


def installed() -> bool:
    return _installed[0]


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block, kernel launches return at once: what remains is the host's own time."""
    _stubbed[0] = True
    try:
        yield
    finally:
        _stubbed[0] = False
