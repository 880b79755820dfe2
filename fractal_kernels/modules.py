"""nn.Module drop-ins built on the fused ops."""

from __future__ import annotations

import torch
from torch import nn

from .ops import bn_relu


class FusedBatchNormReLU2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``ReLU``, as one fused op.

    A subclass of nn.BatchNorm2d with the same parameters, buffers and state_dict (it loads a
    plain BatchNorm2d's state_dict and the other way round), ``momentum=None`` (cumulative
    average), ``num_batches_tracked``, ``track_running_stats`` and ``.eval()`` handled as torch
    does. With a ``process_group`` of several ranks, training uses batch statistics over all of
    them, as nn.SyncBatchNorm does.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        process_group=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FusedBatchNormReLU2d":
        """The fused module holding ``bn``'s own parameters and buffers (shared, not copied, so an
        optimizer built on them keeps working)."""
        fused = cls.__new__(cls)
        fused.__dict__ = dict(bn.__dict__)
        fused.process_group = None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return bn_relu(x, **batchnorm_arguments(self), process_group=self.process_group)


def batchnorm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> dict:
    """The bn_relu arguments that reproduce ``bn``'s own forward: its parameters, its running
    statistics where it tracks them, batch statistics in training (or without running
    statistics), its momentum (None: the cumulative average), and in training its
    ``num_batches_tracked``, which the statistics kernel increments as nn.BatchNorm2d.forward
    does, with no launch of its own and no read back to the host."""
    track = not bn.training or bn.track_running_stats
    counting = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    return dict(
        weight=bn.weight,
        bias=bn.bias,
        running_mean=bn.running_mean if track else None,
        running_var=bn.running_var if track else None,
        training=bn.training or (bn.running_mean is None and bn.running_var is None),
        momentum=bn.momentum if counting or bn.momentum is not None else 0.0,
        eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if counting else None,
    )


def fuse_batchnorm_relu(model: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm2d directly followed by nn.ReLU inside an nn.Sequential of
    ``model`` with a FusedBatchNormReLU2d (sharing its weights and buffers) and the ReLU with
    nn.Identity, so module names and the state_dict are unchanged. Returns ``model``."""
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        for (name, module), (next_name, following) in zip(children, children[1:]):
            if type(module) is nn.BatchNorm2d and type(following) is nn.ReLU:
                setattr(sequential, name, FusedBatchNormReLU2d.from_batchnorm(module))
                setattr(sequential, next_name, nn.Identity())
    return model
