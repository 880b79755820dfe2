"""BatchNorm(+ReLU) kernels: statistics, combine, apply, backward reductions and input gradients.

Every kernel here takes up to eight inputs of one shape, each with its own affine parameters and
statistics, and an optional per-sample join mask: ``bn_relu`` is the case k = 1 without a mask, and
``join_bn_relu`` (join_bn_relu.py) runs the same kernels with k inputs and the drop-path mask, so
the column-end op and the plain unit share one implementation.

Inputs are viewed as [N, C, HW] (contiguous, or channels-last where channels are the contiguous
axis). Per-channel work runs on a (channel blocks) x (chunks) grid of 3-D tiles
[BLOCK_N, BLOCK_C, BLOCK_HW] (see common.ChannelTiling): no program per (n, c) plane, and no
per-element division. Statistics are fp32 Welford partials (fp64 for fp64 inputs), one per chunk,
merged in a fixed order by a second stage: no atomics, so results are bitwise reproducible.

Training forward: bn_stats_kernel + bn_combine_kernel (which also updates the running statistics),
then bn_apply_kernel. Eval: bn_apply_kernel on the running statistics. Backward:
bn_backward_reduce_kernel (per-channel sums of g and g * x_hat) and bn_backward_dx_kernel. The
backward recomputes x_hat and the ReLU mask from the raw input and the per-channel mean and
variance, so the op saves its input and O(C) statistics, never its output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import recompute
from .common import (
    MAX_REGISTERS,
    acc_dtype,
    audit_cases,
    bitmask,
    channel_tiling,
    define_op,
    dense_inputs,
    groups,
    join_args,
    join_row,
    join_scale,
    launch,
    memory_format,
    new_rows,
    pad,
    pick,
    placeholder,
    present,
    welford_merge,
)

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(t, cb, N, C, HW, hw_blocks, PLANE: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Tile t (n-block-major) of channel block cb: rows n [BLOCK_N, 1, 1], channels c
    [1, BLOCK_C, 1], positions hw [1, 1, BLOCK_HW] and the in-bounds mask."""
    if PLANE > 0:
        HW = PLANE
    nb = t // hw_blocks
    hb = t % hw_blocks
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :, None]
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, None, :]
    return n, c, hw, (n < N) & (c < C) & (hw < HW)


@triton.jit
def _offsets(row, c, hw, C, HW, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, PLANE: tl.constexpr):
    """Element offsets of (row, c, hw) in a [rows, C, HW] tensor, contiguous or channels-last
    (int64 only for tensors of 2**31 elements or more). A nonzero PLANE is HW as a compile-time
    constant (small NCHW planes), which lets the compiler prove the alignment of wide loads."""
    if PLANE > 0:
        HW = PLANE
    row = row.to(tl.int64) if INDEX_64 else row.to(tl.int32)
    if CHANNELS_LAST:
        return row * (HW * C) + hw * C + c
    else:
        return row * (C * HW) + c * HW + hw


@triton.jit
def _chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N: tl.constexpr):
    """The first and one-past-last tile of this program's chunk among the tiles of N rows."""
    first = tl.program_id(1) * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, tl.cdiv(N, BLOCK_N) * hw_blocks)
    return first, last


