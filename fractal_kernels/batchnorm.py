"""BatchNorm(+ReLU) ops over k inputs with a join: launchers, torch.library ops and autograd.

The kernels are batchnorm_kernels.py's. Three ops carry them: ``bn_stats`` (batch statistics and
the running-statistic update; it mutates, so it has no autograd of its own), ``bn_apply`` (the
normalised, activated and joined output) and ``bn_backward`` (its backward, which differentiates
through the batch statistics). ``batch_norm_join`` composes them into the op behind bn_relu,
join_bn_relu and gather_join_bn_relu (library.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch

from . import recompute
from .batchnorm_kernels import (
    bn_apply_kernel,
    bn_backward_dx_kernel,
    bn_backward_reduce_kernel,
    bn_combine_kernel,
    bn_stats_kernel,
)
from .channel_tiling import ChannelTiling, channel_tiling
from .join_modes import join_args, row_samples
from .launch import (
    REDUCTION_REGISTERS, define_op, input_groups, launch, next_power_of_2, optional, slots,
    wrap_triton,
)
from .tensors import acc_dtype, dense, dense_inputs, like_rows, memory_format

#: Channels per program of the combine stage.
_COMBINE_BLOCK_C = 128


def placeholder(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor standing for an absent optional: the ops take list[Tensor], not
    list[Optional[Tensor]], and the launchers pass None for it (launch.optional)."""
    return x.new_empty(0)


def dropout_args(seeds: Optional[torch.Tensor], p: float) -> tuple:
    """The kernels' dropout arguments (seeds, rate, scale): None without seeds (no dropout)."""
    if seeds is None or p == 0:
        return None, 0.0, 1.0
    return seeds, float(p), 1.0 / (1.0 - p) if p < 1 else 0.0


