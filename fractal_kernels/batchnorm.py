"""BatchNorm(+ReLU) over k inputs with a join: launchers, torch.library ops and one autograd Function.

The kernels are batchnorm_kernels.py's. Four launchers run the split kernels:
``batch_statistics`` (batch statistics and the running-statistic update), ``normalize_join``
(the normalised, activated and joined output), ``bn_backward_sums`` and ``bn_backward_dx`` (its
backward, which differentiates through the batch statistics). Where the tiling has one chunk per
channel block (small problems: the host-bound ones), two run the single-pass kernels instead:
``normalize_join_with_statistics`` (the training forward) and ``bn_backward``, one launch each.
Each launcher is also a torch.library op without autograd (``bn_stats``, ``bn_apply``,
``bn_backward_sums``, ``bn_backward_dx``, ``bn_forward``, ``bn_backward``), what torch sees
while it traces.
``batch_norm_join`` composes them into the function behind bn_relu, join_bn_relu and
gather_join_bn_relu, synchronised over a process group or not; its one autograd Function,
BatchNormJoinFunction, launches through either (``LaunchPath``: DIRECT or LIBRARY), as the
public op chose.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import recompute
from .batchnorm_kernels import (
    bn_apply_kernel,
    bn_backward_dx_kernel,
    bn_backward_kernel,
    bn_backward_reduce_kernel,
    bn_combine_kernel,
    bn_forward_kernel,
    bn_stats_kernel,
)
from .channel_tiling import ChannelTiling, channel_tiling
from .join_modes import join_args, row_samples
from .launch import (
    MAX_INPUTS, NONES, REDUCTION_REGISTERS, define_op, eager_apply, input_groups, launch, next_power_of_2,
    optional, slots, wrap_triton,
)
from .sync_batchnorm import RankStatistics
from .tensors import acc_dtype, dense, dense_inputs, like_rows, memory_format

#: Channels per program of the combine stage.
_COMBINE_BLOCK_C = 128
#: The sixteen mean and variance slots of a launch that reads them from one statistics tensor.
_NO_MOMENTS = (None,) * (2 * MAX_INPUTS)


def placeholder(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor standing for an absent optional: the ops take list[Tensor], not
    list[Optional[Tensor]], and the launchers pass None for it (launch.optional)."""
    return x.new_empty(0)


def dropout_args(seeds: Optional[torch.Tensor], p: float) -> tuple:
    """The kernels' dropout arguments (seeds, rate, scale): None without seeds (no dropout)."""
    if seeds is None or p == 0:
        return None, 0.0, 1.0
    return seeds, float(p), 1.0 / (1.0 - p) if p < 1 else 0.0


class BatchNormOptions(NamedTuple):
    """The scalar options of one normalisation pass, which every launcher and kernel op takes by
    keyword: ``batch_stats`` says that the means and variances are the inputs' batch statistics
    (training), which the backward differentiates through; otherwise they are constants (the
    running statistics); ``dropout`` is the rate of the dropout before the BatchNorm (0: none)."""

    eps: float
    relu: bool
    batch_stats: bool
    dropout: float = 0.0


class PerInput(NamedTuple):
    """The per-input tensors of a normalisation pass, one entry per input (None for an absent
    weight or bias): what the apply and backward launchers read, and what the autograd Function
    saves, flattened."""

    xs: Sequence[torch.Tensor]
    weights: Sequence[Optional[torch.Tensor]]
    biases: Sequence[Optional[torch.Tensor]]
    means: Sequence[torch.Tensor]
    variances: Sequence[torch.Tensor]

    def flatten(self) -> tuple:
        return (*self.xs, *self.weights, *self.biases, *self.means, *self.variances)

    @classmethod
    def unflatten(cls, flat: Sequence) -> PerInput:
        k = len(flat) // 5
        return cls(flat[:k], flat[k:2 * k], flat[2 * k:3 * k], flat[3 * k:4 * k], flat[4 * k:])


