"""BatchNorm(+ReLU) over k inputs with a join: its passes, one autograd Function, and the
function behind bn_relu, join_bn_relu and gather_join_bn_relu.

Each pass is one name: its launcher, its torch.library op (a KernelOp: ``pass.eager`` launches,
``pass.traced`` calls the op while torch traces) and its kernel, batchnorm_kernels.py's
``<name>_kernel``:
  * ``bn_stats``: batch statistics and the running-statistic update (and bn_combine_kernel);
  * ``bn_apply``: the normalised, activated and joined output;
  * ``bn_backward_sums`` and ``bn_backward_dx``: its backward, which differentiates through the
    batch statistics;
  * ``bn_forward`` and ``bn_backward``: on a ``single_pass`` tiling (small problems: the
    host-bound ones), bn_stats then bn_apply, and the two backward passes, in one launch each.
``batch_norm_join`` composes them, synchronised over a process group or not.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import recompute
from .batchnorm_kernels import (
    bn_apply_kernel,
    bn_backward_dx_kernel,
    bn_backward_kernel,
    bn_backward_sums_kernel,
    bn_combine_kernel,
    bn_forward_kernel,
    bn_stats_kernel,
)
from .channel_tiling import ChannelTiling, channel_tiling
from .join_modes import Join
from .kernel_op import OptionalTensors, eager_apply, kernel_op
from .launch import MAX_INPUTS, NONES, REDUCTION_REGISTERS, input_groups, next_power_of_2, slots, wrap_triton
from .sync_batchnorm import RankStatistics
from .tensors import acc_dtype, dense, dense_inputs, memory_format

#: Channels per program of the combine stage.
_COMBINE_BLOCK_C = 128
#: The sixteen mean and variance slots of a launch that reads them from one statistics tensor.
_NO_MOMENTS = (None,) * (2 * MAX_INPUTS)


def dropout_args(seeds: Optional[torch.Tensor], p: float) -> tuple:
    """The kernels' dropout arguments (seeds, rate, scale): None without seeds (no dropout)."""
    if seeds is None or p == 0:
        return None, 0.0, 1.0
    return seeds, float(p), 1.0 / (1.0 - p) if p < 1 else 0.0


def single_pass(tiling: Optional[ChannelTiling], k: int, *, synchronised: bool = False,
                cumulative: bool = False) -> bool:
    """Whether bn_forward and bn_backward cover a pass: one launch computes the per-channel
    statistics or sums it needs and uses them. So it is where the tiling has one chunk per
    channel block, one group of inputs, statistics of this process alone (``synchronised`` ones
    are reduced between the sums and their use) and, in a training forward, a momentum (the
    ``cumulative`` average reads the batch counters, which only bn_stats's one-program combine
    can). No ``tiling``: a gather join, or sizes torch traces as symbols."""
    return (tiling is not None and tiling.num_chunks == 1 and k <= MAX_INPUTS and not synchronised
            and not cumulative)


def _largest_tiling(xs: Sequence[torch.Tensor]) -> ChannelTiling:
    """The tiling of the input with the most rows (a loop: Dynamo traces no max(key=))."""
    largest = xs[0]
    for x in xs[1:]:
        largest = x if x.shape[0] > largest.shape[0] else largest
    return channel_tiling(largest, len(xs))


