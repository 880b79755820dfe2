"""Drop-path-aware joins: the per-sample mean of the inputs that survive.

``masked_join``: out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b], with 0 (and a 0 gradient) for a
sample that has no survivor. The eager join stacks k inputs, selects, sums and divides: about
6k+2 tensor-sizes of traffic. Here the forward reads each surviving input once and writes once
(k+1 at most), the backward reads the gradient once and writes the k input gradients, and only
the mask is saved.

``gather_join``: the same mean over compact inputs, input i holding only the B_i samples that
flow through its column segment; ``rows[i, b]`` is the row of input i that holds sample b, or -1.
Its gradients are compact too, written row by row from the inverse table (no zero fill).

Both layouts need no copy: a contiguous or channels-last tensor keeps each sample's elements in
one dense run, so the kernels see [batch, sample_numel] whatever the layout.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .join_modes import JOIN_GATHER, join_args, join_row, join_scale, row_samples
from .launch import (
    STREAMING_REGISTERS, cdiv, define_op, eager_apply, input_groups, launch, next_power_of_2, runs_eagerly, slots,
    wrap_triton,
)
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
    join_ptr, join_stride_k, join_stride_n, sample_ptr,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, JOIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes the gradients of inputs first_input .. first_input+K-1: grad * keep / count.

    Pointers: ``grad_ptr`` (the output gradient, [batch] rows) and ``dx0``..``dx7`` (input
    gradients, the first K given, the others None) share one layout; the join is as in
    masked_join_fwd_kernel. With a mask (or none), program p covers block p % blocks_per_sample
    of sample p // blocks_per_sample for every input, and dropped inputs and samples without a
    survivor get exact zeros, whatever the output gradient holds. With a gather table, a launch
    writes one compact input (K = 1) over its own rows: ``sample_ptr`` maps each row to the
    sample it holds, or -1 (a 0 gradient), and None otherwise.
    """
    ACC: tl.constexpr = accumulation_type(grad_ptr.dtype.element_ty)
    dxs = (dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7)
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    in_sample = offs < sample_numel
    if JOIN == JOIN_GATHER:
        sample = tl.load(sample_ptr + n)
        held = sample >= 0
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, sample, held, num_inputs, JOIN, ACC)
        grad = tl.load(grad_ptr + sample.to(tl.int64) * sample_numel + offs, mask=in_sample & held, other=0.0)
        dx_ptr = dxs[0]
        tl.store(dx_ptr + n.to(tl.int64) * sample_numel + offs, (grad.to(ACC) * scale).to(dx_ptr.dtype.element_ty),
                 mask=in_sample)
    else:
        scale = join_scale(join_ptr, join_stride_k, join_stride_n, n, True, num_inputs, JOIN, ACC)
        grad = tl.load(grad_ptr + n.to(tl.int64) * sample_numel + offs, mask=in_sample, other=0.0).to(ACC) * scale
        for i in tl.static_range(K):
            keep, _ = join_row(join_ptr, join_stride_k, join_stride_n, first_input + i, n, True, JOIN)
            dx_ptr = dxs[i]
            tl.store(dx_ptr + n.to(tl.int64) * sample_numel + offs,
                     tl.where(keep, grad, 0.0).to(dx_ptr.dtype.element_ty), mask=in_sample)


