"""The compile audit's cases: thunks that run each op file's launchers once, on meta tensors of
a given kind (recorded launches need shapes and alignment only). The compile audit
(fractal_kernels.audit) compiles what they launch; the GPU-path tests check each launch."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .batchnorm import batch_norm_join
from .join import join_backward, join_forward
from .join_modes import Join
from .tensors import acc_dtype


def _meta_inputs(shapes, dtype: torch.dtype, channels_last: bool) -> list[torch.Tensor]:
    """Meta tensors of ``shapes``, contiguous or channels-last."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.empty(shape, dtype=dtype, device="meta").to(memory_format=layout) for shape in shapes]


def join_cases(shape: tuple, dtype: torch.dtype, channels_last: bool, quick: bool):
    """The joins of k = 2, 3 and 9 inputs (two launches; 3 only when ``quick``), by mean, mask
    and gather table."""
    for k in (3,) if quick else (2, 3, 9):
        xs = _meta_inputs([shape] * k, dtype, channels_last)
        mask = torch.ones(k, shape[0], dtype=torch.bool, device="meta")
        rows = torch.zeros(k, shape[0], dtype=torch.int64, device="meta")
        for name, join in (("mean", Join.of(xs)), ("mask", Join.of(xs, mask)), ("gather", Join.of(xs, rows=rows))):
            yield f"join k={k} {name}", lambda xs=xs, join=join: (
                join_forward.eager(xs, join),
                join_backward.eager(xs[0], join),
            )


def _batch_norm_forward_backward(xs, mask, affine: bool, training: bool, relu: bool, rows=None) -> None:
    """Runs batch_norm_join forward and backward once (the audit's cases): the launches an
    eager training step makes, split or single-pass as the tiling has it."""
    C, k = xs[0].shape[1], len(xs)
    xs = [x.requires_grad_() for x in xs]
    params = [xs[0].new_empty(C, dtype=acc_dtype(xs[0].dtype), requires_grad=True) if affine else None
              for _ in range(k)]
    statistic = acc_dtype(xs[0].dtype)
    running_means, running_vars = ([xs[0].new_empty(C, dtype=statistic) for _ in range(k)] for _ in range(2))
    out = batch_norm_join(xs, Join.of(xs, mask, rows), params, params, running_means, running_vars, training=training,
                          momentum=0.1, eps=1e-5, relu=relu)
    out.backward(torch.empty_like(out))


def batch_norm_cases(shape: tuple, dtype: torch.dtype, channels_last: bool, quick: bool):
    """bn_relu in training and eval, joins of 3 inputs by mask and by gather table (compact
    inputs of all, 1/2 and 1/4 of the samples), and unless ``quick`` for fp32 the bare batch norm
    and a join of 9."""

    def inputs(k):
        return _meta_inputs([shape] * k, dtype, channels_last)

    mask = torch.ones(3, shape[0], dtype=torch.bool, device="meta")
    compact = _meta_inputs([(n,) + shape[1:] for n in (shape[0], shape[0] // 2, shape[0] // 4)], dtype, channels_last)
    rows = torch.zeros(3, shape[0], dtype=torch.int64, device="meta")
    yield "bn_relu train", lambda: _batch_norm_forward_backward(inputs(1), None, True, True, True)
    yield "bn_relu eval", lambda: _batch_norm_forward_backward(inputs(1), None, True, False, True)
    yield "join k=3", lambda: _batch_norm_forward_backward(inputs(3), mask, True, True, True)
    yield "gather k=3", lambda: _batch_norm_forward_backward(compact, None, True, True, True, rows=rows)
    if dtype == torch.float32 and not quick:
        yield "batch_norm", lambda: _batch_norm_forward_backward(inputs(1), None, False, True, False)
        yield "join k=9", lambda: _batch_norm_forward_backward(inputs(9), None, True, True, True)


#: Functions ``cases(shape, dtype, channels_last, quick) -> iterable of (label, thunk)`` whose
#: thunks run op launchers on inputs of that kind (fewer variants when ``quick``).
AUDIT_CASES: tuple[Callable[..., Iterable[tuple[str, Callable[[], object]]]], ...] = (batch_norm_cases, join_cases)
