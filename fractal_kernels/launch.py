"""Op registration and the one place every kernel of the package is launched.

Under TRITON_INTERPRET=1 the ops are opaque ``custom_op``s (an interpreted kernel cannot be traced
into a graph); otherwise they are ``triton_op``s, whose launches torch.compile traces as graph nodes
(``wrap_triton``) and analyses for the tensors each kernel writes. For that analysis to be exact,
every tensor a kernel writes is passed whole (an offset argument says where an input's rows
start, never a slice), no tensor fills two written slots, and unused slots are None.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import triton

#: Inputs per kernel launch; ops with more inputs launch once per group of this many.
MAX_INPUTS = 8
#: Register limits given to ptxas. Streaming kernels (one pass over the activations) keep two
#: 256-thread blocks resident per SM to hide memory latency: 128 registers. Reductions may take
#: all 255 (one block).
STREAMING_REGISTERS = 128
REDUCTION_REGISTERS = 255


@triton.jit
def _probe_kernel():
    pass


#: True when TRITON_INTERPRET=1 was set before triton was imported: kernels run on CPU tensors.
INTERPRETING = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)
#: Compiled kernels use triton_op where torch has it (torch >= 2.6), so that torch.compile sees
#: and schedules the Triton kernels themselves.
USE_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETING
#: Whether kernels run on CPU tensors: under the interpreter, or a fake GPU (fractal_kernels.testing).
_runs_on_cpu = INTERPRETING


def define_op(name: str, mutates_args: Sequence[str] = ()) -> Callable:
    """Registers ``fn`` as the torch.library op ``name``; ``fn`` also serves as its fake kernel.

    The launchers only allocate and launch, so on fake tensors they compute output metadata.
    Launchers name each kernel in ``wrap_triton(kernel)`` where they launch it: torch.library
    finds the kernels of a triton_op that way, and torch.compile's cache key includes their source.
    """

    def register(fn):
        if USE_TRITON_OP:
            return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))
        op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
        op.register_fake(fn)
        return op

    return register


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) (triton.cdiv costs microseconds a call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n, for n >= 1 (likewise a cheap triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length()


def input_groups(n: int) -> list[range]:
    """Splits range(n) into consecutive groups of at most MAX_INPUTS inputs (one launch each)."""
    return [range(start, min(start + MAX_INPUTS, n)) for start in range(0, n, MAX_INPUTS)]


def slots(items: Sequence, group: range) -> list:
    """The group's entries of a per-input kernel argument, padded with None to MAX_INPUTS slots."""
    return [items[i] for i in group] + [None] * (MAX_INPUTS - len(group))


def optional(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for an absent tensor: None, or the empty placeholder the ops take for it."""
    return None if t is None or t.numel() == 0 else t


@dataclass
class LaunchRecord:
    """One kernel launch as the audit sees it: the kernel, its grid and arguments."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


#: Functions ``cases(shape, dtype, channels_last, quick) -> iterable of (label, thunk)`` whose
#: thunks run op launchers on inputs of that kind (fewer variants when ``quick``); the compile
#: audit records and compiles what they launch.
AUDIT_CASES: list[Callable[..., Iterable[tuple[str, Callable[[], object]]]]] = []


def audit_cases(fn):
    """Registers an op file's audit cases (see AUDIT_CASES)."""
    AUDIT_CASES.append(fn)
    return fn


_recorders: list[list[LaunchRecord]] = []
_counters: list[list[int]] = []


@contextlib.contextmanager
def record_launches(run: bool = False) -> Iterator[list[LaunchRecord]]:
    """Records the launches made within the block; they run only with ``run`` (the compile
    audit records without running; the GPU-path checks run them too)."""
    records: list[LaunchRecord] = []
    _recorders.append((records, run))
    try:
        yield records
    finally:
        _recorders.pop()


@contextlib.contextmanager
def count_launches() -> Iterator[list[int]]:
    """Counts the Triton kernel launches made within the block: ``with count_launches() as n: ...; n[0]``.
    Launches on fake tensors count too (they would run on real ones)."""
    counter = [0]
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.pop()


def _is_plain(t: torch.Tensor) -> bool:
    return (type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not t.is_meta


def _has_no_data(t: torch.Tensor) -> bool:
    return t.is_meta or torch._subclasses.fake_tensor.is_fake(t)


def eager(x: torch.Tensor) -> bool:
    """Whether an op on x may launch through a plain autograd.Function instead of its
    torch.library op: plain tensors, and nothing tracing or intercepting ops (torch.compile, a
    dispatch mode such as fake tensors or functionalization, a functorch transform)."""
    return (_is_plain(x) and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._are_functorch_transforms_active())


def check_launchable(x: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on x's device."""
    if x.is_cuda or _recorders or torch.compiler.is_compiling() or not _is_plain(x):
        return
    if x.device.type == "cpu" and _runs_on_cpu:
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "the Triton backend runs CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use the 'reference' or 'auto' backend"
        )
    raise RuntimeError(f"the Triton backend needs CUDA tensors, got a tensor on {x.device}")


def wrap_triton(kernel):
    """The kernel, as launch() takes it. Launchers name each kernel they launch in a call of
    this name, ``launch(wrap_triton(kernel), ...)``: torch.library finds a triton_op's kernels
    by such calls (and torch.compile's cache key includes their source). The wrapping itself,
    torch.library.wrap_triton, costs microseconds a call, so launch() applies it only while
    torch traces."""
    return kernel


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launches ``kernel[grid](*args, **kwargs)`` on the device of its tensors; ``args[0]`` is a
    tensor.

    While torch traces (fake or functional tensors) the launch goes through
    torch.library.wrap_triton, which records it as a graph node; otherwise it is direct (no
    higher-order-op dispatch, nothing added to torch's kernel side table).
    """
    if _recorders:
        records, run = _recorders[-1]
        records.append(LaunchRecord(kernel, grid, args, kwargs))
        if not run:
            return
    for counter in _counters:
        counter[0] += 1
    first = args[0]
    if first.is_meta:
        return  # shapes only: nothing to run, nothing traced
    if not _is_plain(first):
        traceable = torch.library.wrap_triton(kernel)
        if traceable is not kernel:
            # Inductor launches user kernels with num_warps but no register limit.
            kwargs.pop("maxnreg", None)
            traceable[grid](*args, **kwargs)
            return
        if _has_no_data(first):
            return  # a custom op's fake kernel: only the output metadata matters
    if first.is_cuda:
        # Triton launches on the current device: make it the tensors' one.
        with torch.cuda.device(first.device):
            kernel.run(*args, grid=grid, warmup=False, **kwargs)
    else:
        kernel.run(*args, grid=grid, warmup=False, **kwargs)
