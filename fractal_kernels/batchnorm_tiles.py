"""The device helpers of the BatchNorm kernels (batchnorm_kernels.py): per-channel parameters,
normalisation, dropout and ReLU, and the loops over a chunk's tiles that the split and the
single-pass kernels share, so that both compute the same arithmetic in the same order."""

from __future__ import annotations

import triton
import triton.language as tl

from .channel_tiling import element_offsets, merge_lanes, tile_indices
from .join_modes import JOIN_GATHER, join_row, join_scale

# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def exact_scalar(value, ACC: tl.constexpr):
    """A host float in the accumulation dtype. Floats are fp64 kernel arguments (annotated) and
    the interpreter's are Python floats; a plain float argument would arrive as fp32, which
    rounds fp64 results (momentum 0.1 as 0.10000000149)."""
    return tl.full([], value, tl.float64).to(ACC)


@triton.jit
def channel_params(i: tl.constexpr, c, c_ok, eps, weights, biases, means, variances, ACC: tl.constexpr):
    """Input i's per-channel mean, 1/sqrt(var + eps), weight and bias, shaped [1, BLOCK_C, 1]
    (weight 1 and bias 0 where the input has none)."""
    mean = tl.load(means[i] + c, mask=c_ok, other=0.0).to(ACC)
    var = tl.load(variances[i] + c, mask=c_ok, other=1.0).to(ACC)
    rstd = 1.0 / tl.sqrt(var + eps)
    if weights[i] is not None:
        w = tl.load(weights[i] + c, mask=c_ok, other=0.0).to(ACC)
    else:
        w = tl.full(c.shape, 1.0, ACC)
    if biases[i] is not None:
        b = tl.load(biases[i] + c, mask=c_ok, other=0.0).to(ACC)
    else:
        b = tl.zeros(c.shape, ACC)
    return mean[None, :, None], rstd[None, :, None], w[None, :, None], b[None, :, None]


@triton.jit
def normalize(x, mean, rstd, w, b):
    """The affine-normalised value; forward and backward compute it identically, so the
    recomputed ReLU mask always matches the forward's."""
    return (x - mean) * (rstd * w) + b


@triton.jit
def dropout(x, seeds_ptr, i, row, c, hw, C, HW, p, scale, INDEX_64: tl.constexpr):
    """(x after dropout, the keep mask): element (row, c, hw) of input i is kept with probability
    1 - p and scaled by 1 / (1 - p), as nn.Dropout does. The mask is Philox from input i's seed
    (``seeds_ptr[i]``) and the element's logical NCHW index: every kernel regenerates the same
    mask, in either layout, so it is never stored."""
    row = row.to(tl.int64) if INDEX_64 else row.to(tl.int32)
    keep = tl.rand(tl.load(seeds_ptr + i), (row * C + c) * HW + hw) >= p
    return tl.where(keep, x * scale, 0.0), keep


@triton.jit
def relu(y):
    """max(y, 0) that keeps NaN, as F.relu does (a plain max would turn NaN into 0)."""
    return tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def statistics_pointers(stats_ptr, C, K: tl.constexpr):
    """(means, variances): each of K inputs' mean and variance rows of the [2, K, C] statistics at
    ``stats_ptr``, as the per-input pointer tuples the tile loops take."""
    means = ()
    variances = ()
    for i in tl.static_range(K):
        means = means + (stats_ptr + i * C,)
        variances = variances + (stats_ptr + (K + i) * C,)
    return means, variances


@triton.jit
def add_at(i: tl.constexpr, value, accumulators):
    """The tuple ``accumulators`` with ``value`` added to its entry i."""
    return accumulators[:i] + (accumulators[i] + value,) + accumulators[i + 1:]


# ----------------------------------------------------------------------------------------------
# Tile loops over tiles first..last of channel block cb: one chunk of the tiles in the split
# kernels, all of them in the single-pass ones
# ----------------------------------------------------------------------------------------------


