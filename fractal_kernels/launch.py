"""Op registration and the one place every kernel of the package is launched.

Under TRITON_INTERPRET=1 the ops are opaque ``custom_op``s (an interpreted kernel cannot be traced
into a graph); otherwise they are ``triton_op``s, whose launches torch.compile traces as graph nodes
(``wrap_triton``) and analyses for the tensors each kernel writes. For that analysis to be exact,
every tensor a kernel writes is passed whole (an offset argument says where an input's rows
start, never a slice), no tensor fills two written slots, and unused slots are None.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import triton

from .checks import has_no_data

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


@functools.lru_cache(maxsize=None)
def input_groups(n: int) -> tuple[range, ...]:
    """Splits range(n) into consecutive groups of at most MAX_INPUTS inputs (one launch each)."""
    return tuple(range(start, min(start + MAX_INPUTS, n)) for start in range(0, n, MAX_INPUTS))


#: Tuples of n Nones, n up to MAX_INPUTS (padding, and per-input lists of absent tensors).
NONES = tuple((None,) * n for n in range(MAX_INPUTS + 1))


def slots(items: Sequence, group: range) -> tuple:
    """The group's entries of a per-input kernel argument, padded with None to MAX_INPUTS slots."""
    return (*items[group.start:group.stop], *NONES[MAX_INPUTS - len(group)])


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


_recorders: list[list[LaunchRecord]] = []
_counters: list[list[int]] = []


@contextlib.contextmanager
def record_launches(run: bool = False) -> Iterator[list[LaunchRecord]]:
    """Records the launches made within the block; they run only with ``run`` (the compile audit
    and the GPU-path checks record without running; the host benchmark runs what it records)."""
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


def runs_eagerly(x: torch.Tensor) -> bool:
    """Whether an op on x may launch through a plain autograd.Function instead of its
    torch.library op: plain tensors, and nothing tracing or intercepting ops (torch.compile, a
    dispatch mode such as fake tensors or functionalization, a functorch transform)."""
    return (_is_plain(x) and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._are_functorch_transforms_active())


def eager_apply(function: type) -> Callable:
    """The C-level apply of autograd.Function ``function``, for eager calls only (runs_eagerly):
    Function.apply's Python prologue (binding setup_context's arguments, functorch's checks and
    dead-wrapper unwrapping) costs microseconds a call and has nothing to do there, since no
    functorch transform is active and the Function defines no setup_context."""
    if function.setup_context is not torch.autograd.Function.setup_context:
        raise TypeError(f"{function.__name__} defines setup_context: its apply needs Function.apply's prologue")
    return super(torch.autograd.Function, function).apply


