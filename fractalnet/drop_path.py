"""Drop-path sampling (FractalNet section 3.1), drawn for the whole network at once.

Per sample, in training only: with probability ``global_ratio`` the sample is *global* and follows
one column, drawn uniformly and the same in every block; otherwise it is *local* and every join
drops each of its inputs with probability ``local_drop``, keeping at least one (one input chosen
uniformly is restored when all are dropped). A global sample has no survivor at the joins its
column does not reach; the join gives it 0 there, which the later joins drop.

Every join's mask comes from one random draw on the device, with no host round trip: about twenty
small kernels a step for the whole network, where drawing join by join takes about a hundred.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily


def join_rows(columns: Sequence[int], block_columns: int) -> list[int]:
    """The rows (1-based) of a block of ``block_columns`` columns where two or more of the active
    ``columns`` end, i.e. its joins: the multiples of the second-deepest column's span."""
    if len(columns) < 2:
        return []
    span = 2 ** (block_columns - columns[-2])
    return list(range(span, 2 ** (block_columns - 1) + 1, span))


def chosen_column(draw, n: int, weights: Optional[Sequence[float]] = None):
    """The index among ``n`` columns that a uniform ``draw`` in [0, 1) (a float, or a tensor of
    draws) picks: uniformly, or in proportion to ``weights``."""
    if weights is None:
        return int(draw * n) if isinstance(draw, float) else (draw * n).long()
    total = sum(weights)
    bounds = [sum(weights[:j + 1]) / total for j in range(n - 1)]
    if isinstance(draw, float):
        return sum(draw >= bound for bound in bounds)
    return torch.zeros_like(draw, dtype=torch.long) + sum((draw >= bound).long() for bound in bounds)