@kernel_op("fractal_kernels::bn_stats", mutates_args=("running_means", "running_vars", "num_batches_tracked"))
def bn_stats(inputs: list[torch.Tensor], running_means: OptionalTensors, running_vars: OptionalTensors,
             num_batches_tracked: OptionalTensors, seeds: Optional[torch.Tensor], *, momentum: Optional[float],
             dropout: float, tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """Batch mean and biased variance of every channel of every input, after its dropout when
    ``seeds`` [k] are given, as a [2, k, C] tensor (fp32; fp64 for fp64 inputs). Inputs may
    differ in their number of rows (gathered column segments).

    Counts the batch in each present ``num_batches_tracked`` (an int64 counter) and updates the
    present running statistics (None stands for an absent one) with ``momentum``, or with
    momentum None by the cumulative average, and the unbiased variance; an input with no rows
    leaves its running statistics unchanged. ``tiling``: the largest input's.

    Launches bn_stats_kernel and bn_combine_kernel once for up to eight inputs.
    """
    xs = dense_inputs(inputs)
    k = len(xs)
    tiling = tiling or _largest_tiling(xs)
    C, chunks = tiling.C, tiling.num_chunks
    dtype, device = acc_dtype(xs[0].dtype), xs[0].device
    stats = torch.empty(2, k, C, dtype=dtype, device=device)
    partials = torch.empty(3, k, chunks, C, dtype=dtype, device=device)  # mean, m2, count
    block_c = min(_COMBINE_BLOCK_C, next_power_of_2(C))
    drop = dropout_args(seeds, dropout)
    factor = 0.0 if momentum is None else float(momentum)
    num_rows = [x.shape[0] for x in xs]
    for group in input_groups(k):
        wrap_triton(bn_stats_kernel)[tiling.grid](
            *slots(xs, group), *slots(num_rows, group), partials, group.start, k, *drop,
            *tiling.block_args(), K=len(group), **tiling.meta(streaming=False),
        )
        wrap_triton(bn_combine_kernel)[(1,)](
            partials, stats, *slots(running_means, group), *slots(running_vars, group),
            *slots(num_batches_tracked, group), factor, group.start, k, C, chunks,
            K=len(group), CUMULATIVE=momentum is None, BLOCK_C=block_c, num_warps=4, maxnreg=REDUCTION_REGISTERS,
        )
    return stats


def _channel_args(group: range, weights, biases, means, variances, join: Join, eps: float, drop: tuple) -> tuple:
    """The per-channel, join and dropout arguments of the apply and backward kernels, for one
    group of the k inputs (None for absent weights and biases)."""
    return (*slots(weights, group), *slots(biases, group), *slots(means, group), *slots(variances, group),
            *join.args(), group.start, len(means), float(eps), *drop)


@kernel_op("fractal_kernels::bn_apply")
def bn_apply(inputs: list[torch.Tensor], join: Join, weights: OptionalTensors, biases: OptionalTensors,
             means: list[torch.Tensor], variances: list[torch.Tensor], seeds: Optional[torch.Tensor], *,
             eps: float, relu: bool, batch_stats: bool, dropout: float,
             tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """The ``join`` over the inputs of act((dropout(x_i) - mean_i) / sqrt(var_i + eps) * w_i + b_i),
    dropout seeded by ``seeds`` [k] where given. ``tiling``: the output's. One launch for up to
    eight inputs. (``batch_stats`` only matters to the backward passes, which take the same options.)"""
    xs = dense_inputs(inputs)
    out = join.output(xs[0])
    if out.numel() == 0:
        return out
    tiling = tiling or channel_tiling(out, len(xs))
    drop = dropout_args(seeds, dropout)
    for g, group in enumerate(input_groups(len(xs))):
        wrap_triton(bn_apply_kernel)[tiling.grid](
            out, *slots(xs, group), *_channel_args(group, weights, biases, means, variances, join, eps, drop),
            tiling.N, *tiling.block_args(), K=len(group), JOIN=join.mode, RELU=relu, ACCUMULATE=g > 0,
            **tiling.meta(streaming=True),
        )
    return out


@kernel_op("fractal_kernels::bn_backward_sums")
def bn_backward_sums(grad: torch.Tensor, inputs: list[torch.Tensor], join: Join, weights: OptionalTensors,
                     biases: OptionalTensors, means: list[torch.Tensor], variances: list[torch.Tensor],
                     seeds: Optional[torch.Tensor], *, eps: float, relu: bool, batch_stats: bool, dropout: float,
                     tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """Per-chunk sums of g_i and of g_i * x_hat_i over the output rows, as [2, k, chunks, C];
    ``tiling``: the gradient's."""
    xs = dense_inputs(inputs)
    k = len(xs)
    tiling = tiling or channel_tiling(grad, k)
    drop = dropout_args(seeds, dropout)
    sums = torch.empty(2, k, tiling.num_chunks, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    for group in input_groups(k):
        wrap_triton(bn_backward_sums_kernel)[tiling.grid](
            grad, *slots(xs, group), *_channel_args(group, weights, biases, means, variances, join, eps, drop),
            sums, tiling.N, *tiling.block_args(), K=len(group), JOIN=join.mode, RELU=relu,
            **tiling.meta(streaming=False),
        )
    return sums


@kernel_op("fractal_kernels::bn_backward_dx")
def bn_backward_dx(grad: torch.Tensor, inputs: list[torch.Tensor], join: Join, weights: OptionalTensors,
                   biases: OptionalTensors, means: list[torch.Tensor], variances: list[torch.Tensor],
                   seeds: Optional[torch.Tensor], sums: torch.Tensor, *, eps: float, relu: bool, batch_stats: bool,
                   dropout: float, count: Optional[int], param_grads: bool,
                   tiling: Optional[ChannelTiling] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Input gradients (the inputs' shapes) and the [2k, C] weight and bias gradients (an empty
    tensor without ``param_grads``) from the [2, k, P, C] partial sums: one launch per group of
    eight inputs, or, for a gather join, one per input over its own rows. ``count``: the
    elements per channel the sums cover (None: the inputs' own); ``tiling``: the inputs'
    (without a gather join)."""
    xs = dense_inputs(inputs)
    k = len(xs)
    sums = sums.contiguous()  # the kernel indexes it densely
    drop = dropout_args(seeds, dropout)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grads = torch.empty(2 * k if param_grads else 0, grad.shape[1], dtype=sums.dtype, device=grad.device)
    if join.gathered:
        samples = join.row_samples()
        # The gradient rows the compact rows read can lie beyond 2**31 elements of the gradient.
        index_64 = grad.numel() >= 2**31
        launches = [(range(i, i + 1), channel_tiling(xs[i], 1, index_64), samples[i]) for i in range(k)]
    else:
        tiling = tiling or channel_tiling(xs[0], k)
        launches = [(group, tiling, None) for group in input_groups(k)]
    for group, tiling, sample in launches:
        wrap_triton(bn_backward_dx_kernel)[tiling.grid](
            grad, *slots(xs, group), *slots(grad_inputs, group),
            *_channel_args(group, weights, biases, means, variances, join, eps, drop), sample,
            sums, sums.shape[2], grads if param_grads else None, tiling.count if count is None else count,
            tiling.N, *tiling.block_args(), K=len(group), JOIN=join.mode, RELU=relu, BATCH_STATS=batch_stats,
            **tiling.meta(streaming=True),
        )
    return grad_inputs, grads


def _single_pass_tiling(xs: Sequence[torch.Tensor], tiling: Optional[ChannelTiling]) -> ChannelTiling:
    """The single_pass tiling of the inputs the single-pass passes need: ``tiling`` where the
    caller gives one (the autograd Function, which chose these passes by asking single_pass),
    else the inputs' own, checked (the registered op, which torch calls without one)."""
    if tiling is not None:
        return tiling
    tiling = channel_tiling(xs[0], len(xs))
    if not single_pass(tiling, len(xs)):
        raise ValueError(f"the single-pass BatchNorm ops need at most {MAX_INPUTS} inputs of one chunk per channel "
                         f"block; got {len(xs)} inputs of shape {list(xs[0].shape)} ({tiling.num_chunks} chunks)")
    return tiling


@kernel_op("fractal_kernels::bn_forward", mutates_args=("running_means", "running_vars", "num_batches_tracked",
                                                        "stats"))
def bn_forward(inputs: list[torch.Tensor], join: Join, weights: OptionalTensors, biases: OptionalTensors,
               running_means: OptionalTensors, running_vars: OptionalTensors, num_batches_tracked: OptionalTensors,
               stats: torch.Tensor, seeds: Optional[torch.Tensor], *, momentum: float, eps: float, relu: bool,
               dropout: float, tiling: Optional[ChannelTiling] = None) -> torch.Tensor:
    """bn_stats then bn_apply in one launch on a single_pass ``tiling``: the training forward,
    its batch statistics into ``stats`` [2k, C] (the k means, then the k variances), the running
    statistics and batch counters updated by ``momentum`` (a number)."""
    xs = dense_inputs(inputs)
    k = len(xs)
    tiling = _single_pass_tiling(xs, tiling)
    out = torch.empty_like(xs[0])
    pad = NONES[MAX_INPUTS - k]  # the one group's slots, as slots() pads them
    wrap_triton(bn_forward_kernel)[tiling.grid](
        out, *xs, *pad, *weights, *pad, *biases, *pad, *running_means, *pad, *running_vars, *pad,
        *num_batches_tracked, *pad, stats, float(momentum), *join.args(), float(eps), *dropout_args(seeds, dropout),
        tiling.N, tiling.C, tiling.HW, tiling.hw_blocks, K=k, JOIN=join.mode, RELU=relu, **tiling.meta(streaming=False),
    )
    return out


@kernel_op("fractal_kernels::bn_backward")
def bn_backward(grad: torch.Tensor, inputs: list[torch.Tensor], join: Join, weights: OptionalTensors,
                biases: OptionalTensors, means: OptionalTensors, variances: OptionalTensors,
                stats: Optional[torch.Tensor], seeds: Optional[torch.Tensor], *, eps: float, relu: bool,
                batch_stats: bool, dropout: float,
                tiling: Optional[ChannelTiling] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bn_backward_sums then bn_backward_dx in one launch on a single_pass ``tiling``: the input
    gradients and the [2k, C] weight and bias gradients. The means and variances are ``stats``
    (a bn_forward's) where given, else ``means`` and ``variances``."""
    xs = dense_inputs(inputs)
    k = len(xs)
    tiling = _single_pass_tiling(xs, tiling)
    grad_inputs = [torch.empty_like(x) for x in xs]
    grads = torch.empty(2 * k, tiling.C, dtype=acc_dtype(xs[0].dtype), device=grad.device)
    pad = NONES[MAX_INPUTS - k]  # the one group's slots, as slots() pads them
    moments = _NO_MOMENTS if stats is not None else (*means, *pad, *variances, *pad)
    wrap_triton(bn_backward_kernel)[tiling.grid](
        grad, *xs, *pad, *grad_inputs, *pad, *weights, *pad, *biases, *pad, *moments, stats, *join.args(), float(eps),
        *dropout_args(seeds, dropout), grads, tiling.N, tiling.C, tiling.HW, tiling.hw_blocks, K=k, JOIN=join.mode,
        RELU=relu, BATCH_STATS=batch_stats, **tiling.meta(streaming=False),
    )
    return grad_inputs, grads


# ----------------------------------------------------------------------------------------------
# The autograd Function of the BatchNorm family, and the function behind the public ops
# ----------------------------------------------------------------------------------------------


def param_grads(grads: torch.Tensor, weights: Sequence, biases: Sequence) -> list[Optional[torch.Tensor]]:
    """The weight and bias gradients of the [2k, C] ``grads`` (the k weights' first), each in its
    parameter's dtype, None where the parameter is absent."""
    per_parameter = grads.unbind(0)  # one op for all 2k of them
    dtype = grads.dtype
    return [None if p is None else g if p.dtype is dtype else g.to(p.dtype)
            for g, p in zip(per_parameter, (*weights, *biases))]


def bn_apply_backward(grad: torch.Tensor, xs, join: Join, weights, biases, means, variances, seeds, options: dict, *,
                      traced: bool, tiling: Optional[ChannelTiling] = None, sync: Optional[RankStatistics] = None,
                      stats: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Backward of bn_apply (``options``: its keyword options): the input gradients (through
    the dropout, which it regenerates from ``seeds``, and with ``batch_stats`` through the batch
    statistics) and the [2k, C] weight and bias gradients. With ``sync`` the statistics are
    global over a process group: the per-channel sums are reduced over its ranks before the
    input gradients (the parameter gradients stay local, as nn.SyncBatchNorm's: DDP reduces them).

    One launch on a single_pass tiling (bn_backward), two otherwise, one (bn_backward_dx) when
    no sums are needed (running statistics and no affine parameters). ``stats``: the [2k, C]
    statistics of a bn_forward, for the absent means and variances.
    """
    k = len(xs)
    if not (grad.is_contiguous() and xs[0].is_contiguous()):  # (the usual case asked cheaply)
        grad = grad.contiguous(memory_format=memory_format(xs[0]))
    if not join.gathered and tiling is None and not traced:
        tiling = channel_tiling(grad, k)
    per_input = (join, weights, biases, means, variances, seeds)
    if options["batch_stats"] or any(t is not None for t in weights) or any(t is not None for t in biases):
        if single_pass(tiling, k, synchronised=sync is not None):
            return bn_backward.on(traced)(grad, xs, join, weights, biases, means, variances, stats, seeds,
                                          tiling=tiling, **options)
        sums = bn_backward_sums.on(traced)(grad, xs, *per_input, tiling=tiling, **options)
    else:
        sums = grad.new_empty(2, k, 0, grad.shape[1], dtype=acc_dtype(grad.dtype))
    if sync is None:
        return bn_backward_dx.on(traced)(grad, xs, *per_input, sums, count=None, param_grads=True, tiling=tiling,
                                         **options)
    local = sums.sum(2, keepdim=True)  # [2, k, 1, C]: this rank's sums of g and g * x_hat
    # The global sums divided by the global count: the kernel's count is 1.
    grad_inputs, _ = bn_backward_dx.on(traced)(grad, xs, *per_input, sync.global_means(local), count=1,
                                               param_grads=False, tiling=tiling, **options)
    # The weight gradients are the sums of g * x_hat, the bias gradients those of g.
    return grad_inputs, torch.cat([local[1, :, 0], local[0, :, 0]])


class BatchNormJoinFunction(torch.autograd.Function):
    """The autograd of batch_norm_join, eager or ``traced``, synchronised or not (``sync``). Its
    autograd arguments are the inputs, weights and biases (None where absent); ``moments`` are
    the per-input (means, variances): in training the batch statistics (differentiated through,
    as functions of the inputs), in eval the running ones. With ``running`` (the running means,
    variances and batch counters, and the momentum) the forward is bn_forward, which computes the batch
    statistics into ``stats`` itself, and ``moments`` hold Nones: the backward reads ``stats``."""

    @staticmethod
    def forward(ctx, traced: bool, options: dict, sync, join: Join, seeds, moments, running, stats, tiling, *tensors):
        k = len(tensors) // 3
        xs, weights, biases = tensors[:k], tensors[k:2 * k], tensors[2 * k:]
        ctx.traced, ctx.options, ctx.sync, ctx.tiling = traced, options, sync, tiling  # the backward's tiling too
        ctx.join_mode, ctx.join_sizes = join.mode, join.sizes  # and the table, saved
        ctx.save_for_backward(join.table, seeds, stats, *tensors, *moments[0], *moments[1])
        if running is not None:
            running_means, running_vars, num_batches_tracked, momentum = running
            return bn_forward.on(traced)(xs, join, weights, biases, running_means, running_vars, num_batches_tracked,
                                         stats, seeds, momentum=momentum, eps=options["eps"], relu=options["relu"],
                                         dropout=options["dropout"], tiling=tiling)
        return bn_apply.on(traced)(xs, join, weights, biases, *moments, seeds, tiling=tiling, **options)

    @staticmethod
    def backward(ctx, grad):
        table, seeds, stats, *saved = ctx.saved_tensors
        k = len(saved) // 5
        xs, weights, biases, means, variances = (saved[i * k:(i + 1) * k] for i in range(5))
        join = Join(ctx.join_mode, table, ctx.join_sizes)
        grad_inputs, grads = bn_apply_backward(grad, xs, join, weights, biases, means, variances, seeds, ctx.options,
                                               traced=ctx.traced, tiling=ctx.tiling, sync=ctx.sync, stats=stats)
        return (None,) * 9 + (*grad_inputs, *param_grads(grads, weights, biases))


_eager_batch_norm_join = eager_apply(BatchNormJoinFunction)


def moments_of(stats: torch.Tensor) -> tuple[Sequence, Sequence]:
    """The per-input (means, variances): the [C] slices of the [2, k, C] (or [2k, C]) batch
    statistics bn_stats and bn_forward compute."""
    slices = stats.reshape(-1, stats.shape[-1]).unbind(0)
    k = len(slices) // 2
    return slices[:k], slices[k:]


def batch_norm_join(inputs, join: Join, weights, biases, running_means, running_vars, num_batches_tracked=None, *,
                    training: bool, momentum: Optional[float], eps: float, relu: bool, dropout: float = 0.0,
                    seeds=None, group_name: Optional[str] = None, traced: bool = False):
    """The ``join`` of [bn(+relu)(dropout(x_i)) for each input]: in training the statistics of
    all inputs (with the running-statistic and batch-count updates; over the ranks of process
    group ``group_name`` where given), then one apply pass (both in one launch on a single_pass
    tiling). A nonzero ``dropout`` rate applies, whatever ``training`` says (the caller passes 0
    where its dropout is off), seeded by ``seeds`` [k] (int64; drawn here from torch's generator
    when None). None stands for any absent tensor. ``traced``: through the torch.library ops
    (while torch traces; the caller chooses), else through the launchers."""
    xs = dense_inputs(inputs)
    k = len(xs)
    absent = (None,) * k
    num_batches_tracked = num_batches_tracked or absent
    if dropout and seeds is None:
        seeds = draw_seeds(k, xs[0].device)
    # Without a gather table the passes share one tiling; while torch traces, it decides only
    # whether the single-pass ops apply (sizes must be known).
    tiling = channel_tiling(xs[0], k) if not join.gathered and (not traced or _static_sizes(xs[0])) else None
    sync = running = stats = None
    if not training:
        moments = (running_means, running_vars)
    elif single_pass(tiling, k, synchronised=group_name is not None, cumulative=momentum is None):
        # Computed by the apply launch itself, and read by the backward from the one tensor.
        stats = torch.empty(2 * k, tiling.C, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
        running = (running_means, running_vars, num_batches_tracked, momentum)
        moments = absent, absent
    else:
        # The statistics carry no autograd of their own: the apply's backward differentiates
        # through them. The ops carry none at all: while traced, they take detached inputs.
        local_only = group_name is None
        batch = bn_stats.on(traced)([x.detach() for x in xs] if traced else xs,
                                    running_means if local_only else absent, running_vars if local_only else absent,
                                    num_batches_tracked if local_only else absent, seeds,
                                    momentum=momentum if local_only else 0.0, dropout=dropout, tiling=tiling)
        if local_only:
            moments = moments_of(batch)
        else:
            sync = RankStatistics.gather(batch, xs[0].numel() // xs[0].shape[1], group_name)
            sync.update_running(running_means, running_vars, num_batches_tracked, momentum)
            moments = sync.moments(acc_dtype(xs[0].dtype))
    options = dict(eps=eps, relu=relu, batch_stats=training, dropout=dropout)
    apply = BatchNormJoinFunction.apply if traced else _eager_batch_norm_join
    out = apply(traced, options, sync, join, seeds, moments, running, stats, tiling, *xs, *weights, *biases)
    if recompute.recording():
        means, variances = moments if stats is None else moments_of(stats)
        recompute.register(out, functools.partial(bn_apply.on(traced), xs, join, weights, biases, means, variances,
                                                  seeds, tiling=tiling, **options))
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
    ones = x.new_ones(x.shape).contiguous(memory_format=memory_format(dense(x)))
    C = x.shape[1]
    mean = torch.zeros(C, dtype=acc_dtype(x.dtype), device=x.device)
    var = torch.ones(C, dtype=acc_dtype(x.dtype), device=x.device)
    kept = bn_apply.eager([ones], Join.of([ones]), [None], [None], [mean], [var], seed.reshape(1), eps=0.0,
                          relu=False, batch_stats=False, dropout=p)
    return kept != 0
