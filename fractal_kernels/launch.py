"""The one place every kernel of the package is launched: ``Kernel``, a wrapper of a
``@triton.jit`` kernel (as FlagGems' LibEntry) whose launch sites read
``wrap_triton(kernel)[grid](*args, **meta)``.

A launch goes through one gate: recorded (the compile audit) or counted; while torch traces (fake
or functional tensors) through torch.library.wrap_triton, which records it as a graph node; on
meta tensors nowhere. Otherwise it is direct: once a variant is compiled, no JITFunction.run (see
Kernel). For torch's analysis of the tensors each kernel writes to be exact, every tensor a
kernel writes is passed whole (an offset argument says where an input's rows start, never a
slice), no tensor fills two written slots, and unused slots are None.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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
_kernels_run_on_cpu = [INTERPRETING]


def run_kernels_on_cpu() -> None:
    """Lets the Triton backend take CPU tensors: under the interpreter (set at import), or a
    fake GPU (fractal_kernels.testing.fake_gpu), whose launches run interpreted."""
    _kernels_run_on_cpu[0] = True


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


@dataclass
class LaunchRecord:
    """One kernel launch as the audit sees it: the kernel (a JITFunction), its grid and arguments."""

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


#: The plain tensor types (is_plain runs a few times for every op call: no attribute lookups).
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def is_plain(t: torch.Tensor) -> bool:
    """Whether t is a plain tensor (or parameter) with data: no subclass, no meta tensor."""
    return type(t) in _PLAIN_TYPES and not t.is_meta


def check_launchable(x: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on x's device."""
    if x.is_cuda or (_kernels_run_on_cpu[0] and x.is_cpu) or _recorders \
            or torch.compiler.is_compiling() or not is_plain(x):
        return
    if x.is_cpu:
        raise RuntimeError(
            "the Triton backend runs CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use the 'reference' or 'auto' backend"
        )
    raise RuntimeError(f"the Triton backend needs CUDA tensors, got a tensor on {x.device}")


def wrap_triton(kernel: Kernel) -> Kernel:
    """The kernel itself. Launch sites read ``wrap_triton(kernel)[grid](...)``, the idiom of
    torch.library: torch finds a triton_op's kernels by such calls (and torch.compile's cache
    key includes their source). torch.library.wrap_triton itself costs microseconds a call, so
    a Kernel applies it only while torch traces."""
    return kernel