@triton.jit
def welford_tiles(x_ptr, input_index, cb, first, last, N, C, HW, hw_blocks, seeds_ptr, dropout_p, dropout_scale,
                  ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Welford (mean, sum of squared deviations, count) of each channel, as [BLOCK_C] vectors,
    of an input of N rows, after its dropout (input ``input_index``'s seed) where ``seeds_ptr``
    is given."""
    # Each lane runs Welford over the elements it sees; lanes merge once, at the end.
    mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
    count = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
    for t in range(first, last):
        n, c, hw, valid = tile_indices(t, cb, N, C, HW, hw_blocks, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
        offs = element_offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(ACC)
        if seeds_ptr is not None:
            x, _ = dropout(x, seeds_ptr, input_index, n, c, hw, C, HW, dropout_p, dropout_scale, INDEX_64)
        count += valid.to(ACC)
        delta = tl.where(valid, x - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)
        m2 += delta * (x - mean)
    return merge_lanes(mean, m2, count)


@triton.jit
def update_running(running_mean_ptr, running_var_ptr, c, c_ok, mean, m2, count, factor, ACC: tl.constexpr):
    """Moves the running statistics of channels c by ``factor`` toward the batch mean and the
    unbiased variance (of the [BLOCK_C] Welford values), as nn.BatchNorm2d does; a channel that
    saw no element keeps its own."""
    running_mean = tl.load(running_mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    running_var = tl.load(running_var_ptr + c, mask=c_ok, other=0.0).to(ACC)
    unbiased = m2 / tl.maximum(count - 1.0, 1.0)
    seen = count > 0
    running_mean = tl.where(seen, running_mean + factor * (mean - running_mean), running_mean)
    running_var = tl.where(seen, running_var + factor * (unbiased - running_var), running_var)
    tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=c_ok)
    tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def joined_input(x_ptr, input_index, n, n_ok, c, hw, valid, join_ptr, join_stride_k, join_stride_n, seeds_ptr,
                 dropout_p, dropout_scale, C, HW, JOIN: tl.constexpr, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr):
    """(keep, x): whether input ``input_index`` holds each sample n of the tile (join_modes), and
    its values there after its dropout, 0 where it does not: a dropped row is never read.
    Returns values only, never an address (see join_row)."""
    keep, row = join_row(join_ptr, join_stride_k, join_stride_n, input_index, n, n_ok, JOIN)
    x = tl.load(x_ptr + element_offsets(row, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW),
                mask=valid & keep, other=0.0).to(ACC)
    if seeds_ptr is not None:
        x, _ = dropout(x, seeds_ptr, input_index, row, c, hw, C, HW, dropout_p, dropout_scale, INDEX_64)
    return keep, x


@triton.jit
def normalize_join_tiles(out_ptr, xs, weights, biases, means, variances, eps, join_ptr, join_stride_k,
                         join_stride_n, first_input, num_inputs, seeds_ptr, dropout_p, dropout_scale, cb, first,
                         last, N, C, HW, hw_blocks,
                         K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, ACCUMULATE: tl.constexpr,
                         ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                         FIXED_HW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_HW: tl.constexpr):
    """Writes the join of act(normalize(dropout(x_i))) to the tiles of ``out_ptr``."""
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    for t in range(first, last):
        n, c, hw, valid = tile_indices(t, cb, N, C, HW, hw_blocks, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, n_ok, num_inputs, JOIN, ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
        for i in tl.static_range(K):
            mean, rstd, w, b = channel_params(i, c_block, c_ok, eps, weights, biases, means, variances, ACC)
            keep, x = joined_input(xs[i], first_input + i, n, n_ok, c, hw, valid, join_ptr, join_stride_k,
                                   join_stride_n, seeds_ptr, dropout_p, dropout_scale, C, HW, JOIN, ACC,
                                   CHANNELS_LAST, INDEX_64, FIXED_HW)
            y = normalize(x, mean, rstd, w, b)
            if RELU:
                y = relu(y)
            acc += tl.where(keep, y, 0.0)
        out = acc * scale
        offs = element_offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW)
        if ACCUMULATE:
            out += tl.load(out_ptr + offs, mask=valid, other=0.0).to(ACC)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def gradient_sums_tiles(grad_ptr, xs, weights, biases, means, variances, eps, join_ptr, join_stride_k,
                        join_stride_n, first_input, num_inputs, seeds_ptr, dropout_p, dropout_scale, cb, first,
                        last, N, C, HW, hw_blocks,
                        K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(sums of g_i, sums of g_i * x_hat_i): per input, [BLOCK_C] sums over the tiles, where g_i
    is the output gradient routed to input i (join weight, ReLU mask) and x_hat_i the normalised
    input. The gradient is read once for all K inputs; rows of a dropped input are not read."""
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    # Per-lane sums of each input, reduced across lanes once at the end.
    zero = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_HW], ACC)
    sums_g = (zero, zero, zero, zero, zero, zero, zero, zero)
    sums_gxhat = (zero, zero, zero, zero, zero, zero, zero, zero)
    for t in range(first, last):
        n, c, hw, valid = tile_indices(t, cb, N, C, HW, hw_blocks, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, n_ok, num_inputs, JOIN, ACC)
        offs = element_offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW)
        grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(ACC) * scale
        for i in tl.static_range(K):
            mean, rstd, w, b = channel_params(i, c_block, c_ok, eps, weights, biases, means, variances, ACC)
            keep, x = joined_input(xs[i], first_input + i, n, n_ok, c, hw, valid, join_ptr, join_stride_k,
                                   join_stride_n, seeds_ptr, dropout_p, dropout_scale, C, HW, JOIN, ACC,
                                   CHANNELS_LAST, INDEX_64, FIXED_HW)
            g = tl.where(keep & valid, grad, 0.0)
            if RELU:
                g = tl.where(normalize(x, mean, rstd, w, b) > 0.0, g, 0.0)
            sums_g = add_at(i, g, sums_g)
            sums_gxhat = add_at(i, g * ((x - mean) * rstd), sums_gxhat)
    totals_g = ()
    totals_gxhat = ()
    for i in tl.static_range(K):
        totals_g = totals_g + (tl.sum(tl.sum(sums_g[i], 2), 0),)
        totals_gxhat = totals_gxhat + (tl.sum(tl.sum(sums_gxhat[i], 2), 0),)
    return totals_g, totals_gxhat