def check_launchable(x: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on x's device."""
    if x.is_cuda or (_runs_on_cpu and x.device.type == "cpu") or _recorders or torch.compiler.is_compiling() \
            or not _is_plain(x):
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


class DirectLaunches:
    """The compiled variants of one kernel, launched without JITFunction.run.

    JITFunction.run binds every argument, specialises each (dtype and 16-byte alignment of
    pointers; integers equal to 1, divisible by 16, and their width), builds a cache key of the
    lot and of the options, and checks the kernel's globals: tens of microseconds a launch, most
    of a small op's host time. Here the first launch of each variant goes through run, which
    compiles it and returns the CompiledKernel; later launches find that variant by a guard,
    generated for it, which tests the argument tuple for exactly the facts it was compiled for
    (the facts of _facts_function: at least as fine as Triton's specialisation, the kernel's own
    ``do_not_specialize`` honoured), and call its launcher as run does, every argument in
    parameter order (as Inductor launches user kernels). A guard is a chain of comparisons (an
    empty slot tested by identity): no tuple of facts is built or hashed. Variants
    are grouped by device (a compiled kernel's function handle belongs to one device), argument
    count and keyword arguments, whose values complete the launcher's arguments.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        params = kernel.params
        self.names = [p.name for p in params]
        #: Per parameter: specialised on alignment and value (Triton's native_specialize_impl).
        self.specialised = [not p.do_not_specialize for p in params]
        self.align = [not p.do_not_specialize_on_alignment for p in params]
        #: (device, argument count, keyword arguments) -> (the keyword arguments' values in
        #: parameter order, [(guard, compiled variant)]).
        self.variants: dict = {}
        self._facts: dict = {}  # argument count -> facts function (the first launch of a variant)

    def compiled_variants(self) -> list:
        return [compiled for _, variants in self.variants.values() for _, compiled in variants]

    def entry(self, device: int, num_args: int, kwargs: dict) -> Optional[tuple]:
        """The variants compiled for launches of ``num_args`` arguments and keyword arguments
        ``kwargs`` on ``device``: (the keyword arguments' values in parameter order, [(guard,
        compiled variant)]), or None before the first. The list grows as variants compile."""
        return self.variants.get((device, num_args, *kwargs.items()))

    @staticmethod
    def run_compiled(entry: tuple, grid: tuple, device: int, args: tuple) -> bool:
        """Launches the first variant of ``entry`` whose guard ``args`` pass, on the 3-D
        ``grid``; False where none does (a launch that needs another variant)."""
        tail, variants = entry
        for guard, compiled in variants:
            if guard(args):
                # No hook is set (_direct_launches): no launch metadata for one to read.
                compiled.run(grid[0], grid[1], grid[2], triton.runtime.driver.active.get_current_stream(device),
                             compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
                return True
        return False

    def launch(self, grid: tuple, device: int, args: tuple, kwargs: dict) -> None:
        entry = self.entry(device, len(args), kwargs)
        if entry is not None and self.run_compiled(entry, (*grid, 1, 1)[:3], device, args):
            return
        n = len(args)
        if n not in self._facts:
            self._facts[n] = _facts_function(self.specialised[:n], self.align[:n])
        facts = self._facts[n](*args)  # _NotDirect before any launch
        compiled = self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if compiled is not None and not hasattr(compiled, "result"):  # not an async compile
            if entry is None:
                entry = self.variants[(device, n, *kwargs.items())] = (
                    tuple([kwargs[name] for name in self.names[n:]]), [])
            entry[1].append((_guard_function(facts, self.specialised[:n]), compiled))


def _scalar_fact(value, specialised: bool):
    """The specialisation of a non-tensor, non-None argument: bool, float, or an int's width and,
    where specialised, whether it is 1 or divisible by 16. The facts of a 32-bit int ("=1", or
    whether it divides by 16; "i32" unspecialised) are what the generated facts compute inline."""
    kind = type(value)
    if kind is bool or kind is float:
        return kind
    if kind is int:
        if -2**31 <= value < 2**31:
            return ("=1" if value == 1 else value % 16 == 0) if specialised else "i32"
        width = "i64" if -2**63 <= value < 2**63 else "u64"
        return (width, value % 16 == 0) if specialised else width
    raise _NotDirect(f"{kind.__name__} argument")


class _NotDirect(Exception):
    """An argument the direct path does not know how Triton specialises."""


def _facts_function(specialised: list[bool], align: list[bool]) -> Callable:
    """``facts(*args)``: a tuple of the specialisation facts of each argument (see _scalar_fact;
    a tensor's dtype and, where specialised, whether its pointer is 16-byte aligned)."""
    terms = []
    for i, (spec, aligned) in enumerate(zip(specialised, align)):
        a = f"a{i}"
        tensor = f"({a}.dtype, {a}.data_ptr() % 16 == 0)" if spec and aligned else f"{a}.dtype"
        # A 32-bit int, the usual case, inline (as _scalar_fact gives it); the rest by _scalar_fact.
        small = f'("=1" if {a} == 1 else {a} % 16 == 0)' if spec else '"i32"'
        integer = f"{small} if -2147483648 <= {a} < 2147483648 else scalar({a}, {spec})"
        terms.append(f"(None if {a} is None else {tensor} if isinstance({a}, Tensor) else ({integer}) "
                     f"if type({a}) is int else scalar({a}, {spec}))")
    source = (f"def facts({', '.join(f'a{i}' for i in range(len(terms)))}):\n"
              f"    return ({', '.join(terms)}{',' if len(terms) == 1 else ''})\n")
    return _compiled_source("facts", source, {})


def _guard_function(facts: tuple, specialised: list[bool]) -> Callable[[tuple], bool]:
    """``guard(args)``: whether every argument has the facts ``facts`` (those of the arguments
    a variant was compiled for), tested one comparison after another. An empty slot is tested by
    identity: ``==`` against None (a tuple comparison too) makes a tensor in that slot raise and
    catch a C++ exception inside torch, about 10 us."""
    terms, constants = [], {}
    for i, (fact, spec) in enumerate(zip(facts, specialised)):
        a = f"a[{i}]"
        if fact is None:
            terms.append(f"{a} is None")
            continue
        small = f"type({a}) is int and -2147483648 <= {a} < 2147483648"
        if isinstance(fact, torch.dtype) or (isinstance(fact, tuple) and isinstance(fact[0], torch.dtype)):
            dtype, aligned = (fact, None) if isinstance(fact, torch.dtype) else fact
            constants[f"d{i}"] = dtype
            alignment = "" if aligned is None else f" and ({a}.data_ptr() % 16 == 0) is {aligned}"
            terms.append(f"isinstance({a}, Tensor) and {a}.dtype is d{i}{alignment}")
        elif fact is bool or fact is float:
            terms.append(f"type({a}) is {fact.__name__}")
        elif fact == "=1":
            terms.append(f"{a} == 1 and {small}")
        elif fact == "i32":
            terms.append(small)
        elif fact is True or fact is False:
            terms.append(f"{small} and {a} != 1 and ({a} % 16 == 0) is {fact}")
        else:  # a wide int's facts
            constants[f"f{i}"] = fact
            terms.append(f"type({a}) is int and not -2147483648 <= {a} < 2147483648 and scalar({a}, {spec}) == f{i}")
    source = f"def guard(a):\n    return {' and '.join(f'({t})' for t in terms) or 'True'}\n"
    return _compiled_source("guard", source, constants)


def _compiled_source(name: str, source: str, constants: dict) -> Callable:
    """The function ``name`` that ``source`` defines, with ``constants`` in its globals."""
    namespace = {"Tensor": torch.Tensor, "scalar": _scalar_fact, **constants}
    exec(source, namespace)
    return namespace[name]


_direct: dict = {}


def _direct_launches(kernel) -> Optional[DirectLaunches]:
    """The kernel's DirectLaunches, None where the direct path cannot follow this Triton (its
    JITFunction lacks what the path reads) or a launch hook is set (hooks see run's launches, with
    their metadata)."""
    # By id: a JITFunction hashes its cache key, which costs more than the lookup. An entry holds
    # its kernel, so the kernel stays alive and its id its own.
    direct = _direct.get(id(kernel))
    if direct is None:
        if not (_DIRECT_PATH and hasattr(kernel, "params")):
            return None
        direct = _direct[id(kernel)] = DirectLaunches(kernel)
    return None if _hooks_set() else direct


def _hooks_set() -> bool:
    """Whether a launch hook is set."""
    return _hooked(triton.knobs.runtime.launch_enter_hook) or _hooked(triton.knobs.runtime.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a callable, or a HookChain (Triton >= 3.5) with calls."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct_path_supported() -> bool:
    """Whether this Triton's JITFunction.run launches as DirectLaunches does (its launcher call,
    read from its source): otherwise every launch goes through run, with a warning."""
    import inspect
    import warnings

    try:
        source = inspect.getsource(triton.runtime.jit.JITFunction.run)
    except (OSError, TypeError):
        source = ""
    expected = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
                " knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())")
    if " ".join(expected.split()) in " ".join(source.split()):
        return True
    warnings.warn(f"fractal_kernels: triton {triton.__version__} launches kernels differently from what its direct "
                  "launch path expects; every launch goes through JITFunction.run (slower on the host)")
    return False


#: Whether launches skip JITFunction.run once a variant is compiled (FRACTAL_KERNELS_DIRECT_LAUNCH=0: never).
_DIRECT_PATH = (not INTERPRETING and os.environ.get("FRACTAL_KERNELS_DIRECT_LAUNCH", "1") != "0"
                and _direct_path_supported())


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launches ``kernel[grid](*args, **kwargs)`` on the device of its tensors; ``args[0]`` is a
    tensor.

    While torch traces (fake or functional tensors) the launch goes through
    torch.library.wrap_triton, which records it as a graph node; otherwise it is direct: no
    higher-order-op dispatch, nothing added to torch's kernel side table, and, once a variant is
    compiled, no JITFunction.run (DirectLaunches).
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
        # Interpreted kernels run as custom ops, opaque to tracing (torch 2.11's wrap_triton
        # refuses them; 2.13's returns them as they are).
        traceable = kernel if INTERPRETING else torch.library.wrap_triton(kernel)
        if traceable is not kernel:
            # Inductor launches user kernels with num_warps but no register limit.
            kwargs.pop("maxnreg", None)
            traceable[grid](*args, **kwargs)
            return
        if has_no_data(first):
            return  # a custom op's fake kernel: only the output metadata matters
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tensors' one.
        with torch.cuda.device(first.device):
            kernel.run(*args, grid=grid, warmup=False, **kwargs)
        return
    direct = _direct_launches(kernel)
    if direct is not None:
        device = first.device.index if first.is_cuda else triton.runtime.driver.active.get_current_device()
        try:
            direct.launch(grid, device, args, kwargs)
            return
        except _NotDirect:
            pass
    kernel.run(*args, grid=grid, warmup=False, **kwargs)


class PreparedLaunch:
    """``launch(kernel, grid, *args, **kwargs)`` with one kernel, grid and set of keyword
    arguments, prepared for a call site that launches them again and again (the single-pass
    BatchNorm kernels on small, host-bound problems): where launch() would launch a compiled
    variant directly, this finds the keyword arguments' variants once per device rather than per
    call, and launches as DirectLaunches does; anything else (recording, torch tracing, fake or
    meta tensors, a tensor on another device than the current one, a launch hook, a variant not
    compiled yet) goes through launch() itself."""

    def __init__(self, kernel, grid: tuple, kwargs: dict):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self._grid_xyz = (*grid, 1, 1)[:3]
        #: (device, argument count) -> DirectLaunches.entry of these keyword arguments.
        self._entries: dict = {}

    def __call__(self, *args) -> None:
        first = args[0]
        if _DIRECT_PATH and not _recorders and _is_plain(first) and not _hooks_set():
            device = triton.runtime.driver.active.get_current_device()
            if not first.is_cuda or first.get_device() == device:
                key = (device, len(args))
                entry = self._entries.get(key)
                if entry is not None and DirectLaunches.run_compiled(entry, self._grid_xyz, device, args):
                    for counter in _counters:
                        counter[0] += 1
                    return
                launch(self.kernel, self.grid, *args, **self.kwargs)
                direct = _direct.get(id(self.kernel))
                entry = direct and direct.entry(device, len(args), self.kwargs)
                if entry is not None:
                    self._entries[key] = entry
                return
        launch(self.kernel, self.grid, *args, **self.kwargs)
