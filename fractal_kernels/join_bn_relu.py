"""The fused column-end op: BatchNorm + ReLU of each of k inputs and their masked join, in one pass.

At every join of a fractal block, k columns end in BN -> ReLU and their outputs are averaged.
Unfused, each column's BN output and ReLU output are written, read again, stacked and reduced.
Here each raw conv output is read twice (statistics, then apply) and only the join's output is
written; backward keeps the k raw inputs, the mask and O(k*C) statistics.

The kernels are batchnorm.py's, which take k inputs and a join mask (bn_relu is their k = 1
case); this file registers the op and the statistics synchronised over a process group that
multi-GPU training uses for both ops. ``gather_join_bn_relu`` is the same over compact inputs
(column segments computed only for the samples that survive), with a gather table in place of
the mask.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .batchnorm import _library, batch_norm_join, bn_apply, bn_backward_dx, bn_backward_sums, bn_stats
from .common import dense_inputs, join_args, memory_format, placeholder, present

_library.define(
    "join_bn_relu(Tensor[] inputs, Tensor? mask, Tensor?[] weights, Tensor?[] biases, "
    "Tensor(a!)?[] running_means, Tensor(b!)?[] running_vars, bool training, float momentum=0.1, "
    "float eps=1e-05) -> Tensor"
)


_library.define(
    "gather_join_bn_relu(Tensor[] inputs, Tensor rows, Tensor?[] weights, Tensor?[] biases, "
    "Tensor(a!)?[] running_means, Tensor(b!)?[] running_vars, bool training, float momentum=0.1, "
    "float eps=1e-05) -> Tensor"
)


def _join_bn_relu(inputs, mask, weights, biases, running_means, running_vars, training, momentum=0.1, eps=1e-5):
    return batch_norm_join(inputs, mask, weights, biases, running_means, running_vars, training, momentum, eps, True)


def _gather_join_bn_relu(inputs, rows, weights, biases, running_means, running_vars, training, momentum=0.1,
                         eps=1e-5):
    return batch_norm_join(inputs, None, weights, biases, running_means, running_vars, training, momentum, eps, True,
                           rows=rows)


_library.impl("join_bn_relu", _join_bn_relu, "CompositeImplicitAutograd")
_library.impl("gather_join_bn_relu", _gather_join_bn_relu, "CompositeImplicitAutograd")


class SyncBatchNormJoin(torch.autograd.Function):
    """bn_relu / join_bn_relu in training with batch statistics over all ranks of a process group.

    Each rank computes its Welford statistics with the same kernels; they are all-gathered and
    merged before the apply pass (and the running statistics updated from the global ones), and
    the backward's per-channel sums are all-reduced before the input-gradient pass, so DDP
    training normalises with global batch statistics as nn.SyncBatchNorm does. Eager only.
    """

    @staticmethod
    def forward(ctx, mask, process_group, running, momentum, eps, relu, k, *tensors):
        xs = dense_inputs(tensors[:k])
        weights, biases = tensors[k:2 * k], tensors[2 * k:]
        running_means, running_vars = running
        absent = [placeholder(xs[0])] * k
        local = bn_stats(xs, absent, absent, 0.0)  # [2, k, C]: mean, biased variance
        count = local.new_full((1,) + local.shape[1:], xs[0].numel() // xs[0].shape[1])
        local = torch.cat([local, count])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, local, group=process_group)
        means, variances, counts = torch.stack(gathered).unbind(1)  # each [ranks, k, C]
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        for i in range(k):
            if running_means[i] is not None:
                running_means[i].lerp_(mean[i].to(running_means[i].dtype), momentum)
                running_vars[i].lerp_((var[i] * total[i] / (total[i] - 1)).to(running_vars[i].dtype), momentum)
        means, variances = list(mean.unbind(0)), list(var.unbind(0))
        out = bn_apply(xs, mask, None, list(weights), list(biases), means, variances, True, eps, relu)
        ctx.save_for_backward(mask, *xs, *weights, *biases, *means, *variances)
        ctx.options = (k, eps, relu, process_group, int(total[0, 0].item()))
        return out

    @staticmethod
    def backward(ctx, grad):
        k, eps, relu, process_group, count = ctx.options
        mask, *saved = ctx.saved_tensors
        xs, weights, biases, means, variances = (list(saved[j * k:(j + 1) * k]) for j in range(5))
        grad = grad.contiguous(memory_format=memory_format(xs[0]))
        join, mode = join_args(grad, mask)
        args = (grad, xs, join, mode, weights, biases, means, variances, eps, relu)
        local_sums = bn_backward_sums(*args).sum(2, keepdim=True)
        sums = local_sums.clone()
        dist.all_reduce(sums, group=process_group)
        grad_inputs, _ = bn_backward_dx(*args, True, sums, count=count)
        # Parameter gradients stay local, as nn.SyncBatchNorm's: DDP reduces them across ranks.
        sum_g, sum_gx = local_sums[:, :, 0]
        grad_params = torch.stack([sum_gx, sum_g])
        grad_weights = [grad_params[0, i].to(w.dtype) if present(w) else None for i, w in enumerate(weights)]
        grad_biases = [grad_params[1, i].to(b.dtype) if present(b) else None for i, b in enumerate(biases)]
        return (None,) * 7 + (*grad_inputs, *grad_weights, *grad_biases)


def sync_batch_norm_join(
    inputs: Sequence[torch.Tensor],
    mask: Optional[torch.Tensor],
    weights: Sequence[Optional[torch.Tensor]],
    biases: Sequence[Optional[torch.Tensor]],
    running_means: Sequence[Optional[torch.Tensor]],
    running_vars: Sequence[Optional[torch.Tensor]],
    momentum: float,
    eps: float,
    relu: bool,
    process_group,
) -> torch.Tensor:
    """Training-mode batch_norm_join with statistics synchronised over ``process_group``."""
    absent = placeholder(inputs[0])
    params = [absent if t is None else t for t in (*weights, *biases)]
    running = (tuple(running_means), tuple(running_vars))
    return SyncBatchNormJoin.apply(mask, process_group, running, momentum, eps, relu, len(inputs), *inputs, *params)
