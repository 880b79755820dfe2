"""How the per-channel (BatchNorm) kernels cover their inputs, and Welford merging.

An input is viewed as [N, C, HW], contiguous or channels-last. Programs form a (channel blocks) x
(chunks) grid of 3-D tiles [BLOCK_N, BLOCK_C, BLOCK_HW]: no program per (n, c) plane, and no
per-element division. The tiles of one channel block, numbered n-block-major, are dealt to chunks
in runs of ``tiles_per_chunk``; every per-channel kernel of one call uses the same tiling, so
partial statistics line up chunk for chunk. A channel block of few tiles is one chunk: then one
launch computes its statistics and applies them (or sums its gradients and uses the sums).
Statistics are per-lane Welford partials merged once per program, then across chunks in a fixed
order: no atomics, results bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from .launch import MAX_INPUTS, REDUCTION_REGISTERS, STREAMING_REGISTERS, cdiv, next_power_of_2
from .tensors import is_channels_last

#: Elements per tile (8 warps: 8 values a thread).
TILE = 2048
#: The interpreter runs programs one after another, and each tile costs it Python: fewer programs
#: and larger tiles are faster there.
_INTERPRETER_PROGRAMS = 8
_INTERPRETER_TILE = 16 * TILE
#: Channel blocks of at most this many tiles (16K elements a GPU pass) are one chunk. Such small
#: problems are where the GPU waits for the host (a FractalNet at CIFAR size past its first
#: blocks): two launches saved per training BatchNorm outweigh the parallelism a split would add.
SINGLE_PASS_TILES = 8
#: The largest NCHW plane compiled as a constant (one kernel variant per such plane size).
_MAX_FIXED_HW = 4096
#: SMs of the GPU to tile for when tensors are on no GPU (the compile audit); None: the interpreter.
_simulated_sm_count: Optional[int] = None


@contextlib.contextmanager
def tile_for_gpu(sm_count: int) -> Iterator[None]:
    """Within the block, CPU tensors are tiled as a GPU with ``sm_count`` SMs would tile them."""
    global _simulated_sm_count
    previous, _simulated_sm_count = _simulated_sm_count, sm_count
    try:
        yield
    finally:
        _simulated_sm_count = previous


@dataclass(frozen=True)
class ChannelTiling:
    """The tiling of [N, C, HW] tensors for one op call (see the module docstring)."""

    N: int
    C: int
    HW: int
    channels_last: bool
    index_64: bool
    fixed_hw: int
    BLOCK_N: int
    BLOCK_C: int
    BLOCK_HW: int
    num_warps: int
    hw_blocks: int
    tiles_per_chunk: int
    num_chunks: int

    #: The launch grid: (channel blocks, chunks).
    grid: tuple[int, int]
    #: Constexprs and launch options of a streaming kernel and of a reduction on this tiling.
    streaming_meta: dict = field(compare=False)
    reduction_meta: dict = field(compare=False)

    @property
    def count(self) -> int:
        """Elements per channel."""
        return self.N * self.HW

    def block_args(self) -> tuple[int, ...]:
        """Kernel arguments after the row count: (C, HW, hw_blocks, tiles_per_chunk)."""
        return (self.C, self.HW, self.hw_blocks, self.tiles_per_chunk)

    def meta(self, streaming: bool) -> dict:
        """The tiling's constexprs and launch options, for a streaming kernel or a reduction."""
        return self.streaming_meta if streaming else self.reduction_meta


def _pow2_at_most(n: int, cap: int) -> int:
    """The next power of two from n (at least 1), at most cap."""
    return max(1, min(next_power_of_2(max(n, 1)), cap))


def channel_tiling(x: torch.Tensor, num_inputs: int = 1, index_64: bool = False) -> ChannelTiling:
    """The tiling of [N, C, *spatial] tensors like x, contiguous or channels-last, for a kernel
    that handles ``num_inputs`` of them at once (more than four get half-size tiles: registers).
    ``index_64``: the kernel also indexes a tensor of 2**31 elements or more. Cached by shape:
    the host work of a launch is one dictionary lookup, keyed by what the tiling depends on
    (strides for the layout, the device for its SM count)."""
    key = (x.shape, x.stride(), x.dtype, x.device, num_inputs, index_64, _simulated_sm_count)
    try:
        return _tilings[key]
    except KeyError:
        pass
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes) do not hash
        return _tiling(x, num_inputs, index_64)
    if len(_tilings) >= _MAX_TILINGS:
        _tilings.clear()
    tiling = _tilings[key] = _tiling(x, num_inputs, index_64)
    return tiling


_tilings: dict = {}
#: Cached tilings, at most (an eager loop over ever new shapes clears the cache now and then).
_MAX_TILINGS = 4096