def _launch_geometry(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample_numel, BLOCK, blocks_per_sample) for a dense [batch, ...] tensor."""
    sample_numel = x[0].numel() if x.shape[0] else x.numel()
    # 16 values a thread (4 warps); fp64 takes two registers a value: half the block.
    block = max(16, min(2048 if x.element_size() <= 4 else 1024, next_power_of_2(sample_numel)))
    return sample_numel, block, cdiv(sample_numel, block)


def join_forward(inputs: list[torch.Tensor], mask=None, rows=None) -> torch.Tensor:
    """The join's output: one launch per group of eight inputs, accumulating after the first.
    With a gather table ``rows`` the output has one row per column of it."""
    xs = dense_inputs(inputs)
    out = torch.empty_like(xs[0]) if rows is None else like_rows(xs[0], rows.shape[1])
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


def join_backward(grad: torch.Tensor, sizes: list[int], mask=None, rows=None) -> list[torch.Tensor]:
    """Every input gradient, in the gradient's layout: from one read of ``grad`` per group of
    eight inputs; with a gather table compact, ``sizes[i]`` rows each (a row that holds no
    sample gets 0), one launch per input over its own rows."""
    grad = dense(grad)
    grads = [torch.empty_like(grad) if rows is None else like_rows(grad, size) for size in sizes]
    if grad.numel() == 0:
        return grads
    sample_numel, block, blocks = _launch_geometry(grad)
    join, mode = join_args(mask, rows)
    if rows is None:
        launches = [(group, grad.shape[0], None) for group in input_groups(len(grads))]
    else:
        samples = row_samples(rows, sizes)
        launches = [(range(i, i + 1), size, samples[i]) for i, size in enumerate(sizes) if size]
    for group, rows_covered, samples in launches:
        launch(
            wrap_triton(masked_join_bwd_kernel), (rows_covered * blocks,),
            grad, *slots(grads, group), *join, samples, group.start, len(grads), sample_numel, blocks,
            K=len(group), JOIN=mode, BLOCK=block, num_warps=4, maxnreg=STREAMING_REGISTERS,
        )
    return grads


@define_op("fractal_kernels::masked_join")
def masked_join_op(inputs: list[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The masked join as a torch.library op: one launch for up to 8 inputs (more: one per group of 8)."""
    return join_forward(inputs, mask=mask)


@define_op("fractal_kernels::masked_join_backward")
def masked_join_backward_op(grad: torch.Tensor, mask: Optional[torch.Tensor], num_inputs: int) -> list[torch.Tensor]:
    """The masked join's backward as a torch.library op."""
    return join_backward(grad, [grad.shape[0]] * num_inputs, mask=mask)


@define_op("fractal_kernels::gather_join")
def gather_join_op(inputs: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The gather join as a torch.library op: the output has one row per column of ``rows``."""
    return join_forward(inputs, rows=rows)


@define_op("fractal_kernels::gather_join_backward")
def gather_join_backward_op(grad: torch.Tensor, rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The gather join's backward as a torch.library op: compact gradients of ``sizes`` rows each."""
    return join_backward(grad, sizes, rows=rows)


class JoinPath(NamedTuple):
    """How JoinFunction runs its launchers: directly (eager) or through the torch.library ops
    (while torch traces); each takes join_forward's or join_backward's arguments."""

    forward: Callable
    backward: Callable


def _library_forward(inputs: list[torch.Tensor], mask=None, rows=None) -> torch.Tensor:
    return masked_join_op(inputs, mask) if rows is None else gather_join_op(inputs, rows)


def _library_backward(grad: torch.Tensor, sizes: list[int], mask=None, rows=None) -> list[torch.Tensor]:
    if rows is None:
        return masked_join_backward_op(grad, mask, len(sizes))
    return gather_join_backward_op(grad, rows, sizes)


#: The launchers themselves (eager mode on plain tensors), and the torch.library ops.
DIRECT = JoinPath(join_forward, join_backward)
LIBRARY = JoinPath(_library_forward, _library_backward)


class JoinFunction(torch.autograd.Function):
    """The autograd of both joins (``mask`` or gather table ``rows``), eager or traced (``path``)."""

    @staticmethod
    def forward(ctx, path: JoinPath, mask, rows, *inputs):
        ctx.path, ctx.sizes = path, [x.shape[0] for x in inputs]
        ctx.save_for_backward(mask, rows)
        return path.forward(list(inputs), mask, rows)

    @staticmethod
    def backward(ctx, grad):
        mask, rows = ctx.saved_tensors
        return (None, None, None, *ctx.path.backward(grad, ctx.sizes, mask, rows))


_eager_join = eager_apply(JoinFunction)


def _join(inputs: list[torch.Tensor], mask, rows) -> torch.Tensor:
    if runs_eagerly(inputs[0]):
        return _eager_join(DIRECT, mask, rows, *inputs)
    return JoinFunction.apply(LIBRARY, mask, rows, *inputs)


def masked_join(inputs: list[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The masked join, launched directly in eager mode, through its torch.library op while torch traces."""
    return _join(inputs, mask, None)


def gather_join(inputs: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The gather join, launched directly in eager mode, through its torch.library op while torch traces."""
    return _join(inputs, None, rows)
