"""The composite torch.library ops of the public BatchNorm ops, their schemas in one place.

``bn_relu``, ``join_bn_relu`` and ``gather_join_bn_relu`` are CompositeImplicitAutograd ops:
batchnorm.batch_norm_join through the kernel ops (``traced=True``), whose autograd Function torch
traces (torch.library allows no autograd formula on an op that mutates its inputs, as these do
the running statistics). The kernel ops themselves are registered from their launchers
(join.py, batchnorm.py). In eager mode the public ops skip these and launch directly.
"""

from __future__ import annotations

import torch

from .batchnorm import batch_norm_join
from .join_modes import Join

_library = torch.library.Library("fractal_kernels", "FRAGMENT")
_library.define(
    "bn_relu(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "bool training, float? momentum=0.1, float eps=1e-05, bool relu=True, Tensor(c!)? num_batches_tracked=None, "
    "float dropout=0.0, Tensor? seeds=None, str? group_name=None) -> Tensor"
)
_library.define(
    "join_bn_relu(Tensor[] inputs, Tensor? mask, Tensor?[] weights, Tensor?[] biases, "
    "Tensor(a!)?[] running_means, Tensor(b!)?[] running_vars, bool training, float? momentum=0.1, "
    "float eps=1e-05, Tensor(c!)?[]? num_batches_tracked=None, float dropout=0.0, Tensor? seeds=None, "
    "str? group_name=None) -> Tensor"
)
_library.define(
    "gather_join_bn_relu(Tensor[] inputs, Tensor rows, Tensor?[] weights, Tensor?[] biases, "
    "Tensor(a!)?[] running_means, Tensor(b!)?[] running_vars, bool training, float? momentum=0.1, "
    "float eps=1e-05, Tensor(c!)?[]? num_batches_tracked=None, float dropout=0.0, Tensor? seeds=None) -> Tensor"
)


def _bn_relu(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5, relu=True,
             num_batches_tracked=None, dropout=0.0, seeds=None, group_name=None):
    return batch_norm_join([x], Join.of([x]), [weight], [bias], [running_mean], [running_var], [num_batches_tracked],
                           training=training, momentum=momentum, eps=eps, relu=relu, dropout=dropout, seeds=seeds,
                           group_name=group_name, traced=True)


def _join_bn_relu(inputs, mask, weights, biases, running_means, running_vars, training, momentum=0.1, eps=1e-5,
                  num_batches_tracked=None, dropout=0.0, seeds=None, group_name=None):
    return batch_norm_join(inputs, Join.of(inputs, mask), weights, biases, running_means, running_vars,
                           num_batches_tracked, training=training, momentum=momentum, eps=eps, relu=True,
                           dropout=dropout, seeds=seeds, group_name=group_name, traced=True)


def _gather_join_bn_relu(inputs, rows, weights, biases, running_means, running_vars, training, momentum=0.1,
                         eps=1e-5, num_batches_tracked=None, dropout=0.0, seeds=None):
    return batch_norm_join(inputs, Join.of(inputs, rows=rows), weights, biases, running_means, running_vars,
                           num_batches_tracked, training=training, momentum=momentum, eps=eps, relu=True,
                           dropout=dropout, seeds=seeds, traced=True)


_library.impl("bn_relu", _bn_relu, "CompositeImplicitAutograd")
_library.impl("join_bn_relu", _join_bn_relu, "CompositeImplicitAutograd")
_library.impl("gather_join_bn_relu", _gather_join_bn_relu, "CompositeImplicitAutograd")

bn_relu = torch.ops.fractal_kernels.bn_relu.default
join_bn_relu = torch.ops.fractal_kernels.join_bn_relu.default
gather_join_bn_relu = torch.ops.fractal_kernels.gather_join_bn_relu.default
