"""Pieces shared by every op: input checks, layouts, tiling, op registration and kernel launch.

Written once here so that each op file (join.py, batchnorm.py, join_bn_relu.py, gather.py) reads
top to bottom as kernels, launcher, op and autograd.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

#: Inputs per kernel launch; ops with more inputs launch once per group of this many.
MAX_INPUTS = 8

#: Storage dtypes the kernels accept (fp64 is for gradcheck; it accumulates in fp64).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Input checks: clear ValueError/TypeError naming the argument, raised before any launch.
# ----------------------------------------------------------------------------------------------


def check_tensor_list(name: str, tensors, *, min_len: int = 1, same_batch: bool = True) -> list[torch.Tensor]:
    """Checks that ``tensors`` is a list/tuple of at least ``min_len`` tensors of one shape (but
    for the batch size when not ``same_batch``), dtype and device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    if len(tensors) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} tensor(s), got {len(tensors)}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    if not tensors:
        return []
    first = tensors[0]
    if first.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}[0] must have a floating dtype in {FLOAT_DTYPES}, got {first.dtype}")
    for i, t in enumerate(tensors[1:], 1):
        if t.dim() != first.dim() or t.shape[int(not same_batch):] != first.shape[int(not same_batch):]:
            like = f"[B_{i}, {', '.join(map(str, first.shape[1:]))}]" if not same_batch else str(tuple(first.shape))
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {like} like {name}[0]")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {first.dtype} like {name}[0]")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, expected {first.device} like {name}[0]")
    return list(tensors)


def check_mask(mask: Optional[torch.Tensor], num_inputs: int, batch: int, device: torch.device) -> None:
    """Checks a drop-path mask: None, or a [num_inputs, batch] bool or 0/1 float tensor on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool or a 0/1 floating tensor, got {mask.dtype}")
    if tuple(mask.shape) != (num_inputs, batch):
        raise ValueError(f"mask must have shape [num_inputs, batch] = {[num_inputs, batch]}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, expected {device} like the inputs")


def check_rows(rows, inputs: Sequence[torch.Tensor]) -> None:
    """Checks a gather table: integer [k, B] on the inputs' device, with rows[i, b] in
    [-1, B_i) (one device-to-host read of the check's result)."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a tensor, got {type(rows).__name__}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rows must be an int32 or int64 tensor, got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] != len(inputs):
        raise ValueError(f"rows must have shape [num_inputs, batch] = [{len(inputs)}, B], got {list(rows.shape)}")
    if rows.device != inputs[0].device:
        raise ValueError(f"rows is on {rows.device}, expected {inputs[0].device} like the inputs")
    if torch.compiler.is_compiling():
        return  # the range check reads a value: not while tracing
    sizes = torch.tensor([x.shape[0] for x in inputs], device=rows.device)[:, None]
    if rows.numel() and bool(((rows < -1) | (rows >= sizes)).any()):
        raise ValueError("rows[i, b] must be -1 or a row of inputs[i] (0 <= row < inputs[i].shape[0])")


def bool_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as bool (float masks are compared with 0): the kernels read one byte per entry."""
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


def check_channel_param(name: str, t: Optional[torch.Tensor], channels: int, x: torch.Tensor) -> None:
    """Checks an optional per-channel parameter or statistic: 1-D of ``channels`` floats on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}] (one value per channel), got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected {x.device} like the input")


def check_bn_input(name: str, x: torch.Tensor, training: bool) -> None:
    """Checks a BatchNorm input: [N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]."""
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"{name} must have 2 to 5 dimensions [N, C, ...], got shape {list(x.shape)}")
    if training and x.numel() // max(x.shape[1], 1) <= 1:
        # The same message F.batch_norm gives.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is dense channels-last (NHWC or NDHWC) and not also plain contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is contiguous or channels-last; otherwise a contiguous copy."""
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a dense x: channels-last (4-D or 5-D) or contiguous."""
    if is_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def new_rows(x: torch.Tensor, rows: int, zero: bool = False) -> torch.Tensor:
    """A tensor like dense x (dtype, device, layout) but with ``rows`` rows; uninitialised unless ``zero``."""
    shape = (rows,) + tuple(x.shape[1:])
    out = x.new_zeros(shape) if zero else x.new_empty(shape)
    return out.contiguous(memory_format=memory_format(x))


def dense_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in one dense layout: the first input's if it is contiguous or channels-last
    (inputs may differ in their batch size)."""
    first = dense(inputs[0])
    layout = memory_format(first)
    return [first] + [x if x.is_contiguous(memory_format=layout) else x.contiguous(memory_format=layout) for x in inputs[1:]]


