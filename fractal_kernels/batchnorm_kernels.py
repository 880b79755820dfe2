"""BatchNorm(+ReLU) kernels over up to eight inputs, with a join: statistics, combine, apply,
backward sums and input gradients.

Each kernel takes up to eight inputs of one shape (eight slots per per-input argument, the first
K given and the others None), each with its own affine parameters and statistics, and a join of
their outputs (join_modes): ``bn_relu`` is the case of one input and no join, ``join_bn_relu``
k inputs and a drop-path mask, ``gather_join_bn_relu`` compact inputs and a gather table. Inputs
are viewed as [N, C, HW] and tiled as channel_tiling describes.

Training forward: bn_stats_kernel + bn_combine_kernel (which also updates the running
statistics), then bn_apply_kernel. Eval: bn_apply_kernel on the running statistics. Backward:
bn_backward_sums_kernel (per-channel sums of g and g * x_hat) and bn_backward_dx_kernel. The
backward recomputes x_hat and the ReLU mask from the raw input and the per-channel mean and
variance, so the ops save their inputs and O(C) statistics, never their output.

Row and chunk counts (``N``, ``num_rows0``..``num_rows7``, ``tiles_per_chunk``, ``num_chunks``,
``num_partials``, ``count``), the gather backward's ``sample_ptr`` (a slice at a row offset) and
``first_input`` are not specialised (``do_not_specialize``): they only bound loops and masks or
index rows, and under skip_dropped they change every step, so specialising on them (a value of
1, divisibility by 16, 16-byte alignment) would compile new variants of the kernels step after
step (``first_input``, the input a gather backward launch writes, would compile three: 0, 1 and
the rest). Tile sizes
still follow small row counts (powers of two): a bounded set of variants. Nor is the alignment
of the dropout ``seeds_ptr`` (``SEEDS``): a unit's seed is one int64 of a step's seeds, a slice
at an 8-byte offset, read once per program; its alignment only doubled the compiled variants
(and the guards a launch tries).

Tensors a kernel writes are whole: per-input results go to [k, ...] tensors at row
``first_input + i``, so that a launch for the inputs after the eighth writes the same tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .batchnorm_tiles import (
    channel_totals, exact_scalar, gradient_sums_tiles, input_gradient_tiles, normalize_join_tiles, statistics_pointers,
    store_param_grads, update_running, welford_tiles,
)
from .channel_tiling import chunk_tiles, welford_merge
from .launch import Kernel
from .tensors import accumulation_type

#: The parameters not specialised on their alignment: the dropout seeds (see above).
SEEDS = ("seeds_ptr",)

# ----------------------------------------------------------------------------------------------
# Split kernels: a (channel blocks) x (chunks) grid, chunk partials merged by the next launch
# ----------------------------------------------------------------------------------------------


@Kernel
@triton.jit(do_not_specialize=("num_rows0", "num_rows1", "num_rows2", "num_rows3", "num_rows4", "num_rows5",
                                "num_rows6", "num_rows7", "tiles_per_chunk", "first_input"),
            do_not_specialize_on_alignment=SEEDS)
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


@Kernel
@triton.jit(do_not_specialize=("num_chunks", "first_input"))
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


@Kernel
@triton.jit(do_not_specialize=("N", "tiles_per_chunk", "first_input"), do_not_specialize_on_alignment=SEEDS)
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


@Kernel
@triton.jit(do_not_specialize=("N", "tiles_per_chunk", "first_input"), do_not_specialize_on_alignment=SEEDS)
def bn_backward_sums_kernel(
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


@Kernel
@triton.jit(do_not_specialize=("sample_ptr", "num_partials", "count", "N", "tiles_per_chunk", "first_input"),
            do_not_specialize_on_alignment=SEEDS)
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
    bn_backward_sums_kernel plus ``dx0``..``dx7`` (outputs in the inputs' layouts); the sums
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


@Kernel
@triton.jit(do_not_specialize=("N",), do_not_specialize_on_alignment=SEEDS)
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


@Kernel
@triton.jit(do_not_specialize=("N",), do_not_specialize_on_alignment=SEEDS)
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
    """The backward of K inputs in one launch: bn_backward_sums_kernel and
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
