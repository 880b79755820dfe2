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

Both are one pair of passes over a Join (join_modes.py): ``join_forward`` and ``join_backward``,
each a launcher and its torch.library op (kernel_op.KernelOp), with their kernels
``join_forward_kernel`` and ``join_backward_kernel``; JoinFunction is their autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .join_modes import JOIN_GATHER, Join, join_row, join_scale
from .kernel_op import eager_apply, kernel_op, runs_eagerly
from .launch import STREAMING_REGISTERS, Kernel, cdiv, input_groups, next_power_of_2, slots, wrap_triton
from .tensors import accumulation_type, dense, dense_inputs, like_rows


# Neither first_input nor sample_ptr is specialised: a gather backward writes one input a launch,
# and its index (0, 1 or another) and the alignment of its row of the samples table would
# otherwise compile up to six variants of each kernel.
@Kernel
@triton.jit(do_not_specialize=("first_input",))
def join_forward_kernel(
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


@Kernel
@triton.jit(do_not_specialize=("first_input", "sample_ptr"))
def join_backward_kernel(
    grad_ptr,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7,
    join_ptr, join_stride_k, join_stride_n, sample_ptr,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, JOIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes the gradients of inputs first_input .. first_input+K-1: grad * keep / count.

    Pointers: ``grad_ptr`` (the output gradient, [batch] rows) and ``dx0``..``dx7`` (input
    gradients, the first K given, the others None) share one layout; the join is as in
    join_forward_kernel. With a mask (or none), program p covers block p % blocks_per_sample
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


@kernel_op("fractal_kernels::join_forward")
def join_forward(inputs: list[torch.Tensor], join: Join) -> torch.Tensor:
    """The join's output: one launch per group of eight inputs, accumulating after the first.
    With a gather table the output has one row per sample of it."""
    xs = dense_inputs(inputs)
    out = join.output(xs[0])
    if out.numel() == 0:
        return out
    sample_numel, block, blocks = _launch_geometry(out)
    for g, group in enumerate(input_groups(len(xs))):
        wrap_triton(join_forward_kernel)[(out.shape[0] * blocks,)](
            out, *slots(xs, group), *join.args(), group.start, len(xs), sample_numel, blocks,
            K=len(group), JOIN=join.mode, ACCUMULATE=g > 0, BLOCK=block, num_warps=4, maxnreg=STREAMING_REGISTERS,
        )
    return out


@kernel_op("fractal_kernels::join_backward")
def join_backward(grad: torch.Tensor, join: Join) -> list[torch.Tensor]:
    """Every input gradient, in the gradient's layout: from one read of ``grad`` per group of
    eight inputs; with a gather table compact, as many rows as the input (a row that holds no
    sample gets 0), one launch per input over its own rows."""
    grad = dense(grad)
    grads = [like_rows(grad, size) if join.gathered else torch.empty_like(grad) for size in join.sizes]
    if grad.numel() == 0:
        return grads
    sample_numel, block, blocks = _launch_geometry(grad)
    if join.gathered:
        samples = join.row_samples()
        launches = [(range(i, i + 1), size, samples[i]) for i, size in enumerate(join.sizes) if size]
    else:
        launches = [(group, grad.shape[0], None) for group in input_groups(len(grads))]
    for group, rows_covered, samples in launches:
        wrap_triton(join_backward_kernel)[(rows_covered * blocks,)](
            grad, *slots(grads, group), *join.args(), samples, group.start, len(grads), sample_numel, blocks,
            K=len(group), JOIN=join.mode, BLOCK=block, num_warps=4, maxnreg=STREAMING_REGISTERS,
        )
    return grads


class JoinFunction(torch.autograd.Function):
    """The autograd of the joins (by mean, mask or gather table), eager or ``traced``."""

    @staticmethod
    def forward(ctx, traced: bool, join: Join, *inputs):
        ctx.traced, ctx.join_mode, ctx.join_sizes = traced, join.mode, join.sizes  # and the table, saved
        ctx.save_for_backward(join.table)
        return join_forward.on(traced)(list(inputs), join)

    @staticmethod
    def backward(ctx, grad):
        table, = ctx.saved_tensors
        return (None, None, *join_backward.on(ctx.traced)(grad, Join(ctx.join_mode, table, ctx.join_sizes)))


_eager_join = eager_apply(JoinFunction)


def joined(inputs: list[torch.Tensor], join: Join) -> torch.Tensor:
    """The ``join`` of the inputs, launched directly in eager mode, through its torch.library ops while torch traces."""
    if runs_eagerly(inputs[0]):
        return _eager_join(False, join, *inputs)
    return JoinFunction.apply(True, join, *inputs)