def batch_statistics(xs: list[torch.Tensor], running_means: Sequence, running_vars: Sequence,
                     num_batches_tracked: Optional[Sequence], momentum: Optional[float],
                     seeds: Optional[torch.Tensor] = None, dropout: float = 0.0,
                     tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """Batch mean and biased variance of every channel of every (dense) input, after its dropout
    when ``seeds`` [k] are given, as a [2, k, C] tensor (fp32; fp64 for fp64 inputs). Inputs may
    differ in their number of rows (gathered column segments).

    Counts the batch in each present ``num_batches_tracked`` (an int64 counter) and updates the
    present running statistics (None stands for an absent one) with ``momentum``, or with
    momentum None by the cumulative average, and the unbiased variance; an input with no rows
    leaves its running statistics unchanged. ``tiling``: the inputs' (computed when None).

    Launches bn_stats_kernel and bn_combine_kernel once for up to eight inputs.
    """
    k = len(xs)
    if tiling is None:
        tiling = channel_tiling(xs[0] if k == 1 else max(xs, key=lambda x: x.shape[0]), k)
    C, chunks = tiling.C, tiling.num_chunks
    dtype, device = acc_dtype(xs[0].dtype), xs[0].device
    stats = torch.empty(2, k, C, dtype=dtype, device=device)
    partials = torch.empty(3, k, chunks, C, dtype=dtype, device=device)  # mean, m2, count
    block_c = min(_COMBINE_BLOCK_C, next_power_of_2(C))
    num_batches_tracked = num_batches_tracked or (None,) * k
    drop = dropout_args(seeds, dropout)
    factor = 0.0 if momentum is None else float(momentum)
    num_rows = [x.shape[0] for x in xs]
    for group in input_groups(k):
        launch(
            wrap_triton(bn_stats_kernel), tiling.grid,
            *slots(xs, group), *slots(num_rows, group), partials, group.start, k, *drop,
            *tiling.block_args(), K=len(group), **tiling.meta(streaming=False),
        )
        launch(
            wrap_triton(bn_combine_kernel), (1,),
            partials, stats, *slots(running_means, group), *slots(running_vars, group),
            *slots(num_batches_tracked, group),
            factor, group.start, k, C, chunks,
            K=len(group), CUMULATIVE=momentum is None, BLOCK_C=block_c, num_warps=4, maxnreg=REDUCTION_REGISTERS,
        )
    return stats


def _channel_args(group: range, weights, biases, means, variances, join: tuple, num_inputs: int, eps: float,
                  drop: tuple) -> tuple:
    """The per-channel, join and dropout arguments of the apply and backward kernels, for one
    group of inputs (None for absent weights and biases)."""
    return (
        *slots(weights, group), *slots(biases, group), *slots(means, group), *slots(variances, group), *join,
        group.start, num_inputs, float(eps), *drop,
    )


def normalize_join(xs: Sequence[torch.Tensor], mask, rows, weights: Sequence, biases: Sequence, means: Sequence,
                   variances: Sequence, eps: float, relu: bool, seeds: Optional[torch.Tensor] = None,
                   dropout: float = 0.0, tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """The join (plain mean, ``mask`` or gather table ``rows``) over (dense) inputs of
    act((dropout(x_i) - mean_i) / sqrt(var_i + eps) * w_i + b_i), dropout seeded by ``seeds``
    [k] where given. None stands for an absent weight or bias. ``tiling``: the output's
    (computed when None). One launch for up to eight inputs.
    """
    out = torch.empty_like(xs[0]) if rows is None else like_rows(xs[0], rows.shape[1])
    if out.numel() == 0:
        return out
    if tiling is None:
        tiling = channel_tiling(out, len(xs))
    join, mode = join_args(mask, rows)
    drop = dropout_args(seeds, dropout)
    for g, group in enumerate(input_groups(len(xs))):
        launch(
            wrap_triton(bn_apply_kernel), tiling.grid,
            out, *slots(xs, group), *_channel_args(group, weights, biases, means, variances, join, len(xs), eps, drop),
            tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=relu, ACCUMULATE=g > 0,
            **tiling.meta(streaming=True),
        )
    return out


def bn_backward_sums(grad, xs, mask, rows, weights, biases, means, variances, eps, relu, drop,
                     tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """Per-chunk sums of g_i and of g_i * x_hat_i over the output rows, as [2, k, chunks, C]
    (bn_backward_reduce_kernel); ``drop`` are the dropout arguments (dropout_args), ``tiling``
    the gradient's (computed when None)."""
    k = len(xs)
    if tiling is None:
        tiling = channel_tiling(grad, k)
    join, mode = join_args(mask, rows)
    sums = torch.empty(2, k, tiling.num_chunks, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    for group in input_groups(k):
        launch(
            wrap_triton(bn_backward_reduce_kernel), tiling.grid,
            grad, *slots(xs, group), *_channel_args(group, weights, biases, means, variances, join, k, eps, drop),
            sums, tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=relu, **tiling.meta(streaming=False),
        )
    return sums


def bn_backward_dx(grad, xs, mask, rows, weights, biases, means, variances, eps, relu, drop, batch_stats, sums,
                   count=None, param_grads=True, tiling: Optional[ChannelTiling] = None):
    """Input gradients (the inputs' shapes) and the [2, k, C] weight and bias gradients (None
    without ``param_grads``) from the [2, k, P, C] partial sums (bn_backward_dx_kernel): one
    launch per group of eight inputs, or, for a gather join, one per input over its own rows.
    ``count``: the elements per channel the sums cover (default: the inputs' own); ``tiling``:
    the inputs' (without a gather join; computed when None)."""
    k = len(xs)
    sums = sums.contiguous()  # the kernel indexes it densely
    join, mode = join_args(mask, rows)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grads = torch.empty(2, k, grad.shape[1], dtype=sums.dtype, device=grad.device) if param_grads else None
    if rows is None:
        tiling = tiling or channel_tiling(xs[0], k)
        launches = [(group, tiling, None) for group in input_groups(k)]
    else:
        samples = row_samples(rows, [x.shape[0] for x in xs])
        # The gradient rows the compact rows read can lie beyond 2**31 elements of the gradient.
        index_64 = grad.numel() >= 2**31
        launches = [(range(i, i + 1), channel_tiling(xs[i], 1, index_64), samples[i]) for i in range(k)]
    for group, tiling, sample in launches:
        launch(
            wrap_triton(bn_backward_dx_kernel), tiling.grid,
            grad, *slots(xs, group), *slots(grad_inputs, group),
            *_channel_args(group, weights, biases, means, variances, join, k, eps, drop), sample,
            sums, sums.shape[2], grads, tiling.count if count is None else count,
            tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=relu, BATCH_STATS=batch_stats,
            **tiling.meta(streaming=True),
        )
    return grad_inputs, grads


def normalize_join_backward(grad: torch.Tensor, xs: Sequence[torch.Tensor], mask, rows, weights: Sequence,
                            biases: Sequence, means: Sequence, variances: Sequence, batch_stats: bool, eps: float,
                            relu: bool, seeds: Optional[torch.Tensor] = None, dropout: float = 0.0,
                            tiling: Optional[ChannelTiling] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward of normalize_join: the input gradients (through the dropout, which it
    regenerates from ``seeds``) and the [2, k, C] weight and bias gradients; with
    ``batch_stats`` the means and variances are the inputs' batch statistics (training), which
    it differentiates through, otherwise constants (running statistics).

    Two launches for up to eight inputs (one when no sums are needed: running statistics and no
    affine parameters); a gather join launches the input-gradient kernel once per input.
    ``tiling``: the inputs' (computed when None; none for a gather join).
    """
    grad = grad.contiguous(memory_format=memory_format(xs[0]))
    if rows is None and tiling is None:
        tiling = channel_tiling(grad, len(xs))
    args = (grad, xs, mask, rows, weights, biases, means, variances, eps, relu, dropout_args(seeds, dropout))
    if batch_stats or any(t is not None for t in weights) or any(t is not None for t in biases):
        sums = bn_backward_sums(*args, tiling=tiling)
    else:
        sums = grad.new_empty(2, len(xs), 0, grad.shape[1], dtype=acc_dtype(grad.dtype))
    return bn_backward_dx(*args, batch_stats, sums, tiling=tiling)


def param_grads(grads: torch.Tensor, params: Sequence) -> list[Optional[torch.Tensor]]:
    """Row i of the [k, C] ``grads`` in the dtype of the present ``params[i]``, None where absent
    (None or an empty placeholder)."""
    return [None if optional(p) is None else g if g.dtype == p.dtype else g.to(p.dtype)
            for g, p in zip(grads.unbind(0), params)]


def present(tensors: Sequence) -> list:
    """The ops' tensor lists with their empty placeholders as None, as the launchers take them."""
    return [optional(t) for t in tensors]


# ----------------------------------------------------------------------------------------------
# torch.library ops (what torch.compile traces) and the eager autograd.Function
# ----------------------------------------------------------------------------------------------


@define_op("fractal_kernels::bn_stats", mutates_args=("running_means", "running_vars", "num_batches_tracked"))
def bn_stats(
    inputs: list[torch.Tensor],
    running_means: list[torch.Tensor],
    running_vars: list[torch.Tensor],
    num_batches_tracked: list[torch.Tensor],
    momentum: Optional[float],
    seeds: Optional[torch.Tensor],
    dropout: float,
) -> torch.Tensor:
    """batch_statistics as a torch.library op (empty tensors stand for absent running statistics
    and counters)."""
    return batch_statistics(dense_inputs(inputs), present(running_means), present(running_vars),
                            present(num_batches_tracked), momentum, seeds, dropout)


@define_op("fractal_kernels::bn_apply")
def bn_apply(
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    seeds: Optional[torch.Tensor],
    dropout: float,
    batch_stats: bool,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """normalize_join as a torch.library op; ``batch_stats`` says whether its backward
    differentiates through the means and variances (see normalize_join_backward)."""
    return normalize_join(dense_inputs(inputs), mask, rows, present(weights), present(biases), means, variances, eps,
                          relu, seeds, dropout)


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
    seeds: Optional[torch.Tensor],
    dropout: float,
    batch_stats: bool,
    eps: float,
    relu: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """normalize_join_backward as a torch.library op."""
    return normalize_join_backward(grad, dense_inputs(inputs), mask, rows, present(weights), present(biases), means,
                                   variances, batch_stats, eps, relu, seeds, dropout)


def _apply_setup_context(ctx, inputs, output):
    xs, mask, rows, weights, biases, means, variances, seeds, dropout, batch_stats, eps, relu = inputs
    ctx.num_inputs = len(xs)
    ctx.options = (dropout, batch_stats, eps, relu)
    ctx.save_for_backward(mask, rows, seeds, *xs, *weights, *biases, *means, *variances)


def _apply_backward(ctx, grad):
    mask, rows, seeds, *saved = ctx.saved_tensors
    k = ctx.num_inputs
    xs, weights, biases, means, variances = (saved[j * k:(j + 1) * k] for j in range(5))
    grad_inputs, grads = bn_backward(grad, xs, mask, rows, weights, biases, means, variances, seeds, *ctx.options)
    return (grad_inputs, None, None, param_grads(grads[0], weights), param_grads(grads[1], biases), [None] * k,
            [None] * k, None, None, None, None, None)


bn_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)


class BatchNormOptions(NamedTuple):
    """The non-tensor arguments of one eager batch_norm_join call, and its running statistics
    and counters (None where absent), which autograd need not see."""

    training: bool
    momentum: Optional[float]
    eps: float
    relu: bool
    dropout: float
    running_means: Sequence
    running_vars: Sequence


class BatchNormJoinFunction(torch.autograd.Function):
    """batch_norm_join in eager mode: the apply launcher and its backward, without torch.library's
    Python dispatch (which costs more host time than the launches themselves). Its autograd
    arguments are the inputs, weights and biases (None where absent); ``stats`` are the batch
    statistics in training (differentiated through, as a function of the inputs) and None in eval."""

    @staticmethod
    def forward(ctx, options: BatchNormOptions, mask, rows, seeds, stats, tiling, *tensors):
        k = len(tensors) // 3
        xs, weights, biases = tensors[:k], tensors[k:2 * k], tensors[2 * k:]
        means, variances = input_statistics(stats, options)
        ctx.options, ctx.tiling = options, tiling  # the backward's tiling too: computed once
        ctx.save_for_backward(mask, rows, seeds, stats, *tensors)
        return normalize_join(xs, mask, rows, weights, biases, means, variances, options.eps, options.relu, seeds,
                              options.dropout, tiling)

    @staticmethod
    def backward(ctx, grad):
        options = ctx.options
        mask, rows, seeds, stats, *tensors = ctx.saved_tensors
        k = len(tensors) // 3
        weights, biases = tensors[k:2 * k], tensors[2 * k:]
        grad_inputs, grads = normalize_join_backward(grad, tensors[:k], mask, rows, weights, biases,
                                                     *input_statistics(stats, options), options.training, options.eps,
                                                     options.relu, seeds, options.dropout, ctx.tiling)
        return (None, None, None, None, None, None, *grad_inputs, *param_grads(grads[0], weights),
                *param_grads(grads[1], biases))


def input_statistics(stats: Optional[torch.Tensor], options: BatchNormOptions) -> tuple[Sequence, Sequence]:
    """The per-input means and variances: the [C] slices of the [2, k, C] batch statistics, or the
    running statistics where there are none (eval)."""
    if stats is None:
        return options.running_means, options.running_vars
    k = stats.shape[1]
    slices = stats.view(2 * k, stats.shape[2]).unbind(0)
    return slices[:k], slices[k:]


def batch_norm_join(inputs, mask, weights, biases, running_means, running_vars, training, momentum, eps, relu,
                    rows=None, num_batches_tracked=None, dropout=0.0, seeds=None):
    """The join (``mask`` or gather table ``rows``) of [bn(+relu)(dropout(x_i)) for each input]
    in eager mode: in training the statistics of all inputs (with the running-statistic and
    batch-count updates), then one apply pass, launched directly (BatchNormJoinFunction carries
    the autograd). A nonzero ``dropout`` rate applies, whatever ``training`` says (the caller
    passes 0 where its dropout is off), seeded by ``seeds`` [k] (int64; drawn here from torch's
    generator when None). None stands for any absent tensor."""
    xs = dense_inputs(inputs)
    if dropout and seeds is None:
        seeds = draw_seeds(len(xs), xs[0].device)
    # Without a gather table the statistics, apply and backward passes share one tiling.
    tiling = channel_tiling(xs[0], len(xs)) if rows is None else None
    stats = None
    if training:
        # The statistics carry no autograd of their own (launches record none): the apply's
        # backward differentiates through them.
        stats = batch_statistics(xs, running_means, running_vars, num_batches_tracked, momentum, seeds, dropout, tiling)
    options = BatchNormOptions(training, momentum, eps, relu, dropout, running_means, running_vars)
    out = BatchNormJoinFunction.apply(options, mask, rows, seeds, stats, tiling, *xs, *weights, *biases)
    if recompute.recording():
        recompute.register(out, functools.partial(normalize_join, xs, mask, rows, weights, biases,
                                                  *input_statistics(stats, options), eps, relu, seeds, dropout, tiling))
    return out


def traced_batch_norm_join(inputs, mask, weights, biases, running_means, running_vars, training, momentum, eps, relu,
                           rows=None, num_batches_tracked=None, dropout=0.0, seeds=None):
    """batch_norm_join through the torch.library ops, as torch traces it (the composite ops of
    library.py): bn_stats, then bn_apply with its registered autograd. Empty placeholders stand
    for absent tensors (the ops take list[Tensor])."""
    xs = dense_inputs(inputs)
    absent = placeholder(xs[0])

    def filled(tensors):
        return [absent if t is None else t for t in tensors]

    if dropout and seeds is None:
        seeds = draw_seeds(len(xs), xs[0].device)
    if training:
        stats = bn_stats([x.detach() for x in xs], filled(running_means), filled(running_vars),
                         filled(num_batches_tracked or [None] * len(xs)), momentum, seeds, dropout)
        means, variances = list(stats[0].unbind(0)), list(stats[1].unbind(0))
    else:
        means, variances = list(running_means), list(running_vars)
    args = (xs, mask, rows, filled(weights), filled(biases), means, variances, seeds, dropout, training, eps, relu)
    out = bn_apply(*args)
    if recompute.recording():
        recompute.register(out, functools.partial(bn_apply, *args))
    return out


def draw_seeds(n: int, device: torch.device) -> torch.Tensor:
    """n dropout seeds (int64) from torch's generator on ``device``: no host round trip."""
    return torch.randint(2**62, (n,), device=device)


def dropout_mask(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask the kernels draw for dropout of rate ``p`` on x ([N, C, ...]) with ``seed``
    (a one-element int64 tensor): True where an element is kept. What the fused ops apply to x
    before its BatchNorm, exposed so that the plain composition can be compared with them."""
    xs = [x.new_ones(x.shape).contiguous(memory_format=memory_format(dense(x)))]
    C = x.shape[1]
    ones = torch.ones(1, C, dtype=acc_dtype(x.dtype), device=x.device)
    zeros = torch.zeros(1, C, dtype=acc_dtype(x.dtype), device=x.device)
    kept = normalize_join(xs, None, None, [None], [None], list(zeros), list(ones), 0.0, False, seed.reshape(1), p)
    return kept != 0
