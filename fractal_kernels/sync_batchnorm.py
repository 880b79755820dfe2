"""Synchronised BatchNorm for bn_relu and join_bn_relu: batch statistics over a process group.

Each rank computes its statistics with the same kernels; they are all-gathered and merged before
the apply pass (and the running statistics updated from the global ones), and the backward's
per-channel sums are all-reduced before the input-gradient pass, so DDP training normalises with
global batch statistics as nn.SyncBatchNorm does. Nothing is read back to the host: the global
element count stays on the device (fp64, exact), and the backward divides the reduced sums by it
there. Eager only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .batchnorm import (
    batch_statistics, bn_backward_dx, bn_backward_sums, draw_seeds, dropout_args, normalize_join, param_grads,
)
from .tensors import acc_dtype, dense_inputs, memory_format


class SyncBatchNormJoin(torch.autograd.Function):
    """Training-mode batch_norm_join with statistics synchronised over a process group."""

    @staticmethod
    def forward(ctx, mask, process_group, running, momentum, eps, relu, seeds, dropout, k, *tensors):
        xs = dense_inputs(tensors[:k])
        weights, biases = tensors[k:2 * k], tensors[2 * k:]
        running_means, running_vars, num_batches_tracked = running
        mean, var = batch_statistics(xs, [None] * k, [None] * k, None, 0.0, seeds, dropout)  # [k, C] each, biased
        # fp64 keeps the element count exact (fp32 is exact only to 2**24).
        count = mean.new_full(mean.shape, xs[0].numel() // xs[0].shape[1], dtype=torch.float64)
        local = torch.stack([mean.double(), var.double(), count])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, local, group=process_group)
        means, variances, counts = torch.stack(gathered).unbind(1)  # each [ranks, k, C]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        for i in range(k):
            factor = momentum
            if num_batches_tracked[i] is not None:
                num_batches_tracked[i].add_(1)
                if momentum is None:  # the cumulative average, without reading the count back
                    factor = num_batches_tracked[i].reciprocal().to(mean.dtype)
            if running_means[i] is not None:
                running_means[i].lerp_(mean[i].to(running_means[i].dtype), factor)
                running_vars[i].lerp_((var[i] * total[i] / (total[i] - 1)).to(running_vars[i].dtype), factor)
        means = list(mean.to(acc_dtype(xs[0].dtype)).unbind(0))
        variances = list(var.to(acc_dtype(xs[0].dtype)).unbind(0))
        out = normalize_join(xs, mask, None, list(weights), list(biases), means, variances, eps, relu, seeds, dropout)
        ctx.save_for_backward(mask, total, seeds, *xs, *weights, *biases, *means, *variances)
        ctx.options = (k, eps, relu, dropout, process_group)
        return out

    @staticmethod
    def backward(ctx, grad):
        k, eps, relu, dropout, process_group = ctx.options
        mask, total, seeds, *saved = ctx.saved_tensors
        xs, weights, biases, means, variances = (list(saved[j * k:(j + 1) * k]) for j in range(5))
        grad = grad.contiguous(memory_format=memory_format(xs[0]))
        args = (grad, xs, mask, None, weights, biases, means, variances, eps, relu, dropout_args(seeds, dropout))
        local = bn_backward_sums(*args).sum(2, keepdim=True)  # [2, k, 1, C]: sums of g and g * x_hat
        sums = local.clone()
        dist.all_reduce(sums, group=process_group)
        # The global sums divided by the global count on the device: the kernel's count is 1.
        sums = (sums / total[None, :, None, :]).to(local.dtype)
        grad_inputs, _ = bn_backward_dx(*args, True, sums, count=1, param_grads=False)
        # Parameter gradients stay local, as nn.SyncBatchNorm's: DDP reduces them across ranks.
        grad_weights = param_grads(local[1, :, 0], weights)
        grad_biases = param_grads(local[0, :, 0], biases)
        return (None,) * 9 + (*grad_inputs, *grad_weights, *grad_biases)


def sync_batch_norm_join(
    inputs: Sequence[torch.Tensor],
    mask: Optional[torch.Tensor],
    weights: Sequence[Optional[torch.Tensor]],
    biases: Sequence[Optional[torch.Tensor]],
    running_means: Sequence[Optional[torch.Tensor]],
    running_vars: Sequence[Optional[torch.Tensor]],
    momentum: Optional[float],
    eps: float,
    relu: bool,
    process_group,
    num_batches_tracked: Optional[Sequence[Optional[torch.Tensor]]] = None,
    dropout: float = 0.0,
    seeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Training-mode batch_norm_join with statistics synchronised over ``process_group``."""
    if dropout and seeds is None:
        seeds = draw_seeds(len(inputs), inputs[0].device)
    running = (tuple(running_means), tuple(running_vars), tuple(num_batches_tracked or [None] * len(inputs)))
    return SyncBatchNormJoin.apply(mask, process_group, running, momentum, eps, relu, seeds, dropout, len(inputs),
                                   *inputs, *weights, *biases)
