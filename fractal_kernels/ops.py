"""The public ops: argument checks and backend dispatch.

Each public op checks its arguments (a ValueError or TypeError naming the argument, before any
launch), then runs the Triton kernels or the plain-PyTorch reference. The Triton path goes through
the op files' autograd.Functions in eager mode, and through the torch.library ops (library.py)
while torch traces: torch.compile sees them without graph breaks.

The backends are backends.py's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import reference
from .backends import BACKENDS, HAS_TRITON, get_backend, use_backend, use_triton
from .checks import (
    are_counters, check_bn_input, check_bn_options, check_bn_params, check_bn_tensor_lists, check_float_tensor,
    check_mask, check_rows, check_tensor_list,
)

if HAS_TRITON:
    from . import library
    from .batchnorm import batch_norm_join
    from .join import joined
    from .join_modes import Join
    from .kernel_op import runs_eagerly

__all__ = ["BACKENDS", "bn_relu", "gather_join", "gather_join_bn_relu", "get_backend", "join_bn_relu", "masked_join",
           "use_backend"]


def masked_join(inputs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean of the inputs that survive drop-path.

    Args:
        inputs: k >= 1 tensors of one shape [B, ...], dtype and device (contiguous or channels-last
            avoid copies).
        mask: None (plain mean) or a [k, B] bool or 0/1 float tensor; input i is kept for sample b
            where mask[i, b] is nonzero.

    Returns:
        out with out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b]; 0 (and a 0 gradient) for a sample
        with no surviving input. Dropped inputs never contribute, even when they hold NaN or Inf.
    """
    inputs = check_tensor_list("inputs", inputs)
    x = inputs[0]
    if x.dim() < 1:
        raise ValueError("inputs must have a batch dimension (rank >= 1), got 0-dimensional tensors")
    check_mask(mask, len(inputs), x.shape[0], x.device)
    if use_triton(x):
        return joined(inputs, Join.of(inputs, mask))
    return reference.masked_join(inputs, mask)


def _synchronised_group(training: bool, process_group) -> Optional[str]:
    """The name (as torch's functional collectives take it) of the process group whose ranks the
    batch statistics cover: None for local statistics (eval, no group, or a group of one rank)."""
    if not training or process_group is None or not dist.is_initialized():
        return None
    return process_group.group_name if dist.get_world_size(process_group) > 1 else None