@triton.jit
def input_gradient_tiles(grad_ptr, xs, dxs, weights, biases, means, variances, eps, totals_g, totals_gxhat,
                         inv_count, join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, seeds_ptr,
                         dropout_p, dropout_scale, sample_ptr, cb, first, last, N, C, HW, hw_blocks,
                         K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr,
                         ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                         FIXED_HW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_HW: tl.constexpr):
    """Writes each input's gradient to the tiles of ``dxs``, from its per-channel totals of g and
    g * x_hat ([1, BLOCK_C, 1]; see bn_backward_dx_kernel)."""
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    for t in range(first, last):
        n, c, hw, valid = tile_indices(t, cb, N, C, HW, hw_blocks, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
        n_ok = n < N
        offs = element_offsets(n, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW)
        if JOIN == JOIN_GATHER:
            sample = tl.load(sample_ptr + n, mask=n_ok, other=-1)
            held = sample >= 0
        else:
            sample = n
            held = n_ok
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, sample, held, num_inputs, JOIN, ACC)
        grad_offs = element_offsets(sample, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW)
        grad = tl.load(grad_ptr + grad_offs, mask=valid & held, other=0.0).to(ACC) * scale
        for i in tl.static_range(K):
            mean, rstd, w, b = channel_params(i, c_block, c_ok, eps, weights, biases, means, variances, ACC)
            if JOIN == JOIN_GATHER:
                keep = held
            else:
                keep, _ = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            # With batch statistics every row has a gradient (through the mean and variance).
            if BATCH_STATS:
                x = tl.load(xs[i] + offs, mask=valid, other=0.0).to(ACC)
            else:
                x = tl.load(xs[i] + offs, mask=valid & keep, other=0.0).to(ACC)
            if seeds_ptr is not None:
                x, kept = dropout(x, seeds_ptr, first_input + i, n, c, hw, C, HW, dropout_p, dropout_scale, INDEX_64)
            g = tl.where(keep & valid, grad, 0.0)
            if RELU:
                g = tl.where(normalize(x, mean, rstd, w, b) > 0.0, g, 0.0)
            if BATCH_STATS:
                g = g - (totals_g[i] + (x - mean) * rstd * totals_gxhat[i]) * inv_count
            dx = w * rstd * g
            if seeds_ptr is not None:
                dx = tl.where(kept, dx * dropout_scale, 0.0)
            dx_ptr = dxs[i]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def channel_totals(i: tl.constexpr, sums_ptr, num_inputs, num_partials, first_input, c, c_ok, C,
                   ACC: tl.constexpr):
    """Input i's per-channel sums of g and g * x_hat over its partials ([2, num_inputs,
    num_partials, C] at ``sums_ptr``), shaped [1, BLOCK_C, 1]."""
    total_g = tl.zeros(c.shape, ACC)
    total_gxhat = tl.zeros(c.shape, ACC)
    for s in range(num_partials):
        offs = ((first_input + i) * num_partials + s) * C + c
        total_g += tl.load(sums_ptr + offs, mask=c_ok, other=0.0)
        total_gxhat += tl.load(sums_ptr + num_inputs * num_partials * C + offs, mask=c_ok, other=0.0)
    return total_g[None, :, None], total_gxhat[None, :, None]


@triton.jit
def store_param_grads(param_grads_ptr, totals_g, totals_gxhat, first_input, num_inputs, c, c_ok, C,
                      K: tl.constexpr):
    """Writes each input's totals ([1, BLOCK_C, 1]) to the [2, num_inputs, C] parameter
    gradients: weight gradients (sums of g x_hat), then bias gradients (sums of g)."""
    for i in tl.static_range(K):
        offs = (first_input + i) * C + c[None, :, None]
        tl.store(param_grads_ptr + offs, totals_gxhat[i], mask=c_ok[None, :, None])
        tl.store(param_grads_ptr + num_inputs * C + offs, totals_g[i], mask=c_ok[None, :, None])
