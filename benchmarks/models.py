"""Whole-model benchmarks: one training step (forward, backward, SGD step) and anytime inference.

On a GPU: images/s and peak memory of the eager model (fused=False), torch.compile of it, the
fused model, the fused model compiled, and the fused model with activation recomputation, in fp32
and bf16 autocast, NCHW and channels-last; and the latency of each anytime truncation. On any
machine: the activation bytes saved for backward in one step (parameters excluded) and the kernel
launches of one step, exact on fake tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fractal_kernels as fk
from fractal_kernels.audit import SM_COUNT
from fractal_kernels.channel_tiling import tile_for_gpu
from fractal_kernels.testing import HostReads, count_kernels, fake_mode, saved_bytes
from fractalnet import create_model

from .measure import cpu_time_ms, device_name, gpu_time_ms, peak_memory

#: network -> (batch, image size, classes); the first and last are the benchmarked ones.
NETWORKS = {"fractalnet20_cifar": (100, 32, 10), "fractalnet40_cifar": (100, 32, 10),
            "fractalnet34_imagenet": (32, 224, 1000)}
BENCHMARKED = ("fractalnet20_cifar", "fractalnet34_imagenet")
#: implementation -> (fused, compiled, recompute, skip_dropped)
IMPLEMENTATIONS = {
    "eager": (False, False, False, False),
    "compile": (False, True, False, False),
    "fused": (True, False, False, False),
    "fused+compile": (True, True, False, False),
    "fused+recompute": (True, False, True, False),
    "fused+skip": (True, False, False, True),
}


#: Drop-path drawn per sample in every measured step: every column runs every step, so each step
#: does the same work whatever the draw (drawn per batch, the model's default, a global batch
#: runs one column).
DROP_PATH_PER = "sample"


@dataclass(frozen=True)
class ModelCase:
    network: str
    implementation: str
    dtype: torch.dtype
    channels_last: bool

    @property
    def label(self) -> str:
        layout = "nhwc" if self.channels_last else "nchw"
        return f"{self.network} {self.implementation} {str(self.dtype)[6:]} {layout}"

    def build(self, device: torch.device, batch: int | None = None):
        """(model, its forward, optimizer, inputs, labels) on ``device``."""
        fused, compiled, recompute, skip = IMPLEMENTATIONS[self.implementation]
        default_batch, size, classes = NETWORKS[self.network]
        batch = batch or default_batch
        torch.manual_seed(0)
        model = create_model(self.network, classes, fused=fused, recompute=recompute, skip_dropped=skip,
                             drop_path_per=DROP_PATH_PER)
        if device.type != "cpu":  # (models built on fake CPU tensors cannot be moved)
            model = model.to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        if self.channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        forward = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        labels = torch.randint(classes, (batch,), device=device)
        return model, forward, optimizer, x, labels

    def autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def training_step(case: ModelCase, forward, optimizer, x, labels, device):
    def step():
        with case.autocast(device):
            loss = F.cross_entropy(forward(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def gpu_training_row(case: ModelCase, device: torch.device) -> dict:
    row = dict(label=case.label, network=case.network, implementation=case.implementation,
               dtype=str(case.dtype)[6:], layout="nhwc" if case.channels_last else "nchw")
    try:
        model, forward, optimizer, x, labels = case.build(device)
        step = training_step(case, forward, optimizer, x, labels, device)
        for _ in range(3):  # warm-up: compilation, autotuning, allocator
            step()
        median, low, high = gpu_time_ms(step)
        with peak_memory(device) as memory:
            step()
        row.update(step_ms=median, p20_ms=low, p80_ms=high, images_per_s=x.shape[0] / (median * 1e-3),
                   peak_bytes=memory["peak"], step_extra_bytes=memory["extra"])
    except Exception as error:  # reported, not fatal
        row["error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def gpu_anytime_rows(network: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Inference latency of each truncation columns=k and each single column, eager and fused."""
    rows = []
    for implementation in ("eager", "fused"):
        case = ModelCase(network, implementation, dtype, channels_last=dtype != torch.float32)
        model, _, _, x, _ = case.build(device)
        model.eval()
        for mode in ("columns", "column"):
            for k in range(1, model.num_columns + 1):
                def infer():
                    with torch.no_grad(), case.autocast(device):
                        model(x, **{mode: k})

                median, low, high = gpu_time_ms(infer)
                rows.append(dict(network=network, implementation=implementation, dtype=str(dtype)[6:],
                                 mode=mode, k=k, ms=median, p20_ms=low, p80_ms=high))
    return rows


