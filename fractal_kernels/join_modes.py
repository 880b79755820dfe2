"""How a kernel joins its inputs per sample, and the device helpers that read the join.

A kernel's JOIN constexpr is one of:
  * JOIN_MEAN: every input survives for every sample (no join tensor);
  * JOIN_MASK: a bool drop-path mask [num_inputs, batch]; input i survives for sample b where set;
  * JOIN_GATHER: a gather table [num_inputs, batch] of compact inputs: the row of input i that
    holds sample b, or -1 where input i does not hold it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

JOIN_MEAN = tl.constexpr(0)
JOIN_MASK = tl.constexpr(1)
JOIN_GATHER = tl.constexpr(2)


def bool_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask as bool (float masks are compared with 0): the kernels read one byte per entry."""
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


#: The join arguments of a plain mean.
_NO_JOIN = ((None, 0, 0), JOIN_MEAN.value)


def join_args(mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> tuple[tuple, int]:
    """The kernel arguments of a join given by a mask, by a gather table or by neither
    (pointer or None, stride over inputs, stride over samples), and its JOIN mode."""
    if mask is None and rows is None:
        return _NO_JOIN
    if rows is not None:
        return (rows, rows.stride(0), rows.stride(1)), JOIN_GATHER.value
    mask = bool_mask(mask)
    return (mask, mask.stride(0), mask.stride(1)), JOIN_MASK.value


def row_samples(rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The inverse of a gather table: for each compact input, the sample each of its ``sizes[i]``
    rows holds (-1 for none). A few small ops on the [k, B] table, on its device."""
    k, batch = rows.shape
    spare = max(sizes)  # a spare column takes the -1 entries
    table = rows.new_full((k, spare + 1), -1)
    samples = torch.arange(batch, device=rows.device, dtype=rows.dtype).expand(k, batch)
    table.scatter_(1, torch.where(rows >= 0, rows, spare), samples)
    return [table[i, :size] for i, size in enumerate(sizes)]


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
