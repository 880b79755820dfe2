"""Drop-path-aware masked join: the per-sample mean of the inputs that survive.

out[b] = sum_i m[i, b] x_i[b] / sum_i m[i, b], with 0 (and a 0 gradient) for a sample that has no
survivor. The eager join stacks k inputs, selects, sums and divides: about 6k+2 tensor-sizes of
traffic. Here the forward reads each surviving input once and writes once (k+1 at most), the
backward reads the gradient once and writes the k input gradients, and only the mask is saved.

Both layouts need no copy: a contiguous or channels-last tensor keeps each sample's elements in
one dense run, so the kernels see [batch, sample_numel] whatever the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import audit_cases, define_op, dense, dense_inputs, groups, join_keep, join_scale, launch, mask_args, pad, pick


@triton.jit
def masked_join_fwd_kernel(
    out_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    mask_ptr, mask_stride_k, mask_stride_n,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Joins inputs first_input .. first_input+K-1 of a k-input join into out.

    Pointers: ``out_ptr`` and ``x0``..``x7`` (the first K used) share one layout with
    ``sample_numel`` elements per sample; ``mask_ptr`` is the [num_inputs, batch] mask with strides
    ``mask_stride_k``, ``mask_stride_n``, read when HAS_MASK (otherwise the plain mean).
    Program p covers block p % blocks_per_sample of sample p // blocks_per_sample.
    ACCUMULATE adds to out (the groups after the first when k > 8). A dropped input is never
    loaded, so its NaN or Inf cannot reach the output.
    """
    ACC: tl.constexpr = tl.float64 if out_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    in_sample = offs < sample_numel
    base = n.to(tl.int64) * sample_numel
    scale = join_scale(mask_ptr, mask_stride_k, mask_stride_n, n, True, num_inputs, HAS_MASK, ACC)
    acc = tl.zeros([BLOCK], ACC)
    for i in tl.static_range(K):
        keep = join_keep(mask_ptr, mask_stride_k, mask_stride_n, first_input + i, n, True, HAS_MASK)
        x_ptr = pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
        acc += tl.load(x_ptr + base + offs, mask=in_sample & keep, other=0.0).to(ACC)
    out = acc * scale
    if ACCUMULATE:
        out += tl.load(out_ptr + base + offs, mask=in_sample, other=0.0).to(ACC)
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=in_sample)


@triton.jit
def masked_join_bwd_kernel(
    grad_ptr,
    g0, g1, g2, g3, g4, g5, g6, g7,
    mask_ptr, mask_stride_k, mask_stride_n,
    first_input, num_inputs, sample_numel, blocks_per_sample,
    K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes the gradients of inputs first_input .. first_input+K-1: grad * keep / count.

    Pointers: ``grad_ptr`` (the output gradient) and ``g0``..``g7`` (input gradients, first K
    written) share one layout; the mask and the grid are as in masked_join_fwd_kernel. Dropped
    inputs and samples without a survivor get exact zeros, whatever the output gradient holds.
    """
    ACC: tl.constexpr = tl.float64 if grad_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    offs = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
    in_sample = offs < sample_numel
    base = n.to(tl.int64) * sample_numel
    scale = join_scale(mask_ptr, mask_stride_k, mask_stride_n, n, True, num_inputs, HAS_MASK, ACC)
    grad = tl.load(grad_ptr + base + offs, mask=in_sample, other=0.0).to(ACC) * scale
    for i in tl.static_range(K):
        keep = join_keep(mask_ptr, mask_stride_k, mask_stride_n, first_input + i, n, True, HAS_MASK)
        g_ptr = pick(i, g0, g1, g2, g3, g4, g5, g6, g7)
        tl.store(g_ptr + base + offs, tl.where(keep, grad, 0.0).to(g_ptr.dtype.element_ty), mask=in_sample)


def _launch_geometry(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample_numel, BLOCK, blocks_per_sample) for a dense [batch, ...] tensor."""
    sample_numel = x.numel() // x.shape[0]
    block = max(16, min(2048, triton.next_power_of_2(sample_numel)))
    return sample_numel, block, triton.cdiv(sample_numel, block)


@define_op("fractal_kernels::masked_join")
def masked_join_forward(inputs: list[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Launcher of the join: one launch for up to 8 inputs (more: one per group of 8)."""
    xs = dense_inputs(inputs)
    out = torch.empty_like(xs[0])
    if out.numel() == 0:
        return out
    sample_numel, block, blocks = _launch_geometry(out)
    for g, group in enumerate(groups(len(xs))):
        launch(
            masked_join_fwd_kernel, (out.shape[0] * blocks,),
            out, *pad([xs[i] for i in group]), *mask_args(mask, out),
            group.start, len(xs), sample_numel, blocks,
            K=len(group), HAS_MASK=mask is not None, ACCUMULATE=g > 0, BLOCK=block, num_warps=4,
        )
    return out


@define_op("fractal_kernels::masked_join_backward")
def masked_join_backward(grad: torch.Tensor, mask: Optional[torch.Tensor], num_inputs: int) -> list[torch.Tensor]:
    """Launcher of the join's backward: every input gradient from one read of ``grad``."""
    grad = dense(grad)
    grads = [torch.empty_like(grad) for _ in range(num_inputs)]
    if grad.numel() == 0:
        return grads
    sample_numel, block, blocks = _launch_geometry(grad)
    for group in groups(num_inputs):
        launch(
            masked_join_bwd_kernel, (grad.shape[0] * blocks,),
            grad, *pad([grads[i] for i in group]), *mask_args(mask, grad),
            group.start, num_inputs, sample_numel, blocks,
            K=len(group), HAS_MASK=mask is not None, BLOCK=block, num_warps=4,
        )
    return grads


def _setup_context(ctx, inputs, output):
    tensors, mask = inputs
    ctx.num_inputs = len(tensors)
    ctx.save_for_backward(mask)


def _backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return masked_join_backward(grad, mask, ctx.num_inputs), None


masked_join_forward.register_autograd(_backward, setup_context=_setup_context)


@audit_cases
def _audit_cases(quick: bool):
    dtypes = (torch.float32, torch.bfloat16) if quick else (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for dtype in dtypes:
        for shape in ((8, 64, 32, 32), (3, 7, 5, 9)):
            for k in (2, 3, 9):
                for masked in (False, True):
                    xs = [torch.empty(shape, dtype=dtype) for _ in range(k)]
                    mask = torch.ones(k, shape[0], dtype=torch.bool) if masked else None
                    label = f"{str(dtype)[6:]} {'x'.join(map(str, shape))} k={k}"
                    yield label, lambda xs=xs, mask=mask: (
                        masked_join_forward(xs, mask),
                        masked_join_backward(xs[0], mask, len(xs)),
                    )