def step_measurements(network: str, batch: int) -> dict:
    """Activation bytes saved in one training step (parameters excluded), kernel launches of its
    forward and backward, and the device-to-host reads of a whole step (forward, backward, SGD),
    for the eager model and the fused one (plain, recomputing, skipping dropped paths), on fake
    fp32 NCHW tensors (the reads on meta tensors) with the Triton backend."""
    result = {}
    for implementation in ("eager", "fused", "fused+recompute", "fused+skip"):
        case = ModelCase(network, implementation, torch.float32, channels_last=False)
        result[implementation] = dict(host_reads=host_reads(case, batch))
        if implementation == "fused+skip":
            continue  # its sizes come from its (host) masks: fake tensors cannot follow them
        # Tiled as an H100 tiles (single-pass or split BatchNorms), on fake tensors.
        with fake_mode(), fk.use_backend("triton" if implementation != "eager" else "reference"), \
                tile_for_gpu(SM_COUNT[90]):
            model, _, _, x, labels = case.build(torch.device("cpu"), batch)
            losses = []
            saved = saved_bytes(
                lambda: losses.append(F.cross_entropy(model(x), labels)), exclude=list(model.parameters())
            )
            forward = count_kernels(lambda: losses.append(F.cross_entropy(model(x), labels)))
            backward = count_kernels(lambda: losses[-1].backward())
        result[implementation].update(saved_activation_bytes=saved, launches_forward=forward,
                                      launches_backward=backward)
    for implementation in ("fused", "fused+recompute"):
        m = result[implementation]
        m["saved_ratio_to_eager"] = m["saved_activation_bytes"] / result["eager"]["saved_activation_bytes"]
        launches = sum(m[d]["triton"] + m[d]["aten"] for d in ("launches_forward", "launches_backward"))
        eager = sum(result["eager"][d]["aten"] for d in ("launches_forward", "launches_backward"))
        m["launch_ratio_to_eager"] = launches / eager
    return result


def host_reads(case: "ModelCase", batch: int) -> list[str]:
    """The device-to-host reads of one training step, run on meta tensors (no data)."""
    with fk.use_backend("triton" if case.implementation != "eager" else "reference"):
        model, _, optimizer, x, labels = case.build(torch.device("meta"), batch)
        with HostReads(strict=False) as reads:
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
    return reads.reads


def cpu_eager_step_ms(network: str, batch: int) -> dict:
    """CPU wall time of one eager training step (the reference path; a CPU number, not a GPU one)."""
    case = ModelCase(network, "eager", torch.float32, channels_last=False)
    _, forward, optimizer, x, labels = case.build(torch.device("cpu"), batch)
    median, low, high = cpu_time_ms(training_step(case, forward, optimizer, x, labels, torch.device("cpu")), repeat=3)
    return dict(network=network, batch=batch, ms=median, p20_ms=low, p80_ms=high)


def skip_measurements(network: str, batch: int, steps: int, device: torch.device) -> dict:
    """Dense fused model against skip_dropped, one after the other on the same seed: samples the
    convolutions process per step (forward hooks) and the median training-step wall time."""
    import time

    result = dict(network=network, batch=batch, steps=steps, device=device_name(device))
    for implementation in ("fused", "fused+skip"):
        case = ModelCase(network, implementation, torch.float32, channels_last=False)
        model, forward, optimizer, x, labels = case.build(device, batch)
        samples = [0]
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(
                    lambda m, inputs, out: samples.__setitem__(0, samples[0] + inputs[0].shape[0]))
        step = training_step(case, forward, optimizer, x, labels, device)
        torch.manual_seed(1)
        step()  # warm-up
        samples[0], times = 0, []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(1e3 * (time.perf_counter() - start))
        result[implementation] = dict(step_ms=sorted(times)[len(times) // 2], conv_samples_per_step=samples[0] / steps)
    dense, skip = result["fused"], result["fused+skip"]
    result["conv_sample_fraction"] = skip["conv_samples_per_step"] / dense["conv_samples_per_step"]
    result["speedup"] = dense["step_ms"] / skip["step_ms"]
    return result
