"""BatchNorm(+ReLU) kernels over up to eight inputs, with a join: statistics, combine, apply,
backward sums and input gradients.

Each kernel takes up to eight inputs of one shape (eight slots per per-input argument, the first
K given and the others None), each with its own affine parameters and statistics, and a join of
their outputs (join_modes): ``bn_relu`` is the case of one input and no join, ``join_bn_relu``
k inputs and a drop-path mask, ``gather_join_bn_relu`` compact inputs and a gather table. Inputs
are viewed as [N, C, HW] and tiled as channel_tiling describes.

Training forward: bn_stats_kernel + bn_combine_kernel (which also updates the running
statistics), then bn_apply_kernel. Eval: bn_apply_kernel on the running statistics. Backward:
bn_backward_reduce_kernel (per-channel sums of g and g * x_hat) and bn_backward_dx_kernel. The
backward recomputes x_hat and the ReLU mask from the raw input and the per-channel mean and
variance, so the ops save their inputs and O(C) statistics, never their output.

Row and chunk counts (``N``, ``num_rows0``..``num_rows7``, ``tiles_per_chunk``, ``num_chunks``,
``num_partials``, ``count``) and the gather backward's ``sample_ptr`` (a slice at a row offset)
are not specialised (``do_not_specialize``): they only bound loops and masks or index rows, and
under skip_dropped they change every step, so specialising on them (a value of 1, divisibility
by 16, 16-byte alignment) would compile new variants of the kernels step after step. Tile sizes
still follow small row counts (powers of two): a bounded set of variants.

Tensors a kernel writes are whole: per-input results go to [k, ...] tensors at row
``first_input + i``, so that a launch for the inputs after the eighth writes the same tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .channel_tiling import chunk_tiles, element_offsets, merge_lanes, tile_indices, welford_merge
from .join_modes import JOIN_GATHER, join_row, join_scale
from .tensors import accumulation_type

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
            keep, row = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            x = tl.load(xs[i] + element_offsets(row, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW),
                        mask=valid & keep, other=0.0).to(ACC)
            if seeds_ptr is not None:
                x, _ = dropout(x, seeds_ptr, first_input + i, row, c, hw, C, HW, dropout_p, dropout_scale, INDEX_64)
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
            keep, row = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, n_ok, JOIN)
            x = tl.load(xs[i] + element_offsets(row, c, hw, C, HW, CHANNELS_LAST, INDEX_64, FIXED_HW),
                        mask=valid & keep, other=0.0).to(ACC)
            if seeds_ptr is not None:
                x, _ = dropout(x, seeds_ptr, first_input + i, row, c, hw, C, HW, dropout_p, dropout_scale, INDEX_64)
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


# ----------------------------------------------------------------------------------------------
# Split kernels: a (channel blocks) x (chunks) grid, chunk partials merged by the next launch
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("num_rows0", "num_rows1", "num_rows2", "num_rows3", "num_rows4", "num_rows5",
                                "num_rows6", "num_rows7", "tiles_per_chunk"))
def bn_stats_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,
    num_rows0, num_rows1, num_rows2, num_rows3, num_rows4, num_rows5, num_rows6, num_rows7,
    partials_ptr, first_input, num_inputs,
    seeds_ptr, dropout_p, dropout_scale: tl.float64,
    C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Welford partials (mean, sum of squared deviations, count) of each channel of K inputs.

    Pointers: ``x0``..``x7`` are the inputs, [rows_i, C, HW] contiguous or channels-last
    (CHANNELS_LAST), with ``num_rows0``..``num_rows7`` rows. ``partials_ptr`` is [3, num_inputs,
    num_chunks, C] in the accumulation dtype (mean, m2 and count planes); input i's partials go
    to row first_input + i. ``seeds_ptr`` [k] (int64), or None without dropout, seeds the dropout
    of each input (rate ``dropout_p``, scale ``dropout_scale``): the statistics are those of the
    dropped tensor. Program (cb, chunk) covers channels cb*BLOCK_C.. and, of each input, tiles
    chunk*tiles_per_chunk.. of [BLOCK_N, BLOCK_C, BLOCK_HW].
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    num_rows = (num_rows0, num_rows1, num_rows2, num_rows3, num_rows4, num_rows5, num_rows6, num_rows7)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    for i in tl.static_range(K):
        N = num_rows[i]
        first, last = chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
        mean, m2, count = welford_tiles(xs[i], first_input + i, cb, first, last, N, C, HW, hw_blocks, seeds_ptr,
                                        dropout_p, dropout_scale, ACC, CHANNELS_LAST, INDEX_64, FIXED_HW,
                                        BLOCK_N, BLOCK_C, BLOCK_HW)
        part = ((first_input + i) * num_chunks + chunk) * C + c_block
        plane = num_inputs * num_chunks * C
        tl.store(partials_ptr + part, mean, mask=c_block < C)
        tl.store(partials_ptr + plane + part, m2, mask=c_block < C)
        tl.store(partials_ptr + 2 * plane + part, count, mask=c_block < C)


@triton.jit(do_not_specialize=("num_chunks",))
def bn_combine_kernel(
    partials_ptr, stats_ptr,
    running_mean0, running_mean1, running_mean2, running_mean3,
    running_mean4, running_mean5, running_mean6, running_mean7,
    running_var0, running_var1, running_var2, running_var3,
    running_var4, running_var5, running_var6, running_var7,
    num_batches_tracked0, num_batches_tracked1, num_batches_tracked2, num_batches_tracked3,
    num_batches_tracked4, num_batches_tracked5, num_batches_tracked6, num_batches_tracked7,
    momentum: tl.float64, first_input, num_inputs, C, num_chunks,
    K: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the chunk partials in chunk order into batch mean and biased variance, counts the
    batch, and updates the running statistics in place (unbiased variance), as nn.BatchNorm2d
    does; an input with no rows leaves its running statistics unchanged.

    Pointers: partials as written by bn_stats_kernel; ``stats_ptr`` is the [2, num_inputs, C]
    output in the accumulation dtype (mean and biased variance planes, row first_input + i for
    input i); ``running_mean0``..7 and
    ``running_var0``..7 are each input's running statistics, ``num_batches_tracked0``..7 its int64
    num_batches_tracked, incremented by one; None where absent. The running statistics move by
    ``momentum``, or with CUMULATIVE by 1 / num_batches_tracked (momentum=None in torch). One
    program: it reads each counter before it writes it, and the work is O(k * C * chunks).
    """
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    plane = num_inputs * num_chunks * C
    running_means = (running_mean0, running_mean1, running_mean2, running_mean3,
                     running_mean4, running_mean5, running_mean6, running_mean7)
    running_vars = (running_var0, running_var1, running_var2, running_var3,
                    running_var4, running_var5, running_var6, running_var7)
    counters = (num_batches_tracked0, num_batches_tracked1, num_batches_tracked2, num_batches_tracked3,
                num_batches_tracked4, num_batches_tracked5, num_batches_tracked6, num_batches_tracked7)
    for i in tl.static_range(K):
        factor = exact_scalar(momentum, ACC)
        if counters[i] is not None:
            counted = tl.load(counters[i]) + 1
            tl.store(counters[i], counted)
            if CUMULATIVE:
                factor = 1.0 / counted.to(ACC)
        for cb in range(tl.cdiv(C, BLOCK_C)):
            c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mean = tl.zeros([BLOCK_C], ACC)
            m2 = tl.zeros([BLOCK_C], ACC)
            count = tl.zeros([BLOCK_C], ACC)
            for s in range(num_chunks):
                part = ((first_input + i) * num_chunks + s) * C + c
                mean, m2, count = welford_merge(
                    mean, m2, count,
                    tl.load(partials_ptr + part, mask=c_ok, other=0.0),
                    tl.load(partials_ptr + plane + part, mask=c_ok, other=0.0),
                    tl.load(partials_ptr + 2 * plane + part, mask=c_ok, other=0.0),
                )
            tl.store(stats_ptr + (first_input + i) * C + c, mean, mask=c_ok)
            tl.store(stats_ptr + (num_inputs + first_input + i) * C + c, m2 / tl.maximum(count, 1.0), mask=c_ok)
            if running_means[i] is not None:
                update_running(running_means[i], running_vars[i], c, c_ok, mean, m2, count, factor, ACC)