#: How a kernel joins its inputs (a constexpr): the plain mean, a bool drop-path mask [k, B], or
#: a gather table [k, B] holding the row of input i that carries sample b (-1 for none).
JOIN_MEAN, JOIN_MASK, JOIN_GATHER = 0, 1, 2


def join_args(dummy: torch.Tensor, mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> tuple:
    """Kernel arguments (pointer, stride over inputs, stride over samples) and the JOIN mode of a
    join given by a mask, by a gather table, or by neither."""
    if rows is not None:
        return (rows, rows.stride(0), rows.stride(1)), JOIN_GATHER
    mask = bool_mask(mask)
    if mask is None:
        return (dummy, 0, 0), JOIN_MEAN
    return (mask, mask.stride(0), mask.stride(1)), JOIN_MASK


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: fp64 for fp64 storage, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def placeholder(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor standing for an absent optional (custom ops take list[Tensor], not list[Optional])."""
    return x.new_empty(0)


def present(t: torch.Tensor) -> bool:
    return t.numel() > 0


def bitmask(flags: Sequence[bool]) -> int:
    """Packs per-input flags into one constexpr int, bit i for input i."""
    return sum(1 << i for i, flag in enumerate(flags) if flag)


def groups(n: int, size: int = MAX_INPUTS) -> list[range]:
    """Splits range(n) into consecutive groups of at most ``size`` inputs (one launch each)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def pad(items: Sequence, length: int = MAX_INPUTS) -> list:
    """Pads a per-input argument list to the kernel's fixed arity by repeating its first entry."""
    return list(items) + [items[0]] * (length - len(items))


# ----------------------------------------------------------------------------------------------
# Tiling of per-channel kernels
# ----------------------------------------------------------------------------------------------

#: Elements per tile of the per-channel kernels (8 warps: 8 values a thread).
TILE = 2048
#: The register limit given to ptxas, which otherwise may cap a 256-thread program so low
#: (40 registers) that it spills.
MAX_REGISTERS = 255
#: Programs to aim for; the grid covers a GPU several times over (H100 has 132 SMs).
_TARGET_PROGRAMS_GPU = 4 * 132
#: The interpreter runs programs one after another: fewer, larger ones are faster.
_TARGET_PROGRAMS_INTERPRETER = 8


@dataclass(frozen=True)
class ChannelTiling:
    """How a per-channel kernel covers x viewed as [N, C, HW].

    Programs form a (channel blocks) x (chunks) grid; the tiles of one channel block, numbered
    n-block-major, are dealt to chunks in runs of ``tiles_per_chunk``. Every per-channel kernel of
    one call uses the same tiling, so partial statistics line up chunk for chunk.
    """

    N: int
    C: int
    HW: int
    channels_last: bool
    index_64: bool
    plane: int
    BLOCK_N: int
    BLOCK_C: int
    BLOCK_HW: int
    num_warps: int
    hw_blocks: int
    tiles_per_chunk: int
    num_chunks: int

    @property
    def grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.C, self.BLOCK_C), self.num_chunks)

    @property
    def count(self) -> int:
        """Elements per channel."""
        return self.N * self.HW

    def block_args(self) -> tuple[int, ...]:
        """Kernel arguments after the row count: (C, HW, hw_blocks, tiles_per_chunk)."""
        return (self.C, self.HW, self.hw_blocks, self.tiles_per_chunk)

    def meta(self) -> dict:
        """The tiling's constexprs and launch options."""
        return dict(
            CHANNELS_LAST=self.channels_last, INDEX_64=self.index_64, PLANE=self.plane,
            BLOCK_N=self.BLOCK_N, BLOCK_C=self.BLOCK_C, BLOCK_HW=self.BLOCK_HW, num_warps=self.num_warps,
            maxnreg=MAX_REGISTERS,
        )


