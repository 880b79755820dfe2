"""Tensors as the kernels take them: dense layouts and accumulation dtypes.

Contiguous (NCHW) and channels-last tensors are taken without copies: both keep each sample's
elements in one dense run, so a join sees [batch, sample_numel] whatever the layout, and the
per-channel kernels see [N, C, HW] with either HW or C the contiguous axis. Every kernel
accumulates in fp32 (fp64 for fp64 storage, which serves gradcheck).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype of a storage dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.constexpr_function
def accumulation_type(dtype):
    """acc_dtype inside a kernel: ``ACC: tl.constexpr = accumulation_type(x_ptr.dtype.element_ty)``."""
    return tl.float64 if dtype == tl.float64 else tl.float32


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is dense channels-last (NHWC or NDHWC) and not also plain contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is contiguous or channels-last; otherwise a contiguous copy."""
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a dense x: channels-last (4-D or 5-D) or contiguous."""
    if is_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def like_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised tensor like dense x (dtype, device, layout) with ``rows`` rows."""
    return torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def dense_inputs(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in one dense layout: the first input's if it is contiguous or channels-last
    (inputs may differ in their batch size)."""
    for x in inputs:  # the usual case, asked cheaply: all contiguous (then none is channels-last)
        if not x.is_contiguous():
            break
    else:
        return list(inputs)
    first = dense(inputs[0])
    if len(inputs) == 1:
        return [first]
    layout = memory_format(first)
    return [first] + [x if x.is_contiguous(memory_format=layout) else x.contiguous(memory_format=layout)
                      for x in inputs[1:]]
