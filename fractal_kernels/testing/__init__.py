"""What the tests and benchmarks measure with: exact counts on fake tensors, and the fake GPU.

Memory and launch counts are exact on any machine: they run the code on fake tensors (shapes,
dtypes and layouts, no data), where the fused ops run their launchers without launching and
autograd records what it would save.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..launch import count_launches

#: ATen ops that allocate, reshape or alias: no kernel launch.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_local_scalar_dense", "set_", "resize_",
}


class _AtenCounter(TorchDispatchMode):
    """Counts ATen ops that launch at least one kernel (views and allocations do not)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "aten" and not func.is_view and name not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode for shape-only runs (parameters and inputs created inside it are fake)."""
    return FakeTensorMode(allow_non_fake_inputs=False)


def count_kernels(fn: Callable[[], object]) -> dict[str, int]:
    """Triton launches of the fused ops and ATen kernel-launching ops made by ``fn``."""
    counter = _AtenCounter()
    with count_launches() as triton_launches, counter:
        fn()
    return {"triton": triton_launches[0], "aten": counter.count}


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs, leaving out
    those sharing storage with ``exclude`` (parameters)."""
    excluded = {_storage_key(t) for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in excluded:
            seen[key + (t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _storage_key(t: torch.Tensor) -> tuple:
    # The storage implementation's address: fake tensors have no data pointer.
    return (t.untyped_storage()._cdata,)