def batch_statistics(xs: list[torch.Tensor], running_means: Sequence, running_vars: Sequence,
                     num_batches_tracked: Optional[Sequence], *, momentum: Optional[float],
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
        # The tiling of the input with the most rows (a loop: Dynamo traces no max(key=)).
        largest = xs[0]
        for x in xs[1:]:
            largest = x if x.shape[0] > largest.shape[0] else largest
        tiling = channel_tiling(largest, k)
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


def _channel_args(group: range, tensors: PerInput, join: tuple, eps: float, drop: tuple) -> tuple:
    """The per-channel, join and dropout arguments of the apply and backward kernels, for one
    group of inputs (None for absent weights and biases)."""
    return (
        *slots(tensors.weights, group), *slots(tensors.biases, group), *slots(tensors.means, group),
        *slots(tensors.variances, group), *join, group.start, len(tensors.xs), float(eps), *drop,
    )


def normalize_join(tensors: PerInput, mask, rows, *, options: BatchNormOptions, seeds: Optional[torch.Tensor] = None,
                   tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """The join (plain mean, ``mask`` or gather table ``rows``) over the (dense) inputs of
    act((dropout(x_i) - mean_i) / sqrt(var_i + eps) * w_i + b_i), dropout seeded by ``seeds``
    [k] where given. ``tiling``: the output's (computed when None). One launch for up to eight
    inputs.
    """
    xs = tensors.xs
    out = torch.empty_like(xs[0]) if rows is None else like_rows(xs[0], rows.shape[1])
    if out.numel() == 0:
        return out
    if tiling is None:
        tiling = channel_tiling(out, len(xs))
    join, mode = join_args(mask, rows)
    drop = dropout_args(seeds, options.dropout)
    for g, group in enumerate(input_groups(len(xs))):
        launch(
            wrap_triton(bn_apply_kernel), tiling.grid,
            out, *slots(xs, group), *_channel_args(group, tensors, join, options.eps, drop),
            tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=options.relu, ACCUMULATE=g > 0,
            **tiling.meta(streaming=True),
        )
    return out


def bn_backward_sums(grad, tensors: PerInput, mask, rows, *, options: BatchNormOptions,
                     seeds: Optional[torch.Tensor] = None, tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """Per-chunk sums of g_i and of g_i * x_hat_i over the output rows, as [2, k, chunks, C]
    (bn_backward_reduce_kernel); ``tiling``: the gradient's (computed when None)."""
    xs = tensors.xs
    k = len(xs)
    if tiling is None:
        tiling = channel_tiling(grad, k)
    join, mode = join_args(mask, rows)
    drop = dropout_args(seeds, options.dropout)
    sums = torch.empty(2, k, tiling.num_chunks, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    for group in input_groups(k):
        launch(
            wrap_triton(bn_backward_reduce_kernel), tiling.grid,
            grad, *slots(xs, group), *_channel_args(group, tensors, join, options.eps, drop),
            sums, tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=options.relu,
            **tiling.meta(streaming=False),
        )
    return sums


def bn_backward_dx(grad, tensors: PerInput, mask, rows, sums: torch.Tensor, *, options: BatchNormOptions,
                   seeds: Optional[torch.Tensor] = None, count: Optional[int] = None, param_grads: bool = True,
                   tiling: Optional[ChannelTiling] = None) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """Input gradients (the inputs' shapes) and the [2k, C] weight and bias gradients (None
    without ``param_grads``) from the [2, k, P, C] partial sums (bn_backward_dx_kernel): one
    launch per group of eight inputs, or, for a gather join, one per input over its own rows.
    ``count``: the elements per channel the sums cover (default: the inputs' own); ``tiling``:
    the inputs' (without a gather join; computed when None)."""
    xs = tensors.xs
    k = len(xs)
    sums = sums.contiguous()  # the kernel indexes it densely
    join, mode = join_args(mask, rows)
    drop = dropout_args(seeds, options.dropout)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grads = torch.empty(2 * k, grad.shape[1], dtype=sums.dtype, device=grad.device) if param_grads else None
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
            *_channel_args(group, tensors, join, options.eps, drop), sample,
            sums, sums.shape[2], grads, tiling.count if count is None else count,
            tiling.N, *tiling.block_args(), K=len(group), JOIN=mode, RELU=options.relu,
            BATCH_STATS=options.batch_stats, **tiling.meta(streaming=True),
        )
    return grad_inputs, grads


class BatchStatistics(NamedTuple):
    """What a single-pass training forward computes besides its output: the [2k, C] batch
    statistics ``stats`` (the k means, then the k variances; filled by the launch), and the
    running statistics and batch counters it updates (None where absent) by ``momentum`` (a
    number: the cumulative average reads the counters, which only the split path's one-program
    combine can)."""

    stats: torch.Tensor
    running_means: Sequence
    running_vars: Sequence
    num_batches_tracked: Sequence
    momentum: float


def single_pass(tiling: Optional[ChannelTiling], k: int) -> bool:
    """Whether one launch covers a pass and the per-channel sums it needs: one chunk per channel
    block and one group of inputs. No ``tiling``: a gather join, or torch tracing (which sees
    the split kernels' ops)."""
    return tiling is not None and tiling.num_chunks == 1 and k <= MAX_INPUTS


def normalize_join_with_statistics(tensors: PerInput, mask, statistics: BatchStatistics, *,
                                   options: BatchNormOptions, seeds: Optional[torch.Tensor] = None,
                                   tiling: ChannelTiling) -> torch.Tensor:
    """batch_statistics then normalize_join in one launch (bn_forward_kernel) on a single_pass
    ``tiling``, the statistics into ``statistics.stats`` (``tensors``' means and variances are
    not read)."""
    xs = tensors.xs
    k = len(xs)
    out = torch.empty_like(xs[0])
    join, mode = join_args(mask, None)
    pad = NONES[MAX_INPUTS - k]  # the slots of the one group of inputs, as slots() pads them
    tiling.launcher(wrap_triton(bn_forward_kernel), False, K=k, JOIN=mode, RELU=options.relu)(
        out, *xs, *pad, *tensors.weights, *pad, *tensors.biases, *pad, *statistics.running_means, *pad,
        *statistics.running_vars, *pad, *statistics.num_batches_tracked, *pad, statistics.stats,
        float(statistics.momentum), *join, float(options.eps), *dropout_args(seeds, options.dropout),
        tiling.N, tiling.C, tiling.HW, tiling.hw_blocks,
    )
    return out


def bn_backward(grad, tensors: PerInput, mask, *, options: BatchNormOptions, seeds: Optional[torch.Tensor] = None,
                tiling: ChannelTiling, stats: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bn_backward_sums then bn_backward_dx in one launch (bn_backward_kernel) on a single_pass
    ``tiling``: the input gradients and the [2k, C] weight and bias gradients. The means and
    variances are ``stats`` (a single-pass forward's) where given, else ``tensors``'."""
    xs = tensors.xs
    k = len(xs)
    join, mode = join_args(mask, None)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grads = torch.empty(2 * k, tiling.C, dtype=acc_dtype(xs[0].dtype), device=grad.device)
    pad = NONES[MAX_INPUTS - k]  # the slots of the one group of inputs, as slots() pads them
    moments = _NO_MOMENTS if stats is not None else (*tensors.means, *pad, *tensors.variances, *pad)
    tiling.launcher(wrap_triton(bn_backward_kernel), False, K=k, JOIN=mode, RELU=options.relu,
                    BATCH_STATS=options.batch_stats)(
        grad, *xs, *pad, *grad_inputs, *pad, *tensors.weights, *pad, *tensors.biases, *pad, *moments, stats, *join,
        float(options.eps), *dropout_args(seeds, options.dropout), grads, tiling.N, tiling.C, tiling.HW,
        tiling.hw_blocks,
    )
    return grad_inputs, grads


def param_grads(grads: torch.Tensor, weights: Sequence, biases: Sequence) -> list[Optional[torch.Tensor]]:
    """The weight and bias gradients of the [2k, C] ``grads`` (the k weights' first), each in its
    parameter's dtype, None where the parameter is absent."""
    rows = grads.unbind(0)  # one op for all 2k rows
    return [None if p is None else g if g.dtype == p.dtype else g.to(p.dtype)
            for g, p in zip(rows, (*weights, *biases))]


def present(tensors: Sequence) -> list:
    """The ops' tensor lists with their empty placeholders as None, as the launchers take them."""
    return [optional(t) for t in tensors]


def _op_tensors(inputs, weights, biases, means, variances) -> PerInput:
    """A kernel op's per-input lists as the launchers take them (the inverse of _library_lists)."""
    return PerInput(dense_inputs(inputs), present(weights), present(biases), means, variances)


# ----------------------------------------------------------------------------------------------
# torch.library ops: the launchers as torch traces them (parallel tensor lists positional, every
# scalar keyword-only; empty placeholders stand for absent tensors). They carry no autograd: the
# one autograd Function below calls them while torch traces, and the launchers otherwise.
# ----------------------------------------------------------------------------------------------


@define_op("fractal_kernels::bn_stats", mutates_args=("running_means", "running_vars", "num_batches_tracked"))
def bn_stats_op(
    inputs: list[torch.Tensor],
    running_means: list[torch.Tensor],
    running_vars: list[torch.Tensor],
    num_batches_tracked: list[torch.Tensor],
    seeds: Optional[torch.Tensor],
    *,
    momentum: Optional[float],
    dropout: float,
) -> torch.Tensor:
    """batch_statistics as a torch.library op."""
    return batch_statistics(dense_inputs(inputs), present(running_means), present(running_vars),
                            present(num_batches_tracked), momentum=momentum, seeds=seeds, dropout=dropout)


@define_op("fractal_kernels::bn_apply")
def bn_apply_op(
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    seeds: Optional[torch.Tensor],
    *,
    eps: float,
    relu: bool,
    batch_stats: bool,
    dropout: float,
) -> torch.Tensor:
    """normalize_join as a torch.library op."""
    tensors = _op_tensors(inputs, weights, biases, means, variances)
    return normalize_join(tensors, mask, rows, options=BatchNormOptions(eps, relu, batch_stats, dropout), seeds=seeds)


@define_op("fractal_kernels::bn_backward_sums")
def bn_backward_sums_op(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    seeds: Optional[torch.Tensor],
    *,
    eps: float,
    relu: bool,
    batch_stats: bool,
    dropout: float,
) -> torch.Tensor:
    """bn_backward_sums as a torch.library op."""
    tensors = _op_tensors(inputs, weights, biases, means, variances)
    return bn_backward_sums(grad, tensors, mask, rows, options=BatchNormOptions(eps, relu, batch_stats, dropout),
                            seeds=seeds)


@define_op("fractal_kernels::bn_backward_dx")
def bn_backward_dx_op(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    seeds: Optional[torch.Tensor],
    sums: torch.Tensor,
    *,
    eps: float,
    relu: bool,
    batch_stats: bool,
    dropout: float,
    count: Optional[int],
    param_grads: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bn_backward_dx as a torch.library op (an empty parameter gradient without ``param_grads``)."""
    tensors = _op_tensors(inputs, weights, biases, means, variances)
    grad_inputs, grads = bn_backward_dx(grad, tensors, mask, rows, sums,
                                        options=BatchNormOptions(eps, relu, batch_stats, dropout), seeds=seeds,
                                        count=count, param_grads=param_grads)
    return grad_inputs, grads if grads is not None else sums.new_empty(0)


def _single_pass_tiling(xs: Sequence[torch.Tensor]) -> ChannelTiling:
    """The inputs' tiling, which the single-pass ops need to be single_pass."""
    tiling = channel_tiling(xs[0], len(xs))
    if not single_pass(tiling, len(xs)):
        raise ValueError(f"the single-pass BatchNorm ops need at most {MAX_INPUTS} inputs of one chunk per channel "
                         f"block; got {len(xs)} inputs of shape {list(xs[0].shape)} ({tiling.num_chunks} chunks)")
    return tiling


@define_op("fractal_kernels::bn_forward",
           mutates_args=("running_means", "running_vars", "num_batches_tracked", "stats"))
def bn_forward_op(
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    running_means: list[torch.Tensor],
    running_vars: list[torch.Tensor],
    num_batches_tracked: list[torch.Tensor],
    stats: torch.Tensor,
    seeds: Optional[torch.Tensor],
    *,
    momentum: float,
    eps: float,
    relu: bool,
    dropout: float,
) -> torch.Tensor:
    """normalize_join_with_statistics as a torch.library op: the training forward, its batch
    statistics into ``stats`` [2k, C]."""
    xs = dense_inputs(inputs)
    k = len(xs)
    statistics = BatchStatistics(stats, present(running_means), present(running_vars), present(num_batches_tracked),
                                 momentum)
    return normalize_join_with_statistics(PerInput(xs, present(weights), present(biases), NONES[k], NONES[k]), mask,
                                          statistics, options=BatchNormOptions(eps, relu, True, dropout), seeds=seeds,
                                          tiling=_single_pass_tiling(xs))


@define_op("fractal_kernels::bn_backward")
def bn_backward_op(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    mask: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    means: list[torch.Tensor],
    variances: list[torch.Tensor],
    stats: Optional[torch.Tensor],
    seeds: Optional[torch.Tensor],
    *,
    eps: float,
    relu: bool,
    batch_stats: bool,
    dropout: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bn_backward as a torch.library op (means and variances from ``stats`` where given)."""
    tensors = _op_tensors(inputs, weights, biases, present(means), present(variances))
    return bn_backward(grad, tensors, mask, options=BatchNormOptions(eps, relu, batch_stats, dropout), seeds=seeds,
                       tiling=_single_pass_tiling(tensors.xs), stats=stats)


def _filled(tensors: Sequence, like: torch.Tensor) -> list[torch.Tensor]:
    """A per-input list with an empty placeholder for each absent (None) entry."""
    return [placeholder(like) if t is None else t for t in tensors]


def _library_lists(tensors: PerInput) -> tuple:
    """The ops' list arguments of ``tensors`` (placeholders for absent tensors)."""
    like = tensors.xs[0]
    return (list(tensors.xs), _filled(tensors.means, like), _filled(tensors.variances, like),
            _filled(tensors.weights, like), _filled(tensors.biases, like))


class LaunchPath(NamedTuple):
    """How batch_norm_join runs its launchers: directly (eager), or through the torch.library
    ops (while torch traces). Each function takes the launcher's arguments."""

    batch_statistics: Callable
    normalize_join: Callable
    bn_backward_sums: Callable
    bn_backward_dx: Callable
    normalize_join_with_statistics: Callable
    bn_backward: Callable


def _library_batch_statistics(xs, running_means, running_vars, num_batches_tracked, *, momentum, seeds=None,
                              dropout=0.0, tiling=None):
    like = xs[0]
    return bn_stats_op([x.detach() for x in xs], _filled(running_means, like), _filled(running_vars, like),
                       _filled(num_batches_tracked or (None,) * len(xs), like), seeds, momentum=momentum,
                       dropout=dropout)


def _library_normalize_join(tensors: PerInput, mask, rows, *, options, seeds=None, tiling=None):
    xs, means, variances, weights, biases = _library_lists(tensors)
    return bn_apply_op(xs, mask, rows, weights, biases, means, variances, seeds, **options._asdict())


def _library_bn_backward_sums(grad, tensors: PerInput, mask, rows, *, options, seeds=None, tiling=None):
    xs, means, variances, weights, biases = _library_lists(tensors)
    return bn_backward_sums_op(grad, xs, mask, rows, weights, biases, means, variances, seeds, **options._asdict())


def _library_bn_backward_dx(grad, tensors: PerInput, mask, rows, sums, *, options, seeds=None, count=None,
                            param_grads=True, tiling=None):
    xs, means, variances, weights, biases = _library_lists(tensors)
    grad_inputs, grads = bn_backward_dx_op(grad, xs, mask, rows, weights, biases, means, variances, seeds, sums,
                                           count=count, param_grads=param_grads, **options._asdict())
    return grad_inputs, grads if param_grads else None


def _library_normalize_join_with_statistics(tensors: PerInput, mask, statistics: BatchStatistics, *, options,
                                            seeds=None, tiling=None):
    like = tensors.xs[0]
    return bn_forward_op(list(tensors.xs), mask, _filled(tensors.weights, like), _filled(tensors.biases, like),
                         _filled(statistics.running_means, like), _filled(statistics.running_vars, like),
                         _filled(statistics.num_batches_tracked, like), statistics.stats, seeds,
                         momentum=statistics.momentum, eps=options.eps, relu=options.relu, dropout=options.dropout)


def _library_bn_backward(grad, tensors: PerInput, mask, *, options, seeds=None, tiling=None, stats=None):
    xs, means, variances, weights, biases = _library_lists(tensors)
    return bn_backward_op(grad, xs, mask, weights, biases, means, variances, stats, seeds, **options._asdict())


#: The launchers themselves: eager mode on plain tensors.
DIRECT = LaunchPath(batch_statistics, normalize_join, bn_backward_sums, bn_backward_dx, normalize_join_with_statistics,
                    bn_backward)
#: The torch.library ops: what torch.compile, fake tensors and other dispatch modes see.
LIBRARY = LaunchPath(_library_batch_statistics, _library_normalize_join, _library_bn_backward_sums,
                     _library_bn_backward_dx, _library_normalize_join_with_statistics, _library_bn_backward)


# ----------------------------------------------------------------------------------------------
# The autograd Function of the BatchNorm family, and the function behind the public ops
# ----------------------------------------------------------------------------------------------


def normalize_join_backward(grad: torch.Tensor, tensors: PerInput, mask, rows, *, options: BatchNormOptions,
                            seeds: Optional[torch.Tensor] = None, tiling: Optional[ChannelTiling] = None,
                            sync: Optional[RankStatistics] = None, path: LaunchPath = DIRECT,
                            stats: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward of normalize_join: the input gradients (through the dropout, which it
    regenerates from ``seeds``, and with ``options.batch_stats`` through the batch statistics)
    and the [2k, C] weight and bias gradients. With ``sync`` the statistics are global over a
    process group: the per-channel sums are reduced over its ranks before the input gradients
    (the parameter gradients stay local, as nn.SyncBatchNorm's: DDP reduces them).

    Two launches for up to eight inputs, one on a single_pass tiling or when no sums are needed
    (running statistics and no affine parameters); a gather join launches the input-gradient
    kernel once per input. ``tiling``: the inputs' (computed when None; none for a gather join).
    ``stats``: the [2k, C] statistics of a single-pass forward, for its tensors' absent means and
    variances.
    """
    xs = tensors.xs
    grad = grad.contiguous(memory_format=memory_format(xs[0]))
    if rows is None and tiling is None and path is DIRECT:
        tiling = channel_tiling(grad, len(xs))
    if options.batch_stats or any(t is not None for t in tensors.weights) or any(
            t is not None for t in tensors.biases):
        if sync is None and single_pass(tiling, len(xs)):
            return path.bn_backward(grad, tensors, mask, options=options, seeds=seeds, tiling=tiling, stats=stats)
        sums = path.bn_backward_sums(grad, tensors, mask, rows, options=options, seeds=seeds, tiling=tiling)
    else:
        sums = grad.new_empty(2, len(xs), 0, grad.shape[1], dtype=acc_dtype(grad.dtype))
    if sync is None:
        return path.bn_backward_dx(grad, tensors, mask, rows, sums, options=options, seeds=seeds, tiling=tiling)
    local = sums.sum(2, keepdim=True)  # [2, k, 1, C]: this rank's sums of g and g * x_hat
    # The global sums divided by the global count: the kernel's count is 1.
    grad_inputs, _ = path.bn_backward_dx(grad, tensors, mask, rows, sync.global_means(local), options=options,
                                      seeds=seeds, count=1, param_grads=False, tiling=tiling)
    # The weight gradients are the sums of g * x_hat, the bias gradients those of g.
    return grad_inputs, torch.cat([local[1, :, 0], local[0, :, 0]])


class BatchNormJoinFunction(torch.autograd.Function):
    """The autograd of batch_norm_join, eager or traced (``path``), synchronised or not
    (``sync``). Its autograd arguments are the inputs, weights and biases (None where absent);
    ``moments`` are the per-input (means, variances): in training the batch statistics
    (differentiated through, as functions of the inputs), in eval the running ones. With
    ``statistics`` (a BatchStatistics, eager only) the forward computes the batch statistics
    itself, and ``moments`` hold Nones: the backward reads ``statistics.stats``."""

    @staticmethod
    def forward(ctx, path: LaunchPath, options: BatchNormOptions, sync, mask, rows, seeds, moments, statistics,
                tiling, *tensors):
        k = len(tensors) // 3
        inputs = PerInput(tensors[:k], tensors[k:2 * k], tensors[2 * k:], *moments)
        ctx.path, ctx.options, ctx.sync, ctx.tiling = path, options, sync, tiling  # the backward's tiling too
        ctx.save_for_backward(mask, rows, seeds, None if statistics is None else statistics.stats, *inputs.flatten())
        if statistics is not None:
            return path.normalize_join_with_statistics(inputs, mask, statistics, options=options, seeds=seeds,
                                                       tiling=tiling)
        return path.normalize_join(inputs, mask, rows, options=options, seeds=seeds, tiling=tiling)

    @staticmethod
    def backward(ctx, grad):
        mask, rows, seeds, stats, *flat = ctx.saved_tensors
        inputs = PerInput.unflatten(flat)
        grad_inputs, grads = normalize_join_backward(grad, inputs, mask, rows, options=ctx.options, seeds=seeds,
                                                     tiling=ctx.tiling, sync=ctx.sync, path=ctx.path, stats=stats)
        return (None,) * 9 + (*grad_inputs, *param_grads(grads, inputs.weights, inputs.biases))


_eager_batch_norm_join = eager_apply(BatchNormJoinFunction)


def input_statistics(stats: torch.Tensor) -> tuple[Sequence, Sequence]:
    """The per-input means and variances: the [C] slices of the [2, k, C] (or [2k, C]) batch
    statistics."""
    slices = stats.reshape(-1, stats.shape[-1]).unbind(0)
    k = len(slices) // 2
    return slices[:k], slices[k:]


def batch_norm_join(inputs, mask, weights, biases, running_means, running_vars, num_batches_tracked=None, *,
                    training: bool, momentum: Optional[float], eps: float, relu: bool, rows=None,
                    dropout: float = 0.0, seeds=None, group_name: Optional[str] = None,
                    path: LaunchPath = DIRECT):
    """The join (``mask`` or gather table ``rows``) of [bn(+relu)(dropout(x_i)) for each input]:
    in training the statistics of all inputs (with the running-statistic and batch-count
    updates; over the ranks of process group ``group_name`` where given), then one apply pass
    (both in one launch on a single_pass tiling without a process group).
    A nonzero ``dropout`` rate applies, whatever ``training`` says (the caller passes 0 where
    its dropout is off), seeded by ``seeds`` [k] (int64; drawn here from torch's generator when
    None). None stands for any absent tensor. ``path``: DIRECT in eager mode, LIBRARY while torch
    traces (the caller chooses)."""
    xs = dense_inputs(inputs)
    k = len(xs)
    if dropout and seeds is None:
        seeds = draw_seeds(k, xs[0].device)
    # Without a gather table the statistics, apply and backward launchers share one tiling; while
    # torch traces, it decides only whether the single-pass ops apply (sizes must be known).
    tiling = channel_tiling(xs[0], k) if rows is None and (path is DIRECT or _static_sizes(xs[0])) else None
    sync = statistics = None
    if not training:
        moments = (running_means, running_vars)
    elif group_name is None and momentum is not None and single_pass(tiling, k):
        # Computed by the apply launch itself, and read by the backward from the one tensor.
        stats = torch.empty(2 * k, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
        statistics = BatchStatistics(stats, running_means, running_vars, num_batches_tracked or NONES[k],
                                     momentum)
        moments = NONES[k], NONES[k]
    elif group_name is None:
        # The statistics carry no autograd of their own: the apply's backward differentiates
        # through them.
        moments = input_statistics(path.batch_statistics(xs, running_means, running_vars, num_batches_tracked,
                                                      momentum=momentum, seeds=seeds, dropout=dropout, tiling=tiling))
    else:
        local = path.batch_statistics(xs, (None,) * k, (None,) * k, None, momentum=0.0, seeds=seeds, dropout=dropout,
                                tiling=tiling)
        sync = RankStatistics.gather(local, xs[0].numel() // xs[0].shape[1], group_name)
        sync.update_running(running_means, running_vars, num_batches_tracked or (None,) * k, momentum)
        moments = sync.input_statistics(acc_dtype(xs[0].dtype))
    options = BatchNormOptions(eps, relu, training, dropout)
    apply = _eager_batch_norm_join if path is DIRECT else BatchNormJoinFunction.apply
    out = apply(path, options, sync, mask, rows, seeds, moments, statistics, tiling, *xs, *weights, *biases)
    if recompute.recording():
        tensors = PerInput(xs, weights, biases, *(moments if statistics is None else input_statistics(stats)))
        recompute.register(out, functools.partial(path.normalize_join, tensors, mask, rows, options=options,
                                                  seeds=seeds, tiling=tiling))
    return out


def _static_sizes(x: torch.Tensor) -> bool:
    """Whether x's sizes are numbers (not symbols of a dynamic-shape trace)."""
    return all(type(n) is int for n in x.shape)


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
    kept = normalize_join(PerInput(xs, [None], [None], list(zeros), list(ones)), None, None,
                          options=BatchNormOptions(0.0, False, False, p), seeds=seed.reshape(1))
    return kept != 0