def _pow2_at_most(n: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(n, 1)), cap))


def channel_tiling(x: torch.Tensor, num_inputs: int = 1) -> ChannelTiling:
    """The tiling of [N, C, *spatial] tensors, contiguous or channels-last, for a kernel that
    handles ``num_inputs`` of them at once (more than four get half-size tiles: registers)."""
    N, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    channels_last = is_channels_last(x)
    # Kernels over more than four inputs keep more per-input state, and fp64 values take two
    # registers: half the elements a thread.
    per_thread = 8 if min(num_inputs, MAX_INPUTS) <= 4 and x.element_size() <= 4 else 4
    tile = TILE * per_thread // 8
    if channels_last:
        # Channels are the contiguous axis: a tile spans 128 bytes of them (wider costs
        # registers for the per-channel parameters), then positions, then samples.
        BLOCK_C = _pow2_at_most(C, 128 // x.element_size())
        BLOCK_HW = _pow2_at_most(HW, tile // BLOCK_C)
        BLOCK_N = _pow2_at_most(N, tile // (BLOCK_C * BLOCK_HW))
    else:
        # Positions are the contiguous axis. Small planes (late blocks: 2x2, 1x1) keep runs of
        # 32 elements per sample by stacking channels; a small batch leaves room for more.
        BLOCK_HW = _pow2_at_most(HW, tile)
        BLOCK_N = _pow2_at_most(N, tile // (BLOCK_HW * max(1, 32 // BLOCK_HW)))
        BLOCK_C = _pow2_at_most(C, tile // (BLOCK_HW * BLOCK_N))
    # A small tile gets fewer warps rather than idle lanes.
    num_warps = max(1, min(8, BLOCK_N * BLOCK_C * BLOCK_HW // (32 * per_thread)))
    hw_blocks = triton.cdiv(HW, BLOCK_HW)
    tiles = max(1, triton.cdiv(N, BLOCK_N) * hw_blocks)
    c_blocks = triton.cdiv(C, BLOCK_C)
    target = _TARGET_PROGRAMS_INTERPRETER if x.device.type == "cpu" else _target_programs(x.device)
    chunks = max(1, min(tiles, triton.cdiv(target, c_blocks)))
    tiles_per_chunk = triton.cdiv(tiles, chunks)
    num_chunks = triton.cdiv(tiles, tiles_per_chunk)
    index_64 = x.numel() >= 2**31
    # Small NCHW planes (1x1, 2x2 in late blocks) are compile-time constants: aligned wide loads.
    plane = HW if not channels_last and HW in (1, 2, 4, 8) else 0
    return ChannelTiling(
        N, C, HW, channels_last, index_64, plane, BLOCK_N, BLOCK_C, BLOCK_HW, num_warps, hw_blocks, tiles_per_chunk,
        num_chunks,
    )


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _TARGET_PROGRAMS_GPU


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Device-side helpers shared by the kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The i-th of eight per-input kernel arguments; i is a compile-time constant."""
    if i == 0:
        return p0
    elif i == 1:
        return p1
    elif i == 2:
        return p2
    elif i == 3:
        return p3
    elif i == 4:
        return p4
    elif i == 5:
        return p5
    elif i == 6:
        return p6
    else:
        return p7


@triton.jit
def welford_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, sum of squared deviations, count) partials; counts are floats."""
    n = n_a + n_b
    frac_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * n_a * frac_b, n


@triton.jit
def _probe_kernel():
    pass


# ----------------------------------------------------------------------------------------------
# Op registration and kernel launch
# ----------------------------------------------------------------------------------------------

#: True when TRITON_INTERPRET=1 was set before triton was imported: kernels run on CPU tensors.
INTERPRETING = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)

# Interpreted kernels cannot be traced into an Inductor graph, so under the interpreter the ops
# are opaque custom ops; compiled kernels use triton_op where torch has it (torch >= 2.6), so
# torch.compile sees and schedules the Triton kernels themselves.
USE_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETING


def define_op(name: str, mutates_args: Sequence[str] = ()) -> Callable:
    """Registers ``fn`` as the torch.library op ``name``; ``fn`` also serves as its fake kernel.

    The launchers only allocate and launch, so run on fake tensors they compute output metadata
    (``launch`` skips the kernels themselves).
    """

    def register(fn):
        if USE_TRITON_OP:
            return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))
        op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
        op.register_fake(fn)
        return op

    return register


@dataclass
class LaunchRecord:
    """One kernel launch as the audit sees it: the kernel, its grid and arguments."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


#: Functions ``cases(quick) -> iterable of (label, thunk)`` whose thunks run op launchers on
#: representative inputs; the compile audit records and compiles what they launch.
AUDIT_CASES: list[Callable[[bool], Iterable[tuple[str, Callable[[], object]]]]] = []


def audit_cases(fn):
    """Registers an op file's audit cases (see AUDIT_CASES)."""
    AUDIT_CASES.append(fn)
    return fn


_recorders: list[list[LaunchRecord]] = []
_counters: list[list[int]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[list[LaunchRecord]]:
    """Within the block, launches are recorded instead of run (the compile audit's view)."""
    records: list[LaunchRecord] = []
    _recorders.append(records)
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


def _is_traced(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)


def check_launchable(x: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on x's device."""
    if torch.compiler.is_compiling() or x.device.type in ("cuda", "meta") or _recorders:
        return
    if _is_traced(x) or (x.device.type == "cpu" and INTERPRETING):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "the Triton backend runs CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use the 'reference' or 'auto' backend"
        )
    raise RuntimeError(f"the Triton backend needs CUDA tensors, got a tensor on {x.device}")


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launches ``kernel[grid](*args, **kwargs)``; the one place every kernel of the package starts."""
    if _recorders:
        _recorders[-1].append(LaunchRecord(kernel, grid, args, kwargs))
        return
    for counter in _counters:
        counter[0] += 1
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if _is_traced(first):
        if USE_TRITON_OP:
            # triton_op's tracing records the launch as a graph node; it needs the real call.
            # Inductor launches user kernels with num_warps but no register limit.
            kwargs.pop("maxnreg", None)
            torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return
    if USE_TRITON_OP:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@triton.jit
def join_row(join_ptr, stride_k, stride_n, i, n, n_ok, JOIN: tl.constexpr):
    """(keep, row): whether input i survives for sample n, and the row of input i that holds it.

    JOIN is JOIN_MEAN (every input, row n), JOIN_MASK (``join_ptr`` is a bool [num_inputs, batch]
    mask; row n) or JOIN_GATHER (``join_ptr`` is an int [num_inputs, batch] table of rows, -1 for
    none). ``n`` is a sample index, scalar or tensor.
    """
    if JOIN == 2:
        row = tl.load(join_ptr + i * stride_k + n * stride_n, mask=n_ok, other=-1)
        return row >= 0, row
    elif JOIN == 1:
        return tl.load(join_ptr + i * stride_k + n * stride_n, mask=n_ok, other=0) != 0, n
    else:
        return n_ok, n


@triton.jit
def join_scale(join_ptr, stride_k, stride_n, n, n_ok, num_inputs, JOIN: tl.constexpr, ACC: tl.constexpr):
    """1 / (surviving inputs) for each sample n, 0 where none survives (1 / num_inputs for JOIN_MEAN)."""
    if JOIN == 0:
        return (n * 0 + 1).to(ACC) / num_inputs
    else:
        count = (n * 0).to(ACC)
        for i in range(num_inputs):
            keep, _ = join_row(join_ptr, stride_k, stride_n, i, n, n_ok, JOIN)
            count += keep.to(ACC)
        return tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
