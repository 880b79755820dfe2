"""Plain-PyTorch specification of every op.

These are the CPU fallback, the test oracle and the benchmark baseline, written the way a user
would write them by hand: the join stacks its inputs, selects, sums and divides; BatchNorm and ReLU
are the stock functional calls. The semantics are the contracts of DESIGN.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def masked_join(inputs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean of the inputs that survive drop-path.

    out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b]. Dropped inputs are selected away, never
    multiplied, so a NaN or Inf in them never reaches the output or the gradient; a sample with no
    surviving input gets 0 and a 0 gradient.
    """
    stacked = torch.stack(list(inputs))
    if mask is None:
        return stacked.mean(0)
    keep = (mask != 0).reshape(mask.shape + (1,) * (stacked.dim() - 2))
    total = torch.where(keep, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0)
    count = keep.sum(0).to(stacked.dtype)
    return total / count.clamp(min=1)


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
    *,
    num_batches_tracked: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``F.relu(F.batch_norm(...))``, or the bare batch norm with ``relu=False``; after
    ``F.dropout(x, dropout)`` when ``dropout`` is nonzero, and in training counting the batch in
    ``num_batches_tracked`` with momentum None meaning the cumulative average, as nn.Dropout and
    nn.BatchNorm2d do."""
    if dropout:
        x = F.dropout(x, dropout, training=True)
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum or 0.0, eps)
    # F.relu's values and gradients (NaN included), but its backward keeps the input, not the
    # output: an in-place op on the output (a model's own F.relu_ after it) leaves it intact.
    return F.threshold(y, 0.0, 0.0) if relu else y


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
    *,
    num_batches_tracked: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``masked_join([bn_relu(x_i, ...) for each input i], mask)``: each input's BN statistics cover
    all of its samples, dropped ones included."""
    num_batches_tracked = num_batches_tracked or [None] * len(inputs)
    activations = [
        bn_relu(x, w, b, rm, rv, training, momentum, eps, num_batches_tracked=n, dropout=dropout)
        for x, w, b, rm, rv, n in zip(inputs, weights, biases, running_means, running_vars, num_batches_tracked)
    ]
    return masked_join(activations, mask)


def _spread(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x's rows laid out by sample (row 0 where rows is -1: the join's mask selects it away)."""
    if x.shape[0] == 0:
        return x.new_zeros((rows.shape[0],) + x.shape[1:])
    return x[rows.clamp(min=0)]


def gather_join(inputs: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """masked_join over compact inputs: input i holds sample b in row rows[i, b], or not at all
    where it is -1. The output has one row per sample; a sample held by no input gets 0."""
    return masked_join([_spread(x, r) for x, r in zip(inputs, rows)], rows >= 0)


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
    *,
    num_batches_tracked: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``gather_join([bn_relu(x_i, ...) for each input], rows)``: the statistics of input i cover
    its own rows; an input with no rows has none (and leaves its running statistics alone, but
    counts the batch)."""
    num_batches_tracked = num_batches_tracked or [None] * len(inputs)
    activations = []
    for x, w, b, rm, rv, n in zip(inputs, weights, biases, running_means, running_vars, num_batches_tracked):
        if x.shape[0]:
            activations.append(bn_relu(x, w, b, rm, rv, training, momentum, eps, num_batches_tracked=n,
                                       dropout=dropout))
        else:
            if training and n is not None:
                n.add_(1)
            activations.append(x)
    return gather_join(activations, rows)