@triton.jit(do_not_specialize=("N", "tiles_per_chunk"))
def bn_apply_kernel(
    out_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7,
    var0, var1, var2, var3, var4, var5, var6, var7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps: tl.float64,
    seeds_ptr, dropout_p, dropout_scale: tl.float64,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, ACCUMULATE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = join over inputs of act((x_i - mean_i) * rstd_i * w_i + b_i), in one pass.

    Pointers: ``out_ptr`` is [N, C, HW]; ``x0``..``x7`` share its layout, each with its own
    rows; ``w``/``b`` are per-input weights and biases (None where absent); ``mean``/``var``
    per-input mean and variance (batch statistics in training, running statistics in eval);
    ``join_ptr`` with its strides is the join of inputs first_input.. of a num_inputs-input join
    (join_modes); ``seeds_ptr`` with the dropout rate and scale as in bn_stats_kernel. RELU
    applies the ReLU; ACCUMULATE adds to out (groups after the first when k > 8). Rows of a
    dropped input are not read.
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    weights = (w0, w1, w2, w3, w4, w5, w6, w7)
    biases = (b0, b1, b2, b3, b4, b5, b6, b7)
    means = (mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7)
    variances = (var0, var1, var2, var3, var4, var5, var6, var7)
    eps = exact_scalar(eps, ACC)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    first, last = chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    normalize_join_tiles(out_ptr, xs, weights, biases, means, variances, eps, join_ptr, join_stride_k,
                         join_stride_n, first_input, num_inputs, seeds_ptr, dropout_p, dropout_scale,
                         tl.program_id(0), first, last, N, C, HW, hw_blocks, K, JOIN, RELU, ACCUMULATE, ACC,
                         CHANNELS_LAST, INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)


@triton.jit(do_not_specialize=("N", "tiles_per_chunk"))
def bn_backward_reduce_kernel(
    grad_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7,
    var0, var1, var2, var3, var4, var5, var6, var7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps: tl.float64,
    seeds_ptr, dropout_p, dropout_scale: tl.float64,
    sums_ptr,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per-chunk sums over each channel of g_i and g_i * x_hat_i for K inputs (gradient_sums_tiles).

    Pointers as in bn_apply_kernel, with ``grad_ptr`` the [N, C, HW] output gradient;
    ``sums_ptr`` is the [2, num_inputs, num_chunks, C] output (accumulation dtype; sums of g and
    of g * x_hat, row first_input + i for input i).
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    weights = (w0, w1, w2, w3, w4, w5, w6, w7)
    biases = (b0, b1, b2, b3, b4, b5, b6, b7)
    means = (mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7)
    variances = (var0, var1, var2, var3, var4, var5, var6, var7)
    eps = exact_scalar(eps, ACC)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    first, last = chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    sums_g, sums_gxhat = gradient_sums_tiles(grad_ptr, xs, weights, biases, means, variances, eps, join_ptr,
                                             join_stride_k, join_stride_n, first_input, num_inputs, seeds_ptr,
                                             dropout_p, dropout_scale, cb, first, last, N, C, HW, hw_blocks, K, JOIN,
                                             RELU, ACC, CHANNELS_LAST, INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C,
                                             BLOCK_HW)
    for i in tl.static_range(K):
        part = ((first_input + i) * num_chunks + chunk) * C + c_block
        tl.store(sums_ptr + part, sums_g[i], mask=c_ok)
        tl.store(sums_ptr + num_inputs * num_chunks * C + part, sums_gxhat[i], mask=c_ok)


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


@triton.jit(do_not_specialize=("sample_ptr", "num_partials", "count", "N", "tiles_per_chunk"))
def bn_backward_dx_kernel(
    grad_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7,
    var0, var1, var2, var3, var4, var5, var6, var7,
    join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, eps: tl.float64,
    seeds_ptr, dropout_p, dropout_scale: tl.float64, sample_ptr,
    sums_ptr, num_partials, param_grads_ptr, count,
    N, C, HW, hw_blocks, tiles_per_chunk,
    K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Input gradients of K inputs, and the weight and bias gradients.

    dx_i = w_i * rstd_i * (g_i - (sum g_i + x_hat_i * sum g_i x_hat_i) / count) with batch
    statistics (BATCH_STATS), w_i * rstd_i * g_i with running statistics, through the dropout
    when ``seeds_ptr`` is given. Pointers as in
    bn_backward_reduce_kernel plus ``dx0``..``dx7`` (outputs in the inputs' layouts); the sums
    come as ``num_partials`` partials per channel ([2, num_inputs, num_partials, C]); programs
    of chunk 0 write the totals to ``param_grads_ptr`` [2, num_inputs, C] (weight gradients,
    sum g x_hat, then bias gradients, sum g) unless it is None. ``count`` is the number of
    elements per channel the sums cover.

    The tile rows are the N rows of the inputs. For a gather join (JOIN_GATHER, one input per
    launch) ``sample_ptr`` [N] maps each row to the output sample it holds (-1 for none), whose
    gradient it reads; otherwise a row is a sample and ``sample_ptr`` is None.
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    dxs = (dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7)
    weights = (w0, w1, w2, w3, w4, w5, w6, w7)
    biases = (b0, b1, b2, b3, b4, b5, b6, b7)
    means = (mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7)
    variances = (var0, var1, var2, var3, var4, var5, var6, var7)
    eps = exact_scalar(eps, ACC)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    inv_count = 1.0 / tl.maximum(tl.cast(count, ACC), 1.0)
    cb = tl.program_id(0)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    totals_g = ()
    totals_gxhat = ()
    for i in tl.static_range(K):
        total_g, total_gxhat = channel_totals(i, sums_ptr, num_inputs, num_partials, first_input, c_block, c_ok, C,
                                              ACC)
        totals_g = totals_g + (total_g,)
        totals_gxhat = totals_gxhat + (total_gxhat,)
    if param_grads_ptr is not None:
        if tl.program_id(1) == 0:
            store_param_grads(param_grads_ptr, totals_g, totals_gxhat, first_input, num_inputs, c_block, c_ok, C, K)
    first, last = chunk_tiles(N, hw_blocks, tiles_per_chunk, BLOCK_N)
    input_gradient_tiles(grad_ptr, xs, dxs, weights, biases, means, variances, eps, totals_g, totals_gxhat,
                         inv_count, join_ptr, join_stride_k, join_stride_n, first_input, num_inputs, seeds_ptr,
                         dropout_p, dropout_scale, sample_ptr, cb, first, last, N, C, HW, hw_blocks, K, JOIN, RELU,
                         BATCH_STATS, ACC, CHANNELS_LAST, INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)


# ----------------------------------------------------------------------------------------------
# Single-pass kernels: one program per channel block covers all its tiles (channel_tiling gives
# small problems one chunk), so the statistics or gradient sums need no second launch
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("N",))
def bn_forward_kernel(
    out_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    running_mean0, running_mean1, running_mean2, running_mean3,
    running_mean4, running_mean5, running_mean6, running_mean7,
    running_var0, running_var1, running_var2, running_var3,
    running_var4, running_var5, running_var6, running_var7,
    num_batches_tracked0, num_batches_tracked1, num_batches_tracked2, num_batches_tracked3,
    num_batches_tracked4, num_batches_tracked5, num_batches_tracked6, num_batches_tracked7,
    stats_ptr, momentum: tl.float64,
    join_ptr, join_stride_k, join_stride_n, eps: tl.float64,
    seeds_ptr, dropout_p, dropout_scale: tl.float64,
    N, C, HW, hw_blocks,
    K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """The training forward of K inputs in one launch: bn_stats_kernel, bn_combine_kernel and
    bn_apply_kernel for a grid of one chunk, with the same arithmetic in the same order (the
    same results, bit for bit).

    Pointers as in those kernels (``stats_ptr`` [2, K, C]; the running statistics move by
    ``momentum``); every input has the output's N rows. Program cb covers channels
    cb*BLOCK_C.. over all rows: it merges its statistics itself, then normalises. Program 0
    counts the batch (no program reads the counters: no cumulative average here).
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    weights = (w0, w1, w2, w3, w4, w5, w6, w7)
    biases = (b0, b1, b2, b3, b4, b5, b6, b7)
    running_means = (running_mean0, running_mean1, running_mean2, running_mean3,
                     running_mean4, running_mean5, running_mean6, running_mean7)
    running_vars = (running_var0, running_var1, running_var2, running_var3,
                    running_var4, running_var5, running_var6, running_var7)
    counters = (num_batches_tracked0, num_batches_tracked1, num_batches_tracked2, num_batches_tracked3,
                num_batches_tracked4, num_batches_tracked5, num_batches_tracked6, num_batches_tracked7)
    eps = exact_scalar(eps, ACC)
    factor = exact_scalar(momentum, ACC)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    cb = tl.program_id(0)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    last = tl.cdiv(N, BLOCK_N) * hw_blocks
    means, variances = statistics_pointers(stats_ptr, C, K)
    for i in tl.static_range(K):
        mean, m2, count = welford_tiles(xs[i], i, cb, 0, last, N, C, HW, hw_blocks, seeds_ptr, dropout_p,
                                        dropout_scale, ACC, CHANNELS_LAST, INDEX_64, FIXED_HW,
                                        BLOCK_N, BLOCK_C, BLOCK_HW)
        tl.store(means[i] + c_block, mean, mask=c_ok)
        tl.store(variances[i] + c_block, m2 / tl.maximum(count, 1.0), mask=c_ok)
        if running_means[i] is not None:
            update_running(running_means[i], running_vars[i], c_block, c_ok, mean, m2, count, factor, ACC)
        if counters[i] is not None:
            if cb == 0:
                tl.store(counters[i], tl.load(counters[i]) + 1)
    # The apply pass reads the statistics back, as the split apply kernel does: the threads that
    # load a channel's statistics are not those that stored them, hence the barrier.
    tl.debug_barrier()
    normalize_join_tiles(out_ptr, xs, weights, biases, means, variances, eps, join_ptr, join_stride_k,
                         join_stride_n, 0, K, seeds_ptr, dropout_p, dropout_scale, cb, 0, last, N, C, HW, hw_blocks,
                         K, JOIN, RELU, False, ACC, CHANNELS_LAST, INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)


@triton.jit(do_not_specialize=("N",))
def bn_backward_kernel(
    grad_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    b0, b1, b2, b3, b4, b5, b6, b7,
    mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7,
    var0, var1, var2, var3, var4, var5, var6, var7, stats_ptr,
    join_ptr, join_stride_k, join_stride_n, eps: tl.float64,
    seeds_ptr, dropout_p, dropout_scale: tl.float64, param_grads_ptr,
    N, C, HW, hw_blocks,
    K: tl.constexpr, JOIN: tl.constexpr, RELU: tl.constexpr, BATCH_STATS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, FIXED_HW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """The backward of K inputs in one launch: bn_backward_reduce_kernel and
    bn_backward_dx_kernel for a grid of one chunk, with the same arithmetic in the same order.

    Pointers as in bn_backward_dx_kernel (no gather join; ``param_grads_ptr`` [2, K, C]), the
    means and variances either per input or, as bn_forward_kernel writes the batch statistics,
    in one [2, K, C] tensor at ``stats_ptr`` (the per-input slots then None). Program cb sums
    the gradients of channels cb*BLOCK_C.. over all rows, writes their parameter gradients,
    then the input gradients.
    """
    ACC: tl.constexpr = accumulation_type(x0.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    dxs = (dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7)
    weights = (w0, w1, w2, w3, w4, w5, w6, w7)
    biases = (b0, b1, b2, b3, b4, b5, b6, b7)
    if stats_ptr is not None:
        means, variances = statistics_pointers(stats_ptr, C, K)
    else:
        means = (mean0, mean1, mean2, mean3, mean4, mean5, mean6, mean7)
        variances = (var0, var1, var2, var3, var4, var5, var6, var7)
    eps = exact_scalar(eps, ACC)
    dropout_scale = exact_scalar(dropout_scale, ACC)
    inv_count = 1.0 / tl.maximum(tl.cast(N * HW, ACC), 1.0)
    cb = tl.program_id(0)
    c_block = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c_block < C
    last = tl.cdiv(N, BLOCK_N) * hw_blocks
    sums_g, sums_gxhat = gradient_sums_tiles(grad_ptr, xs, weights, biases, means, variances, eps, join_ptr,
                                             join_stride_k, join_stride_n, 0, K, seeds_ptr, dropout_p, dropout_scale,
                                             cb, 0, last, N, C, HW, hw_blocks, K, JOIN, RELU, ACC, CHANNELS_LAST,
                                             INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
    # The split path's totals: its one partial added to zero (exact).
    totals_g = ()
    totals_gxhat = ()
    for i in tl.static_range(K):
        totals_g = totals_g + (sums_g[i][None, :, None],)
        totals_gxhat = totals_gxhat + (sums_gxhat[i][None, :, None],)
    if param_grads_ptr is not None:
        store_param_grads(param_grads_ptr, totals_g, totals_gxhat, 0, K, c_block, c_ok, C, K)
    input_gradient_tiles(grad_ptr, xs, dxs, weights, biases, means, variances, eps, totals_g, totals_gxhat,
                         inv_count, join_ptr, join_stride_k, join_stride_n, 0, K, seeds_ptr, dropout_p, dropout_scale,
                         None, cb, 0, last, N, C, HW, hw_blocks, K, JOIN, RELU, BATCH_STATS, ACC, CHANNELS_LAST,
                         INDEX_64, FIXED_HW, BLOCK_N, BLOCK_C, BLOCK_HW)
