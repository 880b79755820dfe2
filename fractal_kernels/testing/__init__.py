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

#: (atol, rtol) of an op's output against the fp64 reference, by storage dtype: what the tests
#: and the GPU check compare with.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

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


class HostReadError(RuntimeError):
    """A device value read on the host inside a block that must not synchronise."""


#: ATen ops that read a device value on the host, or whose output size depends on data (so the
#: host must wait for it): each is a device-to-host synchronisation on a GPU.
_HOST_READS = {
    "_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "equal", "allclose",
}


def _on_device(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class HostReads(TorchDispatchMode):
    """Records (or, with ``strict``, raises HostReadError on) every op that makes the host wait
    for device data: ``.item()``, ``bool(tensor)``, data-dependent output sizes (``nonzero``,
    boolean indexing), copies to the CPU. CPU tensors are host data. ``reads`` lists them."""

    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict
        self.reads: list[str] = []

    def _found(self, what: str) -> None:
        if self.strict:
            raise HostReadError(f"{what} (a synchronisation)")
        self.reads.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if func.namespace == "aten":
            if name in _HOST_READS and _on_device(args[0]):
                if name != "repeat_interleave" or kwargs.get("output_size") is None:
                    self._found(f"aten.{func.__name__} reads device data on the host")
            if name == "index" and any(_on_device(i) and i.dtype == torch.bool for i in args[1] or ()):
                self._found("boolean indexing sizes its output from device data")
            if name in ("_to_copy", "copy_"):
                source, target = (args[1], args[0].device) if name == "copy_" else (args[0], kwargs.get("device"))
                if _on_device(source) and target is not None and torch.device(target).type == "cpu":
                    self._found(f"aten.{func.__name__} copies device data to the host")
        return func(*args, **kwargs)


def no_host_reads() -> HostReads:
    """A block that raises HostReadError on any op that makes the host wait for device data
    (see HostReads). Without a GPU, run the block on ``meta`` tensors: they hold no data, so any
    read of them fails too, and the block proves that it reads nothing back."""
    return HostReads(strict=True)