class Kernel:
    """A ``@triton.jit`` kernel (``fn``) as the package launches it: ``kernel[grid](*args, **meta)``.

    Every launch passes one gate (Kernel.launch): recording, counting, torch tracing, meta and
    fake tensors, the tensors' device. Past it, the compiled variants launch without
    JITFunction.run, which binds every argument, specialises each (dtype and 16-byte alignment
    of pointers; integers equal to 1, divisible by 16, and their width), builds a cache key of
    the lot and of the options, and checks the kernel's globals: tens of microseconds a launch,
    most of a small op's host time. The first launch of each variant goes through run, which
    compiles it and returns the CompiledKernel; later launches find that variant by a guard,
    generated for it, which tests the argument tuple for exactly the facts it was compiled for
    (_facts_function: at least as fine as Triton's specialisation, the kernel's own
    ``do_not_specialize`` honoured), and call its launcher as run does, every argument in
    parameter order (as Inductor launches user kernels). A guard is a chain of comparisons (an
    empty slot tested by identity): no tuple of facts is built or hashed. Variants are kept per
    device (a compiled kernel's function handle belongs to one device), argument count and
    keyword arguments, whose values complete the launcher's arguments. Where this Triton's run
    launches otherwise (``DIRECT``), a launch hook is set, or an argument is of a kind the guards
    do not know, the launch goes through run.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        params = getattr(fn, "params", ())
        self._names = [p.name for p in params]
        #: Per parameter: specialised on alignment and value (Triton's native_specialize_impl).
        self._specialised = [not p.do_not_specialize for p in params]
        self._align = [not p.do_not_specialize_on_alignment for p in params]
        #: (device, argument count, *keyword names, *their values) -> (the keyword arguments'
        #: values in parameter order, [(guard, compiled variant)]).
        self.variants: dict = {}
        self._facts: dict = {}  # argument count -> facts function (the first launch of a variant)

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return functools.partial(self.launch, grid)  # called in C: no frame of its own

    def __call__(self, *args, **kwargs):
        """As the kernel's own call (which Triton allows inside a kernel only): callable with a
        ``fn``, a Kernel is what torch.library takes for a wrapped JITFunction."""
        return self.fn(*args, **kwargs)

    def compiled_variants(self) -> list:
        return [compiled for _, variants in self.variants.values() for _, compiled in variants]

    def launch(self, grid: tuple, /, *args, **kwargs) -> None:
        """``kernel[grid](*args, **kwargs)`` (``args[0]`` a tensor), through the gate described
        in the class docstring."""
        if _recorders:
            records, run = _recorders[-1]
            records.append(LaunchRecord(self.fn, grid, args, kwargs))
            if not run:
                return
        for counter in _counters:
            counter[0] += 1
        first = args[0]
        if not is_plain(first):
            self._launch_traced(grid, args, kwargs)
            return
        if DIRECT and not _hooks_set():
            device = triton.runtime.driver.active.get_current_device()
            if not first.is_cuda or first.get_device() == device:
                self.launch_direct(device, grid, args, kwargs)
                return
        if first.is_cuda and first.get_device() != torch.cuda.current_device():
            # Triton launches on the current device: make it the tensors' one.
            with torch.cuda.device(first.device):
                self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            return
        self.fn.run(*args, grid=grid, warmup=False, **kwargs)

    def launch_direct(self, device: int, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Launches the compiled variant whose guard ``args`` pass; through run where none does."""
        key = (device, len(args), *kwargs, *kwargs.values())  # flat: no pair built and hashed per keyword
        entry = self.variants.get(key)
        if entry is not None:
            tail, variants = entry
            for guard, compiled in variants:
                try:
                    matched = guard(*args)
                except AttributeError:  # no tensor where the variant has one (its dtype is read unchecked)
                    matched = False
                if matched:
                    # No hook is set: no launch metadata for one to read.
                    grid_xyz = (*grid, 1, 1)
                    compiled.run(grid_xyz[0], grid_xyz[1], grid_xyz[2],
                                 triton.runtime.driver.active.get_current_stream(device), compiled.function,
                                 compiled.packed_metadata, None, None, None, *args, *tail)
                    return
        self._compile_variant(key, grid, args, kwargs)

    def _launch_traced(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        """A launch on fake, functional or meta tensors: a graph node while torch traces,
        nothing otherwise (shapes only)."""
        if args[0].is_meta:
            return
        # Interpreted kernels run as custom ops, opaque to tracing (torch 2.11's wrap_triton
        # refuses them; 2.13's returns them as they are).
        traceable = self.fn if INTERPRETING else torch.library.wrap_triton(self.fn)
        if traceable is not self.fn:
            # Inductor launches user kernels with num_warps but no register limit.
            kwargs = {name: value for name, value in kwargs.items() if name != "maxnreg"}
            traceable[grid](*args, **kwargs)
        elif not has_no_data(args[0]):
            self.fn.run(*args, grid=grid, warmup=False, **kwargs)

    def _compile_variant(self, key: tuple, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Launches through run, which compiles (or finds) the variant, and keeps it with its guard."""
        n = len(args)
        try:
            if n not in self._facts:
                self._facts[n] = _facts_function(self._specialised[:n], self._align[:n])
            facts = self._facts[n](*args)
        except _NotDirect:
            facts = None
        compiled = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        if facts is not None and compiled is not None and not hasattr(compiled, "result"):  # not an async compile
            entry = self.variants.get(key)
            if entry is None:
                entry = self.variants[key] = (tuple([kwargs[name] for name in self._names[n:]]), [])
            entry[1].append((_guard_function(facts, self._specialised[:n]), compiled))


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


def _guard_function(facts: tuple, specialised: list[bool]) -> Callable[..., bool]:
    """``guard(*args)``: whether every argument has the facts ``facts`` (those of the arguments
    a variant was compiled for), tested one comparison after another. An empty slot is tested by
    identity: ``==`` against None (a tuple comparison too) makes a tensor in that slot raise and
    catch a C++ exception inside torch, about 10 us. A tensor's dtype is read without an
    isinstance (which costs as much again): where no tensor is, the guard raises AttributeError,
    which the caller takes for a mismatch."""
    # Empty slots first, then scalars, then tensors: variants of one key mostly differ in which
    # slots are empty (running statistics, a mask), which an identity test tells cheaply; a
    # tensor's dtype and pointer cost hundreds of instructions each.
    empty, terms, tensors, constants = [], [], [], {}
    for i, (fact, spec) in enumerate(zip(facts, specialised)):
        a = f"a{i}"
        if fact is None:
            empty.append(f"{a} is None")
            continue
        small = f"type({a}) is int and -2147483648 <= {a} < 2147483648"
        if isinstance(fact, torch.dtype) or (isinstance(fact, tuple) and isinstance(fact[0], torch.dtype)):
            dtype, aligned = (fact, None) if isinstance(fact, torch.dtype) else fact
            constants[f"d{i}"] = dtype
            alignment = "" if aligned is None else f" and ({a}.data_ptr() % 16 == 0) is {aligned}"
            tensors.append(f"{a}.dtype is d{i}{alignment}")
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
    parameters = ", ".join(f"a{i}" for i in range(len(facts)))  # locals: no tuple indexed per test
    test = " and ".join(f"({t})" for t in empty + terms + tensors) or "True"
    source = f"def guard({parameters}):\n    return {test}\n"
    return _compiled_source("guard", source, constants)


def _compiled_source(name: str, source: str, constants: dict) -> Callable:
    """The function ``name`` that ``source`` defines, with ``constants`` in its globals."""
    namespace = {"Tensor": torch.Tensor, "scalar": _scalar_fact, **constants}
    exec(source, namespace)
    return namespace[name]


def _hooks_set(runtime=triton.knobs.runtime) -> bool:
    """Whether a launch hook is set (on Triton's one runtime knobs object, bound once): a
    callable, or a HookChain (Triton >= 3.5) with calls. One call: this runs every launch."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter is not None)) or bool(getattr(leave, "calls", leave is not None))


def _direct_path_supported() -> bool:
    """Whether this Triton's JITFunction.run launches as Kernel does (its launcher call,
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
DIRECT = (not INTERPRETING and os.environ.get("FRACTAL_KERNELS_DIRECT_LAUNCH", "1") != "0"
          and _direct_path_supported())
