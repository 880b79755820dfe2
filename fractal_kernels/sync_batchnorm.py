"""Synchronised BatchNorm: batch statistics over the ranks of a process group.

Each rank computes its statistics with the same kernels; batch_norm_join all-gathers and merges
them (:meth:`RankStatistics.gather`) before the apply pass and updates the running statistics from
the global ones, and the backward reduces its per-channel sums over the ranks before the
input-gradient pass (:meth:`RankStatistics.global_means`), so DDP training normalises with global
batch statistics as nn.SyncBatchNorm does. The collectives are torch's functional ones, so that
the same code runs eagerly and under torch.compile (fullgraph). Nothing is read back to the host:
the global element count stays on the device (fp64, exact), and the backward divides the reduced
sums by it there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed._functional_collectives as funcol

#: Gathers a tensor from every rank along dim 0 (all_gather_single since torch 2.12; its older name
#: is deprecated there).
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class RankStatistics(NamedTuple):
    """The global batch statistics of k inputs over the ranks of a process group: per channel
    [k, C] fp64 mean, biased variance and element count."""

    group_name: str
    mean: torch.Tensor
    var: torch.Tensor
    total: torch.Tensor

    @classmethod
    def gather(cls, local: torch.Tensor, count: int, group_name: str) -> RankStatistics:
        """Merges every rank's [2, k, C] batch statistics ``local`` over ``count`` elements per
        channel (ranks may hold different batch sizes)."""
        k, C = local.shape[1:]
        # fp64 keeps the element count exact (fp32 is exact only to 2**24).
        counts = local.new_full((k, C), count, dtype=torch.float64)
        mine = torch.stack([local[0].double(), local[1].double(), counts])
        means, variances, counts = _all_gather(mine, 0, group_name).view(-1, 3, k, C).unbind(1)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        return cls(group_name, mean, var, total)

    def update_running(self, running_means: Sequence, running_vars: Sequence, num_batches_tracked: Sequence,
                       momentum: Optional[float]) -> None:
        """Counts the batch and updates the present running statistics (None: absent) with the
        global ones, as batch_statistics does with local ones."""
        for i, (running_mean, running_var, counter) in enumerate(zip(running_means, running_vars,
                                                                     num_batches_tracked)):
            factor = momentum
            if counter is not None:
                counter.add_(1)
                if momentum is None:  # the cumulative average, without reading the count back
                    factor = counter.reciprocal().to(self.mean.dtype)
            if running_mean is not None:
                running_mean.lerp_(self.mean[i].to(running_mean.dtype), factor)
                unbiased = self.var[i] * self.total[i] / (self.total[i] - 1)
                running_var.lerp_(unbiased.to(running_var.dtype), factor)

    def moments(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-input [C] means and variances in the kernels' accumulation ``dtype``."""
        return list(self.mean.to(dtype).unbind(0)), list(self.var.to(dtype).unbind(0))

    def global_means(self, sums: torch.Tensor) -> torch.Tensor:
        """This rank's [2, k, 1, C] backward sums reduced over the ranks and divided by the global
        element count, in their own dtype."""
        reduced = funcol.all_reduce(sums, "sum", self.group_name)
        return (reduced / self.total[None, :, None, :]).to(sums.dtype)
