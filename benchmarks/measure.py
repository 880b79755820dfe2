"""Timings: GPU timings against the copy roofline, CPU wall times, peak memory. The exact counts
(saved bytes, launches) are fractal_kernels.testing's."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

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
