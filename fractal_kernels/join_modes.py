"""How a kernel joins its inputs per sample, and the device helpers that read the join.

A kernel's JOIN constexpr is one of:
  * JOIN_MEAN: every input survives for every sample (no join tensor);
  * JOIN_MASK: a bool drop-path mask [num_inputs, batch]; input i survives for sample b where set;
  * JOIN_GATHER: a gather table [num_inputs, batch] of compact inputs: the row of input i that
    holds sample b, or -1 where input i does not hold it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .tensors import like_rows

JOIN_MEAN = tl.constexpr(0)
JOIN_MASK = tl.constexpr(1)
JOIN_GATHER = tl.constexpr(2)


def bool_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as bool (float masks are compared with 0): the kernels read one byte per entry."""
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


class Join(NamedTuple):
    """How an op joins its k inputs per sample, as one value: ``mode`` (JOIN_MEAN, JOIN_MASK or
    JOIN_GATHER), ``table`` (None, the bool [k, B] mask or the [k, B] gather table) and ``sizes``
    (each input's rows). The public op builds it once (``Join.of``) after checking its
    arguments; launchers read the kernel arguments, output rows and row samples from it."""

    mode: int
    table: Optional[torch.Tensor]
    sizes: list[int]

    @classmethod
    def of(cls, inputs: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None,
           rows: Optional[torch.Tensor] = None) -> Join:
        """The join of ``inputs`` by gather table ``rows``, by drop-path ``mask``, or by neither (a mean)."""
        sizes = [x.shape[0] for x in inputs]
        if rows is not None:
            return cls(JOIN_GATHER.value, rows, sizes)
        if mask is not None:
            return cls(JOIN_MASK.value, bool_mask(mask), sizes)
        return cls(JOIN_MEAN.value, None, sizes)

    @property
    def gathered(self) -> bool:
        """Whether the inputs are compact (a gather table): the output has other rows than they."""
        return self.mode == JOIN_GATHER.value

    def args(self) -> tuple:
        """The kernels' join arguments: the table (or None) and its strides over inputs and samples."""
        table = self.table
        return (None, 0, 0) if table is None else (table, table.stride(0), table.stride(1))

    def output(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised output like dense input ``like``: its rows, or the table's samples."""
        return like_rows(like, self.table.shape[1]) if self.gathered else torch.empty_like(like)

    def row_samples(self) -> list[torch.Tensor]:
        """The inverse of a gather table: for each compact input, the sample each of its rows
        holds (-1 for none). A few small ops on the [k, B] table, on its device."""
        rows = self.table
        k, batch = rows.shape
        spare = max(self.sizes)  # a spare column takes the -1 entries
        table = rows.new_full((k, spare + 1), -1)
        samples = torch.arange(batch, device=rows.device, dtype=rows.dtype).expand(k, batch)
        table.scatter_(1, torch.where(rows >= 0, rows, spare), samples)
        return [table[i, :size] for i, size in enumerate(self.sizes)]


@triton.jit
def join_row(join_ptr, stride_k, stride_n, i, n, n_ok, JOIN: tl.constexpr):
    """(keep, row): whether input i survives for sample n (a scalar or a tensor of samples), and
    the row of input i that holds it. Only for load addresses: a store address computed from a
    helper's result counts, in torch's mutation analysis, as a write to every tensor the helper
    was given."""
    if JOIN == JOIN_GATHER:
        row = tl.load(join_ptr + i * stride_k + n * stride_n, mask=n_ok, other=-1)
        return row >= 0, row
    elif JOIN == JOIN_MASK:
        return tl.load(join_ptr + i * stride_k + n * stride_n, mask=n_ok, other=0) != 0, n
    else:
        return n_ok, n


@triton.jit
def join_scale(join_ptr, stride_k, stride_n, n, n_ok, num_inputs, JOIN: tl.constexpr, ACC: tl.constexpr):
    """1 / (surviving inputs) for each sample n, 0 where none survives (1 / num_inputs for JOIN_MEAN)."""
    if JOIN == JOIN_MEAN:
        return (n * 0 + 1).to(ACC) / num_inputs
    else:
        count = (n * 0).to(ACC)
        for i in range(num_inputs):
            keep, _ = join_row(join_ptr, stride_k, stride_n, i, n, n_ok, JOIN)
            count += keep.to(ACC)
        return tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
