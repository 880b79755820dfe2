"""Drop-path sampling (FractalNet section 3.1).

Per sample, in training only: with probability ``global_ratio`` the sample is *global* and follows
one column, drawn uniformly and the same in every block; otherwise it is *local* and every join
drops each of its inputs with probability ``local_drop``, keeping at least one (one input chosen
uniformly is restored when all are dropped). A global sample has no survivor at the joins its
column does not reach; the join gives it 0 there, which the later joins drop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class DropPath:
    """The drop-path draws of one forward pass over a batch.

    Construction draws, per sample, whether it is global and which of ``columns`` it follows;
    each :meth:`mask` call draws one join's local masks. All draws come from ``generator`` (or the
    default torch RNG) in a fixed order, so two models fed the same seed draw the same masks.
    """

    def __init__(
        self,
        batch: int,
        columns: Sequence[int],
        local_drop: float,
        global_ratio: float,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
    ):
        self.columns = list(columns)
        self.local_drop = local_drop
        self.device = device
        self.generator = generator
        self.is_global = self._rand(batch) < global_ratio
        choice = torch.randint(len(self.columns), (batch,), generator=generator, device=self._draw_device)
        self.global_column = torch.tensor(self.columns, device=self._draw_device)[choice].to(device)

    @property
    def _draw_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else self.device

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self._draw_device).to(self.device)

    def mask(self, join_columns: Sequence[int]) -> torch.Tensor:
        """The [len(join_columns), batch] bool mask of one join whose inputs end these columns."""
        k, batch = len(join_columns), self.is_global.shape[0]
        keep = self._rand(k, batch) >= self.local_drop
        restored = torch.randint(k, (batch,), generator=self.generator, device=self._draw_device).to(self.device)
        keep |= ~keep.any(0, keepdim=True) & (torch.arange(k, device=self.device)[:, None] == restored)
        follows = torch.tensor(list(join_columns), device=self.device)[:, None] == self.global_column
        return torch.where(self.is_global, follows, keep)
