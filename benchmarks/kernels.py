"""Kernel benchmarks: each op against the eager reference and torch.compile of it.

On a GPU: median time (20th/80th percentiles) with the L2 cache flushed, the minimal bytes the op
must move, achieved GB/s, that as a fraction of a device-to-device copy of the same bytes measured
in the same run, and speedups. On any machine: bytes saved for backward and kernel launches,
measured exactly on fake tensors, and CPU wall times of the eager reference (labelled CPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from fractal_kernels.audit import SM_COUNT
from fractal_kernels.channel_tiling import tile_for_gpu
from fractal_kernels.testing import count_kernels, fake_mode, saved_bytes

from .cases import DIRECTIONS, IMPLEMENTATIONS, OpCase, OpInputs
from .measure import copy_gbps, cpu_time_ms, gpu_time_ms


def timed_function(case: OpCase, implementation: str, inputs: OpInputs, direction: str) -> Callable[[], object]:
    """What one measurement runs: the forward, the backward of a recorded forward, or both."""
    forward = case.function(implementation, inputs)
    if direction == "forward":
        return forward
    if direction == "backward":
        out = forward()
        return lambda: torch.autograd.grad(out, inputs.leaves, inputs.grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs.leaves, inputs.grad)


def case_fields(case: OpCase) -> dict:
    return dict(
        label=case.label, op=case.op, k=case.k, network=case.network, shape=list(case.shape),
        dtype=str(case.dtype)[6:], layout="nhwc" if case.channels_last else "nchw",
    )


def gpu_row(case: OpCase, device: torch.device) -> dict:
    """All implementations and directions of one case, timed side by side on the GPU."""
    mask = case.drop_path_mask()
    inputs = case.make(device, None if mask is None else mask.to(device))
    row = case_fields(case)
    for direction in DIRECTIONS:
        nbytes = case.minimal_bytes(direction, mask)
        entry = {"bytes": nbytes, "copy_gbps": copy_gbps(nbytes, device)}
        for implementation in IMPLEMENTATIONS:
            try:
                median, low, high = gpu_time_ms(timed_function(case, implementation, inputs, direction))
                entry[implementation] = {"ms": median, "p20_ms": low, "p80_ms": high, "gbps": nbytes / median / 1e6}
            except Exception as error:  # an implementation that fails is reported, not fatal
                entry[implementation] = {"error": f"{type(error).__name__}: {error}"[:300]}
        fused = entry["fused"].get("ms")
        if fused:
            entry["fraction_of_copy"] = entry["fused"]["gbps"] / entry["copy_gbps"]
            for baseline in ("eager", "compile"):
                if "ms" in entry[baseline]:
                    entry[f"speedup_vs_{baseline}"] = entry[baseline]["ms"] / fused
        row[direction] = entry
    return row


def cpu_row(case: OpCase, time_reference: bool) -> dict:
    """What a CPU measures honestly: saved bytes and launches (fake tensors), minimal bytes, and
    optionally the CPU wall time of the eager reference's forward+backward. Tiled as an H100
    tiles: whether a BatchNorm is single-pass (2 launches a training step) or split (5) follows."""
    with tile_for_gpu(SM_COUNT[90]):
        return _cpu_row(case, time_reference)


def _cpu_row(case: OpCase, time_reference: bool) -> dict:
    mask = case.drop_path_mask()
    row = case_fields(case)
    row["minimal_bytes"] = {direction: case.minimal_bytes(direction, mask) for direction in DIRECTIONS}
    for implementation in ("eager", "fused"):
        mode = fake_mode()
        with mode:
            inputs = case.make(torch.device("cpu"), None if mask is None else mode.from_tensor(mask))
            forward = case.function(implementation, inputs)
            outputs = []
            saved = saved_bytes(lambda: outputs.append(forward()), exclude=inputs.weights + inputs.biases)
            launches_forward = count_kernels(forward)
            launches_backward = count_kernels(lambda: torch.autograd.grad(outputs[0], inputs.leaves, inputs.grad))
        row[implementation] = {
            "saved_bytes": saved,
            "launches_forward": launches_forward,
            "launches_backward": launches_backward,
        }
    row["saved_ratio_fused_to_eager"] = row["fused"]["saved_bytes"] / row["eager"]["saved_bytes"]
    if time_reference:
        inputs = case.make(torch.device("cpu"), mask)
        median, low, high = cpu_time_ms(timed_function(case, "eager", inputs, "forward+backward"), repeat=3)
        row["eager"]["cpu_forward_backward_ms"] = {"ms": median, "p20_ms": low, "p80_ms": high}
    return row
