"""Drop-path-aware joins: the per-sample mean of the inputs that survive.

``masked_join``: out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b], with 0 (and a 0 gradient) for a
sample that has no survivor. The eager join stacks k inputs, selects, sums and divides: about
6k+2 tensor-sizes of traffic. Here the forward reads each surviving input once and writes once
(k+1 at most), the backward reads the gradient once and writes the k input gradients, and only
the mask is saved.

``gather_join``: the same mean over compact inputs, input i holding only the B_i samples that
flow through its column segment; ``rows[i, b]`` is the row of input i that holds sample b, or -1.
Its gradients are compact too.

Both layouts need no copy: a contiguous or channels-last tensor keeps each sample's elements in
one dense run, so the kernels see [batch, sample_numel] whatever the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .join_modes import JOIN_GATHER, join_args, join_row, join_scale
from .launch import STREAMING_REGISTERS, audit_cases, define_op, input_groups, launch, slots
from .tensors import accumulation_type, dense, dense_inputs, like_rows


@triton.jit
def masked_join_fwd_kernel(
    out_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    join_ptr, join_stride_k, join_stride_n,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, JOIN: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Joins inputs first_input .. first_input+K-1 of a num_inputs-input join into out.

    Pointers: ``out_ptr`` and ``x0``..``x7`` (the first K given, the others None) share one
    layout with ``sample_numel`` elements per sample (row); ``join_ptr`` is the [num_inputs,
    batch] mask or gather table with its strides, or None, as JOIN says (join_modes). Program p
    covers block p % blocks_per_sample of sample p // blocks_per_sample. ACCUMULATE adds to out
    (the groups after the first when k > 8). A dropped input is never loaded, so its NaN or Inf
    cannot reach the output.
    """
    ACC: tl.constexpr = accumulation_type(out_ptr.dtype.element_ty)
    xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    in_sample = offs < sample_numel
    scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, True, num_inputs, JOIN, ACC)
    acc = tl.zeros([BLOCK], ACC)
    for i in tl.static_range(K):
        keep, row = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, True, JOIN)
        acc += tl.load(xs[i] + row.to(tl.int64) * sample_numel + offs, mask=in_sample & keep, other=0.0).to(ACC)
    out = acc * scale
    out_ptr += n.to(tl.int64) * sample_numel
    if ACCUMULATE:
        out += tl.load(out_ptr + offs, mask=in_sample, other=0.0).to(ACC)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_sample)


