"""Measurements: saved-for-backward bytes, kernel launches, GPU timings and the copy roofline.

Memory and launch counts are exact on any machine: they run the code on fake tensors (shapes,
dtypes and layouts, no data), where the fused ops run their launchers without launching and
autograd records what it would save. Timings need a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fractal_kernels as fk

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
    with fk.count_launches() as triton_launches, counter:
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


def gpu_time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn`` with the L2 cache flushed between
    runs (triton.testing.do_bench)."""
    import triton.testing

    median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return median, low, high


def copy_gbps(nbytes: int, device: torch.device) -> float:
    """Achieved GB/s of a device-to-device copy moving ``nbytes`` (half read, half written)."""
    half = max(nbytes // 2, 1)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median, _, _ = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * half / (median * 1e-3) / 1e9


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds, after the block, the peak allocated bytes above the starting
    allocation (``extra``) and the absolute peak (``peak``)."""
    result: dict[str, int] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result["peak"] = torch.cuda.max_memory_allocated(device)
    result["extra"] = result["peak"] - start


def cpu_time_ms(fn: Callable[[], object], repeat: int = 5) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) CPU wall milliseconds over ``repeat`` runs after one warm-up."""
    import time

    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()

    def quantile(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return quantile(0.5), quantile(0.2), quantile(0.8)


def device_name(device: Optional[torch.device]) -> str:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