@triton.jit
def _channel_params(i: tl.constexpr, c, c_ok, eps,
                    w0, w1, w2, w3, w4, w5, w6, w7, b0, b1, b2, b3, b4, b5, b6, b7,
                    m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Input i's per-channel mean, 1/sqrt(var + eps), weight and bias, shaped [1, BLOCK_C, 1]."""
    mean = tl.load(pick(i, m0, m1, m2, m3, m4, m5, m6, m7) + c, mask=c_ok, other=0.0).to(ACC)
    var = tl.load(pick(i, v0, v1, v2, v3, v4, v5, v6, v7) + c, mask=c_ok, other=1.0).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    if (HAS_WEIGHT >> i) & 1:
        w = tl.load(pick(i, w0, w1, w2, w3, w4, w5, w6, w7) + c, mask=c_ok, other=0.0).to(ACC)
    else:
        w = tl.full(c.shape, 1.0, ACC)
    if (HAS_BIAS >> i) & 1:
        b = tl.load(pick(i, b0, b1, b2, b3, b4, b5, b6, b7) + c, mask=c_ok, other=0.0).to(ACC)
    else:
        b = tl.zeros(c.shape, ACC)
    return mean[None, :, None], rstd[None, :, None], w[None, :, None], b[None, :, None]


@triton.jit
def _normalize(x, mean, rstd, w, b):
    """The affine-normalised value; forward and backward compute it identically, so the
    recomputed ReLU mask always matches the forward's."""
    return (x - mean) * (rstd * w) + b


@triton.jit
def _merge_lanes(mean, m2, count):
    """Merges per-lane Welford partials over axes 0 and 2 of a tile into one per channel, with
    plain sums: count-weighted mean, then m2 plus each lane's spread around that mean."""
    total = tl.sum(tl.sum(count, 2), 0)
    merged_mean = tl.sum(tl.sum(count * mean, 2), 0) / tl.maximum(total, 1.0)
    spread = mean - merged_mean[None, :, None]
    return merged_mean, tl.sum(tl.sum(m2 + count * spread * spread, 2), 0), total


@triton.jit
def _add_at(i: tl.constexpr, value, a0, a1, a2, a3, a4, a5, a6, a7):
    """(a0, .., a7) with value added to a_i; i is a compile-time constant."""
    if i == 0:
        a0 += value
    elif i == 1:
        a1 += value
    elif i == 2:
        a2 += value
    elif i == 3:
        a3 += value
    elif i == 4:
        a4 += value
    elif i == 5:
        a5 += value
    elif i == 6:
        a6 += value
    else:
        a7 += value
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _channel_totals(i: tl.constexpr, K: tl.constexpr, sum_g_ptr, sum_gx_ptr, num_partials, c, c_ok, C,
                    ACC: tl.constexpr):
    """Input i's per-channel sums of g and g * x_hat over all partials, shaped [1, BLOCK_C, 1]
    (zeros for i >= K, so the caller can name all eight)."""
    total_g = tl.zeros(c.shape, ACC)
    total_gx = tl.zeros(c.shape, ACC)
    if i < K:
        for s in range(num_partials):
            offs = (i * num_partials + s) * C + c
            total_g += tl.load(sum_g_ptr + offs, mask=c_ok, other=0.0)
            total_gx += tl.load(sum_gx_ptr + offs, mask=c_ok, other=0.0)
    return total_g[None, :, None], total_gx[None, :, None]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def bn_stats_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    mean_part_ptr, m2_part_ptr, count_part_ptr,
    C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, PLANE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Welford partials (mean, sum of squared deviations, count) of each channel of K inputs.

    Pointers: ``x0``..``x7`` are the inputs (first K read), [n_i, C, HW] contiguous or
    channels-last (CHANNELS_LAST), with ``n0``..``n7`` rows. ``mean_part_ptr``, ``m2_part_ptr``
    and ``count_part_ptr`` are [K, num_chunks, C] in the accumulation dtype. Program (cb, chunk)
    covers channels cb*BLOCK_C.. and, of each input, tiles chunk*tiles_per_chunk.. of
    [BLOCK_N, BLOCK_C, BLOCK_HW].
    """
    ACC: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    for i in tl.static_range(K):
        x_ptr = pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
        N = pick(i, n0, n1, n2, n3, n4, n5, n6, n7)
        first, last = _chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
        # Each lane runs Welford over the elements it sees; lanes merge once, at the end.
        mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
        m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
        count = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
        for t in range(first, last):
            n, c, hw, valid = _tile(t, cb, N, C, HW, hw_blocks, PLANE, BLOCK_N, BLOCK_C, BLOCK_HW)
            offs = _offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE)
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
            count += valid.to(ACC)
            delta = tl.where(valid, x - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * (x - mean)
        mean, m2, count = _merge_lanes(mean, m2, count)
        part = (i * num_chunks + chunk) * C + c_block
        tl.store(mean_part_ptr + part, mean, mask=c_block < C)
        tl.store(m2_part_ptr + part, m2, mask=c_block < C)
        tl.store(count_part_ptr + part, count, mask=c_block < C)


@triton.jit
def bn_combine_kernel(
    mean_part_ptr, m2_part_ptr, count_part_ptr,
    mean_ptr, var_ptr,
    rm0, rm1, rm2, rm3, rm4, rm5, rm6, rm7,
    rv0, rv1, rv2, rv3, rv4, rv5, rv6, rv7,
    momentum, C, num_chunks,
    K: tl.constexpr, HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the chunk partials in chunk order into batch mean and biased variance, and updates
    the running statistics in place (unbiased variance, ``momentum``), as torch does; an input
    with no rows leaves its running statistics unchanged.

    Pointers: partials as written by bn_stats_kernel; ``mean_ptr``/``var_ptr`` are [K, C] outputs
    in the accumulation dtype; ``rm0``..``rm7``/``rv0``..``rv7`` the running mean and variance of
    each input, updated where bit i of HAS_RUNNING is set. One program per BLOCK_C channels.
    """
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    momentum = tl.cast(momentum, tl.float32)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    for i in tl.static_range(K):
        mean = tl.zeros([BLOCK_C], ACC)
        m2 = tl.zeros([BLOCK_C], ACC)
        count = tl.zeros([BLOCK_C], ACC)
        for s in range(num_chunks):
            part = (i * num_chunks + s) * C + c
            mean, m2, count = welford_merge(
                mean, m2, count,
                tl.load(mean_part_ptr + part, mask=c_ok, other=0.0),
                tl.load(m2_part_ptr + part, mask=c_ok, other=0.0),
                tl.load(count_part_ptr + part, mask=c_ok, other=0.0),
            )
        tl.store(mean_ptr + i * C + c, mean, mask=c_ok)
        tl.store(var_ptr + i * C + c, m2 / tl.maximum(count, 1.0), mask=c_ok)
        if (HAS_RUNNING >> i) & 1:
            rm_ptr = pick(i, rm0, rm1, rm2, rm3, rm4, rm5, rm6, rm7)
            rv_ptr = pick(i, rv0, rv1, rv2, rv3, rv4, rv5, rv6, rv7)
            running_mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
            running_var = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(ACC)
            unbiased = m2 / tl.maximum(count - 1.0, 1.0)
            seen = count > 0
            running_mean = tl.where(seen, running_mean + momentum * (mean - running_mean), running_mean)
            running_var = tl.where(seen, running_var + momentum * (unbiased - running_var), running_var)
            tl.store(rm_ptr + c, running_mean.to(rm_ptr.dtype.element_ty), mask=c_ok)
            tl.store(rv_ptr + c, running_var.to(rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_apply_kernel(
    out_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    m0, m1, m2, m3, m4, m5, m6, m7,
    v0, v1, v2, v3, v4, v5, v6, v7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, JOIN: tl.constexpr,
    RELU: tl.constexpr, ACCUMULATE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
    PLANE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = join over inputs of act((x_i - mean_i) * rstd_i * w_i + b_i), in one pass.

    Pointers: ``out_ptr`` is [N, C, HW]; ``x0``..``x7`` (first K read) share its layout, each
    with its own rows; ``w``/``b`` are per-input weights and biases (bits of HAS_WEIGHT /
    HAS_BIAS say which exist); ``m``/``v`` per-input mean and variance (batch statistics in
    training, running statistics in eval); ``join_ptr`` with its strides is the join of inputs
    first_input.. of a num_inputs-input join: none, a bool mask or a gather table of rows, as
    JOIN says (common.join_row). RELU applies the ReLU; ACCUMULATE adds to out (groups after the
    first when k > 8). Rows of a dropped input are not read.
    """
    ACC: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    eps = tl.cast(eps, tl.float32)
    cb = tl.program_id(0)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    first, last = _chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    for t in range(first, last):
        n, c, hw, valid = _tile(t, cb, N, C, HW, hw_blocks, PLANE, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, n_ok, num_inputs, JOIN, ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
        for i in tl.static_range(K):
            mean, rstd, w, b = _channel_params(
                i, c_block, c_ok, eps, w0, w1, w2, w3, w4, w5, w6, w7, b0, b1, b2, b3, b4, b5, b6, b7,
                m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7, HAS_WEIGHT, HAS_BIAS, ACC,
            )
            keep, row = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            x_ptr = pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
            x = tl.load(x_ptr + _offsets(row, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE),
                        mask=valid & keep, other=0.0).to(ACC)
            y = _normalize(x, mean, rstd, w, b)
            if RELU:
                y = tl.maximum(y, 0.0)
            acc += tl.where(keep, y, 0.0)
        out = acc * scale
        offs = _offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE)
        if ACCUMULATE:
            out += tl.load(out_ptr + offs, mask=valid, other=0.0).to(ACC)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def bn_backward_reduce_kernel(
    grad_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    m0, m1, m2, m3, m4, m5, m6, m7,
    v0, v1, v2, v3, v4, v5, v6, v7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps,
    sum_g_part_ptr, sum_gx_part_ptr,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, JOIN: tl.constexpr,
    RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, PLANE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per-chunk sums over each channel of g_i and g_i * x_hat_i for K inputs, where g_i is the
    output gradient routed to input i (join weight, ReLU mask) and x_hat_i the normalised input.

    Pointers as in bn_apply_kernel, with ``grad_ptr`` the [N, C, HW] output gradient;
    ``sum_g_part_ptr`` and ``sum_gx_part_ptr`` are [K, num_chunks, C] outputs (accumulation
    dtype). The output gradient is read once for all K inputs; rows of a dropped input are not
    read (their g is 0), nor rows of a gathered input that hold no sample.
    """
    ACC: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    eps = tl.cast(eps, tl.float32)
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    # Per-lane sums for each input, reduced across lanes once at the end.
    zero = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
    g0, g1, g2, g3, g4, g5, g6, g7 = zero, zero, zero, zero, zero, zero, zero, zero
    gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7 = zero, zero, zero, zero, zero, zero, zero, zero
    first, last = _chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    for t in range(first, last):
        n, c, hw, valid = _tile(t, cb, N, C, HW, hw_blocks, PLANE, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, n_ok, num_inputs, JOIN, ACC)
        offs = _offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE)
        grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(ACC) * scale
        for i in tl.static_range(K):
            mean, rstd, w, b = _channel_params(
                i, c_block, c_ok, eps, w0, w1, w2, w3, w4, w5, w6, w7, b0, b1, b2, b3, b4, b5, b6, b7,
                m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7, HAS_WEIGHT, HAS_BIAS, ACC,
            )
            keep, row = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            x_ptr = pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
            x = tl.load(x_ptr + _offsets(row, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE),
                        mask=valid & keep, other=0.0).to(ACC)
            g = tl.where(keep & valid, grad, 0.0)
            if RELU:
                g = tl.where(_normalize(x, mean, rstd, w, b) > 0.0, g, 0.0)
            g0, g1, g2, g3, g4, g5, g6, g7 = _add_at(i, g, g0, g1, g2, g3, g4, g5, g6, g7)
            gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7 = _add_at(
                i, g * ((x - mean) * rstd), gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7
            )
    for i in tl.static_range(K):
        part = (i * num_chunks + chunk) * C + c_block
        tl.store(sum_g_part_ptr + part, tl.sum(tl.sum(pick(i, g0, g1, g2, g3, g4, g5, g6, g7), 2), 0), mask=c_ok)
        tl.store(sum_gx_part_ptr + part, tl.sum(tl.sum(pick(i, gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7), 2), 0),
                 mask=c_ok)


@triton.jit
def bn_backward_dx_kernel(
    grad_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    m0, m1, m2, m3, m4, m5, m6, m7,
    v0, v1, v2, v3, v4, v5, v6, v7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps, sample_ptr,
    sum_g_part_ptr, sum_gx_part_ptr, num_partials, grad_weight_ptr, grad_bias_ptr, count,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, JOIN: tl.constexpr,
    RELU: tl.constexpr, BATCH_STATS: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
    PLANE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Input gradients of K inputs, and the weight and bias gradients.

    dx_i = w_i * rstd_i * (g_i - (sum g_i + x_hat_i * sum g_i x_hat_i) / count) with batch
    statistics (BATCH_STATS), w_i * rstd_i * g_i with running statistics. Pointers as in
    bn_backward_reduce_kernel plus ``dx0``..``dx7`` (outputs in the inputs' layouts); the sums
    come as ``num_partials`` partials per channel ([K, num_partials, C]); programs of chunk 0
    write the totals to ``grad_weight_ptr`` (sum g x_hat) and ``grad_bias_ptr`` (sum g), each
    [K, C]. ``count`` is the number of elements per channel the sums cover.

    The tile rows are the N rows of the inputs. For a gather join (JOIN_GATHER, one input per
    launch) ``sample_ptr`` [N] maps each row to the output sample it holds (-1 for none), whose
    gradient it reads; otherwise a row is a sample.
    """
    ACC: tl.constexpr = tl.float64 if x0.dtype.element_ty == tl.float64 else tl.float32
    eps = tl.cast(eps, tl.float32)
    inv_count = 1.0 / tl.maximum(tl.cast(count, ACC), 1.0)
    cb = tl.program_id(0)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    # Totals per input, loaded once: named one by one because the tile loop needs all K.
    g0, gx0 = _channel_totals(0, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g1, gx1 = _channel_totals(1, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g2, gx2 = _channel_totals(2, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g3, gx3 = _channel_totals(3, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g4, gx4 = _channel_totals(4, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g5, gx5 = _channel_totals(5, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g6, gx6 = _channel_totals(6, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    g7, gx7 = _channel_totals(7, K, sum_g_part_ptr, sum_gx_part_ptr, num_partials, c_block, c_ok, C, ACC)
    if tl.program_id(1) == 0:
        for i in tl.static_range(K):
            rows = i * C + c_block[None, :, None]
            tl.store(grad_weight_ptr + rows, pick(i, gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7), mask=c_ok[None, :, None])
            tl.store(grad_bias_ptr + rows, pick(i, g0, g1, g2, g3, g4, g5, g6, g7), mask=c_ok[None, :, None])
    first, last = _chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    for t in range(first, last):
        n, c, hw, valid = _tile(t, cb, N, C, HW, hw_blocks, PLANE, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        offs = _offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE)
        if JOIN == 2:
            sample = tl.load(sample_ptr + n, mask=n_ok, other=-1)
            held = sample >= 0
        else:
            sample = n
            held = n_ok
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, sample, held, num_inputs, JOIN, ACC)
        grad_offs = _offsets(sample, c, hw, C, HW, CHANNELS_LAST, INDEX_64, PLANE)
        grad = tl.load(grad_ptr + grad_offs, mask=valid & held, other=0.0).to(ACC) * scale
        for i in tl.static_range(K):
            mean, rstd, w, b = _channel_params(
                i, c_block, c_ok, eps, w0, w1, w2, w3, w4, w5, w6, w7, b0, b1, b2, b3, b4, b5, b6, b7,
                m0, m1, m2, m3, m4, m5, m6, m7, v0, v1, v2, v3, v4, v5, v6, v7, HAS_WEIGHT, HAS_BIAS, ACC,
            )
            if JOIN == 2:
                keep = held
            else:
                keep, _ = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            x_ptr = pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
            # With batch statistics every row has a gradient (through the mean and variance).
            if BATCH_STATS:
                x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
            else:
                x = tl.load(x_ptr + offs, mask=valid & keep, other=0.0).to(ACC)
            g = tl.where(keep & valid, grad, 0.0)
            if RELU:
                g = tl.where(_normalize(x, mean, rstd, w, b) > 0.0, g, 0.0)
            if BATCH_STATS:
                x_hat = (x - mean) * rstd
                total_g = pick(i, g0, g1, g2, g3, g4, g5, g6, g7)
                total_gx = pick(i, gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7)
                g = g - (total_g + x_hat * total_gx) * inv_count
            dx_ptr = pick(i, dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7)
            tl.store(dx_ptr + offs, (w * rstd * g).to(dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

#: Channels per program of the combine stage.
_COMBINE_BLOCK_C = 128


def _flags(tensors: list[torch.Tensor]) -> int:
    return bitmask([present(t) for t in tensors])


def _per_input_args(group: range, *lists: list) -> list:
    """The group's entries of each per-input list, each padded to the kernels' eight slots."""
    return [t for items in lists for t in pad([items[i] for i in group])]


@define_op("fractal_kernels::bn_stats", mutates_args=("running_means", "running_vars"))
def bn_stats(
    inputs: list[torch.Tensor], running_means: list[torch.Tensor], running_vars: list[torch.Tensor], momentum: float
) -> torch.Tensor:
    """Batch mean and biased variance of every channel of every input, as a [2, k, C] tensor
    (fp32; fp64 for fp64 inputs). Inputs may differ in their number of rows (gathered column
    segments). Updates the running statistics that are present (empty tensors stand for absent
    ones) with ``momentum`` and the unbiased variance; an input with no rows updates nothing.

    Launches bn_stats_kernel and bn_combine_kernel once for up to eight inputs.
    """
    xs = dense_inputs(inputs)
    tiling = channel_tiling(max(xs, key=lambda x: x.shape[0]), len(xs))
    k, C, chunks = len(xs), tiling.C, tiling.num_chunks
    dtype, device = acc_dtype(xs[0].dtype), xs[0].device
    stats = torch.empty(2, k, C, dtype=dtype, device=device)
    partials = torch.empty(3, k, chunks, C, dtype=dtype, device=device)  # mean, m2, count
    block_c = min(_COMBINE_BLOCK_C, triton.next_power_of_2(C))
    for group in groups(k):
        start = group.start
        launch(
            bn_stats_kernel, tiling.grid,
            *_per_input_args(group, xs, [x.shape[0] for x in xs]), *partials[:, start], *tiling.block_args(),
            K=len(group), **tiling.meta(),
        )
        launch(
            bn_combine_kernel, (triton.cdiv(C, block_c),),
            *partials[:, start], stats[0, start], stats[1, start],
            *_per_input_args(group, running_means, running_vars), float(momentum), C, chunks,
            K=len(group), HAS_RUNNING=_flags([running_means[i] for i in group]), BLOCK_C=block_c,
            num_warps=4, maxnreg=MAX_REGISTERS,
        )
    return stats


def _output(xs: list[torch.Tensor], rows: Optional[torch.Tensor]) -> torch.Tensor:
    """An uninitialised join output: one row per sample, the inputs' layout."""
    return torch.empty_like(xs[0]) if rows is None else new_rows(xs[0], rows.shape[1])


def _common_args(group, xs, weights, biases, means, variances, join, first, k, eps):
    """The arguments every apply and backward kernel shares, for one group of inputs."""
    return (*_per_input_args(group, weights, biases, means, variances), *join, first, k, float(eps))


def _common_meta(group, weights, biases, mode, relu) -> dict:
    return dict(K=len(group), HAS_WEIGHT=_flags([weights[i] for i in group]),
                HAS_BIAS=_flags([biases[i] for i in group]), JOIN=mode, RELU=relu)


@define_op("fractal_kernels::bn_apply")
def bn_apply(
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    batch_stats: bool,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """The join (plain mean, ``mask`` or gather table ``rows``) over inputs of
    act((x_i - mean_i) / sqrt(var_i + eps) * w_i + b_i).

    Empty tensors stand for absent weights and biases. ``batch_stats`` says whether the means and
    variances are the batch statistics of the inputs (training), which the backward then
    differentiates through; otherwise they are constants (running statistics). One launch for
    up to eight inputs.
    """
    xs = dense_inputs(inputs)
    out = _output(xs, rows)
    if out.numel() == 0:
        return out
    tiling = channel_tiling(out, len(xs))
    join, mode = join_args(out, mask, rows)
    for g, group in enumerate(groups(len(xs))):
        launch(
            bn_apply_kernel, tiling.grid,
            out, *_per_input_args(group, xs), *_common_args(group, xs, weights, biases, means, variances, join,
                                                            group.start, len(xs), eps),
            tiling.N, *tiling.block_args(),
            **_common_meta(group, weights, biases, mode, relu), ACCUMULATE=g > 0, **tiling.meta(),
        )
    return out


def bn_backward_sums(grad, xs, join, mode, weights, biases, means, variances, eps, relu) -> torch.Tensor:
    """Per-chunk sums of g_i and g_i * x_hat_i over the output rows, as [2, k, chunks, C]
    (bn_backward_reduce_kernel)."""
    k = len(xs)
    tiling = channel_tiling(grad, k)
    partials = torch.empty(2, k, tiling.num_chunks, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    for group in groups(k):
        launch(
            bn_backward_reduce_kernel, tiling.grid,
            grad, *_per_input_args(group, xs), *_common_args(group, xs, weights, biases, means, variances, join,
                                                             group.start, k, eps),
            partials[0, group.start], partials[1, group.start], tiling.N, *tiling.block_args(),
            **_common_meta(group, weights, biases, mode, relu), **tiling.meta(),
        )
    return partials


def _row_samples(rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """For each gathered input, the output sample each of its rows holds (-1 for none)."""
    k, batch = rows.shape
    spare = max(sizes)  # a spare column takes the -1 entries
    table = rows.new_full((k, spare + 1), -1)
    samples = torch.arange(batch, device=rows.device, dtype=rows.dtype).expand(k, batch)
    table.scatter_(1, torch.where(rows >= 0, rows, spare), samples)
    return [table[i, :size] for i, size in enumerate(sizes)]


def bn_backward_dx(grad, xs, join, mode, weights, biases, means, variances, eps, relu, batch_stats, sums, rows=None,
                   count=None):
    """Input gradients (the inputs' shapes) and [2, k, C] weight and bias gradients from the
    [2, k, P, C] partial sums (bn_backward_dx_kernel): one launch per group of eight inputs, or,
    for a gather join, one per input over its own rows. ``count``: the elements per channel the
    sums cover (default: the inputs' own)."""
    k = len(xs)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grad_params = torch.empty(2, k, grad.shape[1], dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    if rows is None:
        tiling = channel_tiling(xs[0], k)
        launches = [(group, tiling, grad) for group in groups(k)]
    else:
        samples = _row_samples(rows, [x.shape[0] for x in xs])
        launches = [(range(i, i + 1), channel_tiling(xs[i], 1), samples[i]) for i in range(k)]
    for group, tiling, sample in launches:
        launch(
            bn_backward_dx_kernel, tiling.grid,
            grad, *_per_input_args(group, xs, grad_inputs),
            *_common_args(group, xs, weights, biases, means, variances, join, group.start, k, eps), sample,
            sums[0, group.start], sums[1, group.start], sums.shape[2], grad_params[0, group.start],
            grad_params[1, group.start], tiling.count if count is None else count, tiling.N, *tiling.block_args(),
            **_common_meta(group, weights, biases, mode, relu), BATCH_STATS=batch_stats, **tiling.meta(),
        )
    return grad_inputs, grad_params


@define_op("fractal_kernels::bn_backward")
def bn_backward(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    batch_stats: bool,
    eps: float,
    relu: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward of bn_apply: the input gradients and the [2, k, C] weight and bias gradients.

    Two launches for up to eight inputs (one when no sums are needed: running statistics and no
    affine parameters); a gather join launches the input-gradient kernel once per input.
    """
    xs = dense_inputs(inputs)
    grad = grad.contiguous(memory_format=memory_format(xs[0]))
    join, mode = join_args(grad, mask, rows)
    args = (grad, xs, join, mode, weights, biases, means, variances, eps, relu)
    if batch_stats or any(present(t) for t in (*weights, *biases)):
        sums = bn_backward_sums(*args)
    else:
        sums = grad.new_empty(2, len(xs), 0, grad.shape[1], dtype=acc_dtype(grad.dtype))
    return bn_backward_dx(*args, batch_stats, sums, rows)


def _apply_setup_context(ctx, inputs, output):
    xs, mask, rows, weights, biases, means, variances, batch_stats, eps, relu = inputs
    ctx.num_inputs = len(xs)
    ctx.options = (batch_stats, eps, relu)
    ctx.save_for_backward(mask, rows, *xs, *weights, *biases, *means, *variances)


def _apply_backward(ctx, grad):
    mask, rows, *saved = ctx.saved_tensors
    k = ctx.num_inputs
    xs, weights, biases, means, variances = (saved[j * k:(j + 1) * k] for j in range(5))
    grad_inputs, grad_params = bn_backward(grad, xs, mask, rows, weights, biases, means, variances, *ctx.options)
    grad_weights = [grad_params[0, i].to(w.dtype) if present(w) else None for i, w in enumerate(weights)]
    grad_biases = [grad_params[1, i].to(b.dtype) if present(b) else None for i, b in enumerate(biases)]
    return grad_inputs, None, None, grad_weights, grad_biases, [None] * k, [None] * k, None, None, None


bn_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# ----------------------------------------------------------------------------------------------
# The composite behind bn_relu, join_bn_relu and gather_join_bn_relu
# ----------------------------------------------------------------------------------------------


def batch_norm_join(inputs, mask, weights, biases, running_means, running_vars, training, momentum, eps, relu,
                    rows=None):
    """The join (``mask`` or gather table ``rows``) of [bn(+relu)(x_i) for each input] on the
    Triton ops: in training the statistics of all inputs (and the running-statistic updates),
    then one apply pass."""
    xs = dense_inputs(inputs)
    absent = placeholder(xs[0])

    def filled(tensors):
        return [absent if t is None else t for t in tensors]

    if training:
        # The statistics carry no autograd of their own: bn_apply's backward differentiates
        # through them (batch_stats=True).
        stats = bn_stats([x.detach() for x in xs], filled(running_means), filled(running_vars), momentum)
        means, variances = list(stats[0].unbind(0)), list(stats[1].unbind(0))
    else:
        means, variances = list(running_means), list(running_vars)
    args = (xs, mask, rows, filled(weights), filled(biases), means, variances, training, eps, relu)
    out = bn_apply(*args)
    if recompute.recording():
        recompute.register(out, lambda: bn_apply(*args))
    return out


_library = torch.library.Library("fractal_kernels", "FRAGMENT")
_library.define(
    "bn_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "bool training, float momentum=0.1, float eps=1e-05, bool relu=True) -> Tensor"
)


def _bn_relu(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5, relu=True):
    return batch_norm_join([x], None, [weight], [bias], [running_mean], [running_var], training, momentum, eps, relu)


_library.impl("bn_relu", _bn_relu, "CompositeImplicitAutograd")


def _forward_backward(xs, mask, affine: bool, training: bool, relu: bool, rows=None) -> None:
    """Runs the statistics, apply and backward launchers once (the audit's cases)."""
    C, k = xs[0].shape[1], len(xs)
    params = [xs[0].new_empty(C, dtype=acc_dtype(xs[0].dtype)) if affine else placeholder(xs[0]) for _ in range(k)]
    running = [xs[0].new_empty(C, dtype=acc_dtype(xs[0].dtype)) for _ in range(k)]
    stats = bn_stats(xs, running, running, 0.1) if training else torch.stack([torch.stack(running)] * 2)
    means, variances = list(stats[0]), list(stats[1])
    bn_apply(xs, mask, rows, params, params, means, variances, training, 1e-5, relu)
    grad = _output(xs, rows)
    bn_backward(grad, xs, mask, rows, params, params, means, variances, training, 1e-5, relu)


@audit_cases
def _audit_cases(quick: bool):
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for dtype in dtypes:
        for shape in ((32, 64, 32, 32), (32, 512, 2, 2), (3, 7, 5, 9)):
            for layout in (torch.contiguous_format, torch.channels_last):
                def inputs(k):
                    return [torch.empty(shape, dtype=dtype).to(memory_format=layout) for _ in range(k)]

                name = f"{str(dtype)[6:]} {'x'.join(map(str, shape))} {'nhwc' if layout == torch.channels_last else 'nchw'}"
                mask = torch.ones(3, shape[0], dtype=torch.bool)
                # A gather join over compact inputs of 1/2 and 1/4 of the samples.
                compact = [torch.empty((n,) + shape[1:], dtype=dtype).to(memory_format=layout)
                           for n in (shape[0], shape[0] // 2, shape[0] // 4)]
                rows = torch.zeros(3, shape[0], dtype=torch.int64)
                yield f"{name} bn_relu train", lambda: _forward_backward(inputs(1), None, True, True, True)
                yield f"{name} bn_relu eval", lambda: _forward_backward(inputs(1), None, True, False, True)
                yield f"{name} join k=3", lambda: _forward_backward(inputs(3), mask, True, True, True)
                yield f"{name} gather k=3", lambda: _forward_backward(compact, None, True, True, True, rows=rows)
                if dtype == torch.float32:
                    yield f"{name} batch_norm", lambda: _forward_backward(inputs(1), None, False, True, False)
                    yield f"{name} join k=9", lambda: _forward_backward(inputs(9), None, True, True, True)
