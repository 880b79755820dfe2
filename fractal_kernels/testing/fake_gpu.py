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


class FakeCompiledKernel:
    """What JITFunction.run compiles on the fake GPU, in the place of a CompiledKernel: the same
    launcher call (``run(grid_0, grid_1, grid_2, stream, function, packed_metadata,
    launch_metadata, enter_hook, exit_hook, *args)``, every argument in parameter order), which
    runs the kernel in the interpreter; under ``stubbed_launches`` it only reads the pointer of
    each pointer argument of its signature, as the C launcher does, and returns."""

    function = 0
    packed_metadata = ()

    def __init__(self, kernel: JITFunction, key, signature: dict):
        self.kernel = kernel
        #: Triton's cache key of this variant (its specialisation and options).
        self.key = key
        self.pointers = [i for i, ty in enumerate(signature.values()) if ty.startswith("*")]

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        if _stubbed[0]:
            for i in self.pointers:
                args[i].data_ptr()
            return
        scope = _patch_lang(_LANGUAGE_SCOPE)
        try:
            _interpreter(self.kernel.fn).run(*args, grid=(grid_0, grid_1, grid_2), warmup=False)
        finally:
            scope.restore()


def _compile(self: JITFunction, key, signature, device, constexprs, options, attrs, warmup):
    """JITFunction._do_compile: a FakeCompiledKernel, cached under Triton's own key."""
    kernel = FakeCompiledKernel(self, key, signature)
    self.device_caches[device][0][key] = kernel
    return kernel


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
    JITFunction._do_compile = _compile
    JITFunction.__call__ = _device_call
    launch.run_kernels_on_cpu()
    _installed[0] = True


def installed() -> bool:
    return _installed[0]


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block, kernel launches go through Triton's launch path up to the C launcher,
    which only reads the tensors' pointers: what remains is the host's own time."""
    _stubbed[0] = True
    try:
        yield
    finally:
        _stubbed[0] = False