@triton.jit
def masked_join_bwd_kernel(
    grad_ptr,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7,
    join_ptr, join_stride_k, join_stride_n,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, JOIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes the gradients of inputs first_input .. first_input+K-1: grad * keep / count.

    Pointers: ``grad_ptr`` (the output gradient, [batch] rows) and ``dx0``..``dx7`` (input
    gradients, the first K given, the others None) share one layout; the join and the grid are
    as in masked_join_fwd_kernel. With a mask, dropped inputs and samples without a survivor get
    exact zeros, whatever the output gradient holds; with a gather table, only the rows that
    hold a sample are written (the launcher zeroes the others).
    """
    ACC: tl.constexpr = accumulation_type(grad_ptr.dtype.element_ty)
    dxs = (dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7)
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    in_sample = offs < sample_numel
    scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, True, num_inputs, JOIN, ACC)
    grad = tl.load(grad_ptr + n.to(tl.int64) * sample_numel + offs, mask=in_sample, other=0.0).to(ACC) * scale
    for i in tl.static_range(K):
        dx_ptr = dxs[i]
        if JOIN == JOIN_GATHER:
            # Loaded here, not by join_row: this row is a store address (see join_row).
            row = tl.load(join_ptr + (first_input + i) * join_stride_k + n * join_stride_n)
            tl.store(dx_ptr + row.to(tl.int64) * sample_numel + offs, grad.to(dx_ptr.dtype.element_ty),
                     mask=in_sample & (row >= 0))
        else:
            keep, _ = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, True, JOIN)
            tl.store(dx_ptr + n.to(tl.int64) * sample_numel + offs,
                     tl.where(keep, grad, 0.0).to(dx_ptr.dtype.element_ty), mask=in_sample)


def _launch_geometry(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample_numel, BLOCK, blocks_per_sample) for a dense [batch, ...] tensor."""
    sample_numel = x[0].numel() if x.shape[0] else x.numel()
    # 16 values a thread (4 warps); fp64 takes two registers a value: half the block.
    block = max(16, min(2048 if x.element_size() <= 4 else 1024, triton.next_power_of_2(sample_numel)))
    return sample_numel, block, triton.cdiv(sample_numel, block)


def _join_forward(inputs: list[torch.Tensor], out: torch.Tensor, mask=None, rows=None) -> torch.Tensor:
    """One launch per group of eight inputs, accumulating into ``out`` after the first."""
    xs = dense_inputs(inputs)
    if out.numel() == 0:
        return out
    sample_numel, block, blocks = _launch_geometry(out)
    join, mode = join_args(mask, rows)
    for g, group in enumerate(input_groups(len(xs))):
        launch(
            wrap_triton(masked_join_fwd_kernel), (out.shape[0] * blocks,),
            out, *slots(xs, group), *join, group.start, len(xs), sample_numel, blocks,
            K=len(group), JOIN=mode, ACCUMULATE=g > 0, BLOCK=block, num_warps=4, maxnreg=STREAMING_REGISTERS,
        )
    return out


def _join_backward(grad: torch.Tensor, grads: list[torch.Tensor], mask=None, rows=None) -> list[torch.Tensor]:
    """Every input gradient from one read of ``grad`` (per group of eight)."""
    if grad.numel() == 0:
        return grads
    sample_numel, block, blocks = _launch_geometry(grad)
    join, mode = join_args(mask, rows)
    for group in input_groups(len(grads)):
        launch(
            wrap_triton(masked_join_bwd_kernel), (grad.shape[0] * blocks,),
            grad, *slots(grads, group), *join, group.start, len(grads), sample_numel, blocks,
            K=len(group), JOIN=mode, BLOCK=block, num_warps=4, maxnreg=STREAMING_REGISTERS,
        )
    return grads


@define_op("fractal_kernels::masked_join")
def masked_join_forward(inputs: list[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Launcher of the masked join: one launch for up to 8 inputs (more: one per group of 8)."""
    return _join_forward(inputs, torch.empty_like(dense(inputs[0])), mask=mask)


@define_op("fractal_kernels::masked_join_backward")
def masked_join_backward(grad: torch.Tensor, mask: Optional[torch.Tensor], num_inputs: int) -> list[torch.Tensor]:
    """Launcher of the masked join's backward."""
    grad = dense(grad)
    return _join_backward(grad, [torch.empty_like(grad) for _ in range(num_inputs)], mask=mask)


@define_op("fractal_kernels::gather_join")
def gather_join_forward(inputs: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Launcher of the gather join: the output has one row per column of ``rows``."""
    return _join_forward(inputs, like_rows(dense(inputs[0]), rows.shape[1]), rows=rows)


@define_op("fractal_kernels::gather_join_backward")
def gather_join_backward(grad: torch.Tensor, rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Launcher of the gather join's backward: compact gradients of ``sizes`` rows each, in the
    gradient's layout; rows that hold no sample get 0 (a zero fill of each gradient first)."""
    grad = dense(grad)
    return _join_backward(grad, [like_rows(grad, size, zero=True) for size in sizes], rows=rows)


def _mask_setup_context(ctx, inputs, output):
    tensors, mask = inputs
    ctx.num_inputs = len(tensors)
    ctx.save_for_backward(mask)


def _mask_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return masked_join_backward(grad, mask, ctx.num_inputs), None


def _gather_setup_context(ctx, inputs, output):
    tensors, rows = inputs
    ctx.sizes = [t.shape[0] for t in tensors]
    ctx.save_for_backward(rows)


def _gather_backward(ctx, grad):
    (rows,) = ctx.saved_tensors
    return gather_join_backward(grad, rows, ctx.sizes), None


masked_join_forward.register_autograd(_mask_backward, setup_context=_mask_setup_context)
gather_join_forward.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@audit_cases
def _audit_cases(shape: tuple, dtype: torch.dtype, channels_last: bool, quick: bool):
    """The joins of k = 2, 3 and 9 inputs (two launches; 3 only when ``quick``), by mean, mask
    and gather table."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for k in (3,) if quick else (2, 3, 9):
        xs = [torch.empty(shape, dtype=dtype).to(memory_format=layout) for _ in range(k)]
        mask = torch.ones(k, shape[0], dtype=torch.bool)
        rows = torch.zeros(k, shape[0], dtype=torch.int64)
        for name, join in (("mean", {}), ("mask", dict(mask=mask)), ("gather", dict(rows=rows))):
            yield f"join k={k} {name}", lambda xs=xs, join=join: (
                _join_forward(xs, torch.empty_like(xs[0]), **join),
                _join_backward(xs[0], [torch.empty_like(x) for x in xs], **join),
            )
