"""Memory traffic, counted: the bytes each kernel launch loads and stores, and the bytes an eager
composition of ATen ops moves.

Kernels: while the interpreter runs them (TRITON_INTERPRET=1, or the fake GPU), every masked-on
element a launch loads or stores is recorded; a launch's traffic is its distinct addresses, i.e.
DRAM traffic with ideal caching (a value read twice by one launch is served from cache once).

Eager ops: each ATen op that launches a kernel (not a view or an allocation) moves its tensor
inputs and outputs once. cuDNN's BatchNorm reads its input twice, so this under-counts it.

Both rely on internals (the interpreter's builder and grid executor; ATen op names); a Triton
without them fails here, loudly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from triton.runtime.interpreter import GridExecutor, interpreter_builder
except ImportError as error:  # pragma: no cover - depends on the Triton version
    raise ImportError(f"counting kernel traffic needs Triton's interpreter internals: {error}")

from . import _NO_KERNEL
from ..batchnorm import single_pass
from ..channel_tiling import channel_tiling
from .ops import OPS


@dataclass
class Traffic:
    """Bytes loaded and stored by the kernel launches of a block (distinct addresses per launch)."""

    launches: int = 0
    loaded: int = 0
    stored: int = 0
    _loads: dict = field(default_factory=dict, repr=False)
    _stores: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    def _record(self, accesses: dict, ptrs, mask) -> None:
        addresses = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        accesses.setdefault(size, []).append(np.asarray(addresses, dtype=np.uint64).ravel())

    def _close_launch(self) -> None:
        self.launches += 1
        for accesses, total in ((self._loads, "loaded"), (self._stores, "stored")):
            for size, arrays in accesses.items():
                setattr(self, total, getattr(self, total) + size * np.unique(np.concatenate(arrays)).size)
            accesses.clear()


_counting: list[Traffic] = []


def _masked_load(original):
    def load(ptrs, mask, other, *args):
        _counting[-1]._record(_counting[-1]._loads, ptrs, mask)
        return original(ptrs, mask, other, *args)

    return load


def _masked_store(original):
    def store(ptrs, value, mask, *args):
        _counting[-1]._record(_counting[-1]._stores, ptrs, mask)
        return original(ptrs, value, mask, *args)

    return store


def _grid_call(original):
    def call(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _counting[-1]._close_launch()
        return result

    return call


@contextlib.contextmanager
def _interpreter_counting() -> Iterator[None]:
    """The interpreter's masked loads and stores and its grid call, wrapped to count, within the
    block only (the outermost count installs them and puts the originals back)."""
    originals = (interpreter_builder.create_masked_load, interpreter_builder.create_masked_store,
                 GridExecutor.__call__)
    interpreter_builder.create_masked_load = _masked_load(originals[0])
    interpreter_builder.create_masked_store = _masked_store(originals[1])
    GridExecutor.__call__ = _grid_call(originals[2])
    try:
        yield
    finally:
        interpreter_builder.create_masked_load, interpreter_builder.create_masked_store = originals[:2]
        GridExecutor.__call__ = originals[2]


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Counts the traffic of the interpreted kernel launches made within the block:
    ``with count_traffic() as t: ...; t.loaded, t.stored``. Triton's interpreter is patched to
    count only while a count is open."""
    traffic = Traffic()
    with _interpreter_counting() if not _counting else contextlib.nullcontext():
        _counting.append(traffic)
        try:
            yield traffic
        finally:
            _counting.pop()


class _AtenTraffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and not func.is_view and name not in _NO_KERNEL:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def eager_traffic(fn: Callable[[], object]) -> int:
    """Bytes the ATen ops run by ``fn`` move: each kernel-launching op's tensor inputs and outputs
    (fake tensors do: the count needs only shapes)."""
    counter = _AtenTraffic()
    with counter:
        fn()
    return counter.bytes


def minimal_bytes(op: str, inputs: list[torch.Tensor], mask=None, rows=None, training: bool = True) -> dict[str, int]:
    """The bytes the fused design must move for ``op`` ("masked_join", "gather_join", "bn_relu",
    "join_bn_relu", "gather_join_bn_relu") on these inputs, by direction; per-channel vectors,
    masks and tables are not counted.

    Joins read the surviving rows of each input once and write the output; backward reads the
    gradient once and writes every input gradient. The BatchNorm ops are two-pass: training
    reads every input for the statistics and the surviving rows again to apply, then writes
    once; backward reads the gradient and the surviving rows for the sums, then the gradient and
    every input (every row has a gradient through the statistics; only surviving rows in eval)
    again and writes every input gradient. Gathered inputs read the gradient rows they hold.
    Where the inputs' tiling is single-pass (batchnorm.single_pass, at the default momentum),
    both passes are one launch, whose second read of a value is its first's (cached).
    """
    sizes = [x.numel() * x.element_size() for x in inputs]
    row_bytes = [size // max(x.shape[0], 1) for size, x in zip(sizes, inputs)]
    if rows is not None:
        output = rows.shape[1] * row_bytes[0]
        kept = sum(int((rows[i] >= 0).sum()) * row_bytes[i] for i in range(len(inputs)))
    else:
        output = sizes[0]
        kept = sum(sizes) if mask is None else sum(int((mask[i] != 0).sum()) * row_bytes[i] for i in range(len(inputs)))
    gradient_reads = sum(sizes) if rows is not None else output
    if not OPS[op].batch_norm:
        forward, backward = kept + output, gradient_reads + sum(sizes)
    elif rows is None and single_pass(channel_tiling(inputs[0], len(inputs)), len(inputs)):
        read = sum(sizes) if training else kept
        forward, backward = read + output, (output + read) + sum(sizes)
    elif training:
        forward = sum(sizes) + kept + output
        backward = (output + kept) + (gradient_reads + sum(sizes)) + sum(sizes)
    else:
        forward, backward = kept + output, (output + kept) + (gradient_reads + kept) + sum(sizes)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}