def copy_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a GPU asynchronously through pinned memory, so that
    the host does not wait (a plain copy while torch traces, which cannot trace pinning, and for
    fake tensors)."""
    device = torch.device(device)
    if not pinned_copy(t, device):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pinned_copy(t: torch.Tensor, device: torch.device) -> bool:
    """Whether copy_to_device pins: a real host tensor bound for a GPU, in eager mode."""
    return (t.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling()
            and not is_fake(t))


@contextlib.contextmanager
def real_host_draws():
    """A block whose host draws are real tensors under FakeTensorMode (memory estimators and FLOP
    counters trace a training step on fake tensors): the model branches on them, as on a real
    step. Yields the fake mode set aside (None when there is none, or while torch compiles)."""
    fake_mode = None if torch.compiler.is_compiling() else detect_fake_mode()
    with unset_fake_temporarily() if fake_mode is not None else contextlib.nullcontext():
        yield fake_mode


class DropPath:
    """The drop-path draws of one training forward pass over a batch.

    Args:
        batch: samples.
        columns: the active columns, consecutive and ascending (1..k for a truncation).
        block_columns: C, the columns of each block.
        num_blocks: blocks of the network.
        local_drop, global_ratio: the rates above.
        column_weights: a global sample's column is drawn in proportion to these (one per
            column); None: uniformly.
        device: where the masks are used.
        generator: all draws come from it (or the default RNG of ``device``; of the host with
            ``per_batch``), so two models fed the same seed draw the same masks; its device is
            where they are drawn.
        per_batch: one draw for the whole batch, as the paper's own code does: the batch is
            global (one column for every sample) or local (one mask for every sample), drawn on
            the host (a handful of numbers), so the model knows which without a synchronisation.
            By default every sample draws its own, as the PyTorch ports do.
        local: with ``per_batch``, a local batch whatever the draw, its masks drawn on ``device``
            (from ``generator``, or the device's default generator, which a CUDA graph registers):
            the local structure of a graphed training step (fractalnet.graphs).

    ``is_global`` [B] and ``global_column`` [B] (column numbers) describe the samples, and drawn
    per batch ``batch_column`` says it on the host: the column of a global batch, None for a local
    one (and while torch traces). :meth:`mask` gives one join's [k, B] bool mask.
    """

    def __init__(
        self,
        batch: int,
        columns: Sequence[int],
        block_columns: int,
        num_blocks: int,
        local_drop: float,
        global_ratio: float,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        per_batch: bool = False,
        local: bool = False,
        column_weights: Optional[Sequence[float]] = None,
    ):
        if local and not per_batch:
            raise ValueError("local=True is a per-batch structure: pass per_batch=True")
        # Drawn per batch (and not local), the structure is a host draw; otherwise the draw is on
        # the device that uses it. Either way, a given generator's device.
        host = per_batch and not local
        draw_device = generator.device if generator is not None else torch.device("cpu" if host else device)
        on_host = host and draw_device.type == "cpu"
        with real_host_draws() if on_host else contextlib.nullcontext() as fake_mode:
            masks = self._draw(batch, columns, block_columns, num_blocks, local_drop, global_ratio, device,
                               generator, draw_device, per_batch, local, column_weights)
        if fake_mode is not None:
            masks = fake_mode.from_tensor(masks)
        self._masks = copy_to_device(masks, device).expand(-1, -1, -1, batch)

    def _draw(self, batch, columns, block_columns, num_blocks, local_drop, global_ratio, device, generator,
              draw_device, per_batch, local, column_weights) -> torch.Tensor:
        """Draws the structure (kept on self) and returns the masks, where they were drawn."""
        columns = list(columns)
        consecutive = columns == list(range(columns[0], columns[0] + len(columns))) if columns else False
        if len(columns) < 2 or not consecutive or columns[-1] > block_columns:
            raise ValueError(f"columns must be two or more consecutive columns of 1..{block_columns}, got {columns}")
        self.columns, self.block_columns = columns, block_columns
        self.rows = join_rows(columns, block_columns)
        n, joins = len(columns), len(self.rows)
        samples, batch = batch, 1 if per_batch else batch
        draw = torch.rand(num_blocks * joins * n * batch + 2 * batch, generator=generator, device=draw_device)
        keep_draw = draw[: num_blocks * joins * n * batch].view(num_blocks, joins, n, batch)
        sample_draw = draw[num_blocks * joins * n * batch:].view(2, batch)
        # ends[j, i]: active column i ends at join j (row rows[j]); a suffix of the columns.
        span = 2 ** (block_columns - columns[-2])
        rows = torch.arange(span, 2 ** (block_columns - 1) + 1, span, device=draw_device)
        positions = torch.arange(n, device=draw_device)
        ends = (rows[:, None] % (2 ** (block_columns - columns[0]) >> positions)[None, :] == 0)[None, :, :, None]
        keep = (keep_draw >= local_drop) & ends
        # Where all were dropped, restore the input with the largest draw: given that all draws
        # fell below local_drop, that input is uniform among the join's inputs.
        restored = positions[:, None] == torch.where(ends, keep_draw, -1.0).argmax(2, keepdim=True)
        keep |= restored & ~keep.any(2, keepdim=True)
        self.is_global = (sample_draw[0] < global_ratio) & (not local)
        chosen = chosen_column(sample_draw[1], n, column_weights)
        self.global_column = chosen + columns[0]
        follows = positions[:, None] == chosen[None, :]
        masks = torch.where(self.is_global, follows, keep)
        if per_batch:  # on the host: the model reads them to run a global batch's column alone
            # (Traced, the model does not branch on it: the masks carry the structure.)
            self.batch_column = (int(self.global_column[0]) if not local and not torch.compiler.is_compiling()
                                 and bool(self.is_global[0]) else None)
            self.is_global, self.global_column = self.is_global.expand(samples), self.global_column.expand(samples)
        else:
            self.is_global = self.is_global.to(device)
            self.global_column = self.global_column.to(device)
        return masks

    def mask(self, block: int, row: int) -> torch.Tensor:
        """The [k, B] bool mask of the join at ``row`` of block ``block`` (0-based), over the k
        active columns ending there, ascending."""
        first = sum(1 for c in self.columns if row % 2 ** (self.block_columns - c))
        return self._masks[block, self.rows.index(row), first:]