def _check_unit_options(inputs, training, num_batches_tracked, momentum, dropout, seeds, seeds_name) -> None:
    """Checks the num_batches_tracked counters, dropout rate and dropout seeds of k inputs."""
    device = inputs[0].device
    if not are_counters(num_batches_tracked, 1, device):
        for i, t in enumerate(num_batches_tracked):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1):
                raise TypeError(f"num_batches_tracked[{i}] must be a one-element int64 tensor or None")
            if t is not None and t.device != device:
                raise ValueError(f"num_batches_tracked[{i}] is on {t.device}, expected {device} like the inputs")
    if momentum is None and training and any(t is None for t in num_batches_tracked):
        raise ValueError("momentum=None (the cumulative average) needs num_batches_tracked")
    if (type(dropout) is not float and (isinstance(dropout, bool) or not isinstance(dropout, (int, float)))
            or not 0.0 <= dropout <= 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if seeds is not None and not are_counters((seeds,), len(inputs), device):
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
            raise TypeError(f"{seeds_name} must be an int64 tensor or None")
        if seeds.numel() != len(inputs):
            raise ValueError(f"{seeds_name} must hold one seed per input ({len(inputs)}), got {seeds.numel()}")
        raise ValueError(f"{seeds_name} is on {seeds.device}, expected {device} like the inputs")


def bn_relu(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    process_group=None,
    *,
    num_batches_tracked: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    The same arguments and results as the unfused calls, including the in-place running-statistic
    update in training (unbiased variance); ``relu=False`` gives the bare batch norm. x is
    [N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W], contiguous or channels-last, fp32, fp16,
    bf16 or fp64; statistics are fp32 (fp64 for fp64 input). The backward keeps x and O(C)
    statistics, not the output. With a ``process_group`` of several ranks, training uses batch
    statistics over all of them (as nn.SyncBatchNorm).

    Keyword options, as nn.BatchNorm2d and a preceding nn.Dropout would do them:
        num_batches_tracked: the module's int64 counter, incremented in training by the
            statistics kernel itself; ``momentum=None`` then takes the cumulative average.
        dropout: x first goes through dropout of this rate (kept elements scaled by 1/(1-p)),
            whatever ``training`` says: pass 0 where the dropout is off, as nn.Dropout in eval.
            The mask is drawn inside the kernels from ``seed`` and never stored.
        seed: a one-element int64 tensor on x's device; None draws one from torch's generator.
            The same seed gives the same mask (see fractal_kernels.dropout_mask). The reference
            backend draws its own mask with F.dropout.
    """
    check_float_tensor("x", x)
    check_bn_input("x", x, training)
    names = ("weight", "bias", "running_mean", "running_var")
    check_bn_params(x, training, momentum, eps, names, weight, bias, running_mean, running_var)
    _check_unit_options([x], training, [num_batches_tracked], momentum, dropout, seed, "seed")
    if not use_triton(x):
        _check_reference(training, process_group)
        return reference.bn_relu(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                                 num_batches_tracked=num_batches_tracked, dropout=dropout)
    seeds = seed if seed is None or seed.dim() == 1 else seed.reshape(1)  # one element (checked): [1]
    group = _synchronised_group(training, process_group)
    if runs_eagerly(x):
        return batch_norm_join([x], Join.of([x]), [weight], [bias], [running_mean], [running_var],
                               [num_batches_tracked], training=training, momentum=momentum, eps=eps, relu=relu,
                               dropout=dropout, seeds=seeds, group_name=group)
    return library.bn_relu(x, weight, bias, running_mean, running_var, training, momentum, eps, relu,
                           num_batches_tracked, dropout, seeds, group)


def _check_reference(training: bool, process_group) -> None:
    if _synchronised_group(training, process_group) is not None:
        raise ValueError("process_group: synchronised statistics run on the Triton backend only")


#: The per-input lists of the join ops (the first four as check_bn_tensors names them).
_PER_INPUT_NAMES = ("weights", "biases", "running_means", "running_vars", "num_batches_tracked")


def _check_join_bn_args(inputs, weights, biases, running_means, running_vars, training, momentum, eps,
                        num_batches_tracked, dropout, seeds):
    k = len(inputs)
    for name, values in zip(_PER_INPUT_NAMES, (weights, biases, running_means, running_vars, num_batches_tracked)):
        if values is None and name == "num_batches_tracked":
            continue
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple with one entry per input, got {type(values).__name__}")
        if len(values) != k:
            raise ValueError(f"{name} must have one entry per input ({k}), got {len(values)}")
    check_bn_tensor_lists(inputs[0], training, _PER_INPUT_NAMES, weights, biases, running_means, running_vars)
    check_bn_options(training, momentum, eps)
    _check_unit_options(inputs, training, num_batches_tracked or (None,) * k, momentum, dropout, seeds, "seeds")


def join_bn_relu(
    inputs: Sequence[torch.Tensor],
    mask: Optional[torch.Tensor],
    weights: Sequence[Optional[torch.Tensor]],
    biases: Sequence[Optional[torch.Tensor]],
    running_means: Sequence[Optional[torch.Tensor]],
    running_vars: Sequence[Optional[torch.Tensor]],
    training: bool,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    process_group=None,
    *,
    num_batches_tracked: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout: float = 0.0,
    seeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``masked_join([bn_relu(x_i, w_i, b_i, rm_i, rv_i, training, momentum, eps) ...], mask)``.

    Each input has its own BatchNorm parameters and statistics, computed over all of its samples
    (dropped ones included), exactly like the unfused composition. The lists hold one entry per
    input; any entry may be None where bn_relu accepts None. Training reads each input twice
    (statistics, apply) and writes only the join; backward keeps the raw inputs, the mask and
    O(k*C) statistics. ``num_batches_tracked``, ``dropout`` and ``seeds`` ([k] int64, one per
    input) are bn_relu's options, per input.
    """
    inputs = check_tensor_list("inputs", inputs)
    x = inputs[0]
    check_bn_input("inputs[0]", x, training)
    check_mask(mask, len(inputs), x.shape[0], x.device)
    _check_join_bn_args(inputs, weights, biases, running_means, running_vars, training, momentum, eps,
                        num_batches_tracked, dropout, seeds)
    num_batches_tracked = list(num_batches_tracked or [None] * len(inputs))
    if not use_triton(x):
        _check_reference(training, process_group)
        return reference.join_bn_relu(inputs, mask, weights, biases, running_means, running_vars, training, momentum,
                                      eps, num_batches_tracked=num_batches_tracked, dropout=dropout)
    group = _synchronised_group(training, process_group)
    if runs_eagerly(x):
        return batch_norm_join(inputs, Join.of(inputs, mask), weights, biases, running_means, running_vars,
                               num_batches_tracked, training=training, momentum=momentum, eps=eps, relu=True,
                               dropout=dropout, seeds=seeds, group_name=group)
    return library.join_bn_relu(list(inputs), mask, list(weights), list(biases), list(running_means),
                                list(running_vars), training, momentum, eps, num_batches_tracked, dropout, seeds,
                                group)


def gather_join(inputs: Sequence[torch.Tensor], rows: torch.Tensor, validate: Optional[bool] = None) -> torch.Tensor:
    """The join of compact inputs: input i holds only B_i samples (a column segment computed for
    the samples that survive), ``rows[i, b]`` being the row of input i that holds sample b, or -1.

    Args:
        inputs: k tensors [B_i, ...] of one trailing shape, dtype and device (B_i may be 0).
        rows: int32/int64 [k, B]; each row of an input holds at most one sample.
        validate: check the values of ``rows`` (in range, no row named twice) with a ValueError.
            None (default) checks them where that costs no device-to-host read (CPU tensors);
            on a GPU pass True to pay one synchronisation for the check.

    Returns:
        [B, ...]: per sample, the mean over the inputs that hold it; 0 (and a 0 gradient) for a
        sample no input holds. Gradients are compact, shaped like the inputs.
    """
    inputs = check_tensor_list("inputs", inputs, same_batch=False)
    if inputs[0].dim() < 1:
        raise ValueError("inputs must have a batch dimension (rank >= 1), got 0-dimensional tensors")
    check_rows(rows, inputs, validate)
    if use_triton(inputs[0]):
        return joined(inputs, Join.of(inputs, rows=rows))
    return reference.gather_join(inputs, rows)


def gather_join_bn_relu(
    inputs: Sequence[torch.Tensor],
    rows: torch.Tensor,
    weights: Sequence[Optional[torch.Tensor]],
    biases: Sequence[Optional[torch.Tensor]],
    running_means: Sequence[Optional[torch.Tensor]],
    running_vars: Sequence[Optional[torch.Tensor]],
    training: bool,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    validate: Optional[bool] = None,
    *,
    num_batches_tracked: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout: float = 0.0,
    seeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused ``gather_join([bn_relu(x_i, ...) for each input], rows)`` over compact inputs (see
    gather_join, also for ``validate``, and join_bn_relu for the keyword options): the BatchNorm
    statistics of input i cover its B_i rows; an input with no rows has no statistics and leaves
    its running statistics unchanged. One statistics launch and one apply launch in training."""
    inputs = check_tensor_list("inputs", inputs, same_batch=False)
    for i, x in enumerate(inputs):
        if x.shape[0]:
            check_bn_input(f"inputs[{i}]", x, training)
    check_rows(rows, inputs, validate)
    _check_join_bn_args(inputs, weights, biases, running_means, running_vars, training, momentum, eps,
                        num_batches_tracked, dropout, seeds)
    num_batches_tracked = list(num_batches_tracked or [None] * len(inputs))
    if not use_triton(inputs[0]):
        return reference.gather_join_bn_relu(inputs, rows, weights, biases, running_means, running_vars, training,
                                             momentum, eps, num_batches_tracked=num_batches_tracked, dropout=dropout)
    if runs_eagerly(inputs[0]):
        return batch_norm_join(inputs, Join.of(inputs, rows=rows), weights, biases, running_means, running_vars,
                               num_batches_tracked, training=training, momentum=momentum, eps=eps, relu=True,
                               dropout=dropout, seeds=seeds)
    return library.gather_join_bn_relu(list(inputs), rows, list(weights), list(biases), list(running_means),
                                       list(running_vars), training, momentum, eps, num_batches_tracked, dropout, seeds)