def _tiling(x: torch.Tensor, num_inputs: int, index_64: bool) -> ChannelTiling:
    interpreted = x.device.type != "cuda" and _simulated_sm_count is None
    return _tiling_of(tuple(x.shape), is_channels_last(x), x.element_size(), num_inputs, _target_programs(x.device),
                      _INTERPRETER_TILE if interpreted else TILE, index_64 or x.numel() >= 2**31)


def _tiling_of(shape: tuple, channels_last: bool, element_size: int, num_inputs: int, target: int, tile_elements: int,
            index_64: bool) -> ChannelTiling:
    N, C = shape[0], shape[1]
    HW = math.prod(shape[2:])
    # Kernels over more than four inputs keep more per-input state, and fp64 values take two
    # registers: half the elements a thread.
    per_thread = 8 if min(num_inputs, MAX_INPUTS) <= 4 and element_size <= 4 else 4
    tile = tile_elements * per_thread // 8
    if channels_last:
        # Channels are the contiguous axis: a tile spans 128 bytes of them (wider costs
        # registers for the per-channel parameters), then positions, then samples.
        BLOCK_C = _pow2_at_most(C, 128 // element_size)
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
    hw_blocks = cdiv(HW, BLOCK_HW)
    tiles = max(1, cdiv(N, BLOCK_N) * hw_blocks)
    c_blocks = cdiv(C, BLOCK_C)
    chunks = 1 if tiles <= SINGLE_PASS_TILES else min(tiles, cdiv(target, c_blocks))
    tiles_per_chunk = cdiv(tiles, chunks)
    num_chunks = cdiv(tiles, tiles_per_chunk)
    # An NCHW plane size the JIT cannot prove aligned (it marks only multiples of 16) is a
    # compile-time constant: 14x14 planes then take 128-bit fp32 loads, 2x2 and 1x1 planes
    # stack channels into wide loads. (7x7 planes are odd-sized: NCHW allows no vectors there.)
    fixed_hw = HW if not channels_last and HW % 16 and HW <= _MAX_FIXED_HW else 0
    common = dict(CHANNELS_LAST=channels_last, INDEX_64=index_64, FIXED_HW=fixed_hw, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
                  BLOCK_HW=BLOCK_HW, num_warps=num_warps)
    return ChannelTiling(
        N, C, HW, channels_last, index_64, fixed_hw, BLOCK_N, BLOCK_C, BLOCK_HW, num_warps, hw_blocks,
        tiles_per_chunk, num_chunks, (c_blocks, num_chunks), dict(common, maxnreg=STREAMING_REGISTERS),
        dict(common, maxnreg=REDUCTION_REGISTERS),
    )


def _target_programs(device: torch.device) -> int:
    """Programs to aim for: the grid covers the GPU's SMs four times over."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_PROGRAMS if _simulated_sm_count is None else 4 * _simulated_sm_count


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_indices(t, cb, N, C, HW, hw_blocks, FIXED_HW: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Tile t (n-block-major) of channel block cb: rows n [BLOCK_N, 1, 1], channels c
    [1, BLOCK_C, 1], positions hw [1, 1, BLOCK_HW] and the in-bounds mask."""
    if FIXED_HW > 0:
        HW = FIXED_HW
    nb = t // hw_blocks
    hb = t % hw_blocks
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :, None]
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, None, :]
    return n, c, hw, (n < N) & (c < C) & (hw < HW)


@triton.jit
def element_offsets(row, c, hw, C, HW, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                    FIXED_HW: tl.constexpr):
    """Element offsets of (row, c, hw) in a [rows, C, HW] tensor, contiguous or channels-last
    (int64 only for tensors of 2**31 elements or more). A nonzero FIXED_HW is HW as a
    compile-time constant (small NCHW planes), which lets the compiler prove the alignment of
    wide loads."""
    if FIXED_HW > 0:
        HW = FIXED_HW
    row = row.to(tl.int64) if INDEX_64 else row.to(tl.int32)
    if CHANNELS_LAST:
        return row * (HW * C) + hw * C + c
    else:
        return row * (C * HW) + c * HW + hw


@triton.jit
def chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N: tl.constexpr):
    """The first and one-past-last tile of this program's chunk among the tiles of N rows."""
    first = tl.program_id(1) * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, tl.cdiv(N, BLOCK_N) * hw_blocks)
    return first, last


@triton.jit
def welford_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, sum of squared deviations, count) partials; counts are floats."""
    n = n_a + n_b
    frac_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * frac_b, m2_a + m2_b + delta * delta * n_a * frac_b, n


@triton.jit
def merge_lanes(mean, m2, count):
    """Merges per-lane Welford partials over axes 0 and 2 of a tile into one per channel, with
    plain sums: count-weighted mean, then m2 plus each lane's spread around that mean."""
    total = tl.sum(tl.sum(count, 2), 0)
    merged_mean = tl.sum(tl.sum(count * mean, 2), 0) / tl.maximum(total, 1.0)
    spread = mean - merged_mean[None, :, None]
    return merged_mean, tl.sum(tl.sum(m2 + count * spread * spread, 2), 0), total
