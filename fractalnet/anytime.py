"""Anytime prediction as a product: the most accurate answer within a latency budget.

A FractalNet holds many sub-networks: each column alone (``model(x, column=k)``) and each
truncation to its k shallowest columns (``model(x, columns=k)``). Shallow ones answer sooner,
deep ones better. Each needs BatchNorm statistics of its own: the running statistics that
drop-path training leaves mix all of them (on the digits demo, column 3 alone errs on 36.67% of
the test images with them, and on about 1% with its own). So:

    calibration = calibrate(model, calibration_inputs, validation_batches, batch_size=1)
    calibration.save("runs/demo/best.anytime.pt")
    predictor = AnytimePredictor(model, calibration)
    answer = predictor.predict(x, budget_ms=0.3)      # answer.logits, answer.subnetwork
    cascade = predictor.cascade(x, threshold=0.9)     # the fastest first, the unsure samples on

:func:`calibrate` re-estimates each sub-network's statistics over a calibration split (as
training's ``reestimate_batchnorm`` does), measures its error on a validation split and its
latency on the model's device (CUDA events on a GPU, a monotonic clock on a CPU; the median of
repeated timings, with the 20th and 80th percentiles). **Latency is per image**: the time of one
batch of the calibration's ``batch_size`` divided by that size; a budget holds for batches of
that size on that device.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fractal_kernels import __version__

from .extras import installed_version
from .model import FractalNet
from .training import device_name, digest, reestimate_batchnorm_over

CALIBRATION_FORMAT = "fractalnet-anytime-1"
#: The BatchNorm buffers that make a sub-network's statistics.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class SubNetwork:
    """One servable sub-network: ``mode`` "column" (column k alone) or "columns" (the truncation
    to columns 1..k; columns 1 is column 1 alone, so k >= 2), and its measurements."""

    mode: str
    k: int
    depth: int  #: conv layers on its longest path
    error: float  #: on the validation split, with its own statistics
    latency_ms: float  #: per image: the median time of a batch / batch size
    latency_low_ms: float  #: the 20th percentile, per image
    latency_high_ms: float  #: the 80th percentile, per image

    @property
    def name(self) -> str:
        return f"column {self.k}" if self.mode == "column" else f"columns 1-{self.k}"

    @property
    def forward_arguments(self) -> dict:
        """What ``model(x, **...)`` takes to run it."""
        return {self.mode: self.k}


@dataclass
class Calibration:
    """Every sub-network of one trained FractalNet: its own BatchNorm statistics, its validation
    error and its latency, with what they were measured on. ``save`` and ``load`` keep it beside
    the model's checkpoint (``DIR/best.pt`` -> ``DIR/best.anytime.pt``, :func:`calibration_path`)."""

    subnetworks: list[SubNetwork]
    #: statistics[name]: the state_dict entries (STATISTICS) of the BatchNorms it runs.
    statistics: dict[str, dict[str, torch.Tensor]]
    model_digest: str  #: of the model's parameters: a calibration serves only that model
    num_columns: int
    device: str  #: "cpu" or "cuda": where the latencies hold
    hardware: str
    dtype: str
    batch_size: int
    calibration_images: int
    validation_images: int
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        self.subnetworks = [s if isinstance(s, SubNetwork) else SubNetwork(**s) for s in self.subnetworks]

    def __getitem__(self, name: str) -> SubNetwork:
        for subnetwork in self.subnetworks:
            if subnetwork.name == name:
                return subnetwork
        raise KeyError(f"no sub-network {name!r}; this calibration has {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [s.name for s in self.subnetworks]

    def fastest(self) -> SubNetwork:
        return min(self.subnetworks, key=lambda s: s.latency_ms)

    def whole(self) -> SubNetwork:
        """The whole network: every column (column 1 where there is one)."""
        return self[f"columns 1-{self.num_columns}" if self.num_columns > 1 else "column 1"]

    def pareto(self) -> list[SubNetwork]:
        """The sub-networks no other beats on both error and latency, fastest first."""
        front = []
        for subnetwork in sorted(self.subnetworks, key=lambda s: (s.latency_ms, s.error)):
            if not front or subnetwork.error < front[-1].error:
                front.append(subnetwork)
        return front

    def choose(self, budget_ms: float) -> SubNetwork:
        """The most accurate sub-network whose latency per image is within ``budget_ms`` (the
        faster of equals)."""
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float)) or not 0 < budget_ms < math.inf:
            raise ValueError(f"budget_ms must be a positive number of milliseconds per image, got {budget_ms!r}")
        fitting = [s for s in self.pareto() if s.latency_ms <= budget_ms]
        if not fitting:
            fastest = self.pareto()[0]
            raise ValueError(f"budget_ms={budget_ms:g}: no sub-network fits; the fastest, {fastest.name}, takes "
                             f"{fastest.latency_ms:.4g} ms per image (batch {self.batch_size}, {self.hardware})")
        return fitting[-1]

    def table(self) -> str:
        """The sub-networks as a Markdown table, Pareto-optimal ones marked."""
        front = {s.name for s in self.pareto()}
        lines = [f"batch {self.batch_size}, {self.dtype}, {self.hardware}; error on {self.validation_images} "
                 f"validation images, statistics from {self.calibration_images} calibration images", "",
                 "| sub-network | depth | error (%) | ms per image (20th-80th pct) | Pareto |", "|---|---|---|---|---|"]
        for s in sorted(self.subnetworks, key=lambda s: s.latency_ms):
            lines.append(f"| {s.name} | {s.depth} | {100 * s.error:.2f} | {s.latency_ms:.4g} "
                         f"({s.latency_low_ms:.4g}-{s.latency_high_ms:.4g}) | {'yes' if s.name in front else ''} |")
        return "\n".join(lines)

    def save(self, path) -> None:
        fields = {**asdict(self), "subnetworks": [asdict(s) for s in self.subnetworks]}
        torch.save(dict(format=CALIBRATION_FORMAT, **fields), path)

    @classmethod
    def load(cls, path) -> "Calibration":
        if not Path(path).is_file():
            raise FileNotFoundError(f"no calibration at {path} (fractalnet anytime --calibrate writes it)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.pop("format", None) != CALIBRATION_FORMAT:
            raise ValueError(f"{path} is not a fractalnet anytime calibration")
        return cls(**saved)


def calibration_path(checkpoint) -> Path:
    """Where the calibration of a checkpoint lives: beside it, ``best.pt`` -> ``best.anytime.pt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".anytime.pt")


def subnetworks_of(model: FractalNet) -> list[tuple[str, int]]:
    """(mode, k) of every sub-network: each column alone, then each truncation of 2 or more columns."""
    return [("column", k) for k in range(1, model.num_columns + 1)] + [
        ("columns", k) for k in range(2, model.num_columns + 1)]


def _depth(model: FractalNet, k: int) -> int:
    """Conv layers on the longest path of column k alone or of the truncation to k columns."""
    return sum(len(block.columns[k - 1]) for block in model.blocks) + (1 if model.stem is not None else 0)


def _reusable(name: str, batches):
    if iter(batches) is batches:
        raise TypeError(f"{name} must be iterable more than once (a list or a DataLoader), not an iterator: "
                        "every sub-network runs over it")
    return batches


def calibrate(model: FractalNet, calibration: Iterable[torch.Tensor],
              validation: Iterable[tuple[torch.Tensor, torch.Tensor]], *, batch_size: int = 1,
              repeats: int = 20) -> Calibration:
    """Calibrates every sub-network of a trained ``model`` on its device: statistics re-estimated
    over the ``calibration`` input batches (the training split, unaugmented), the error over the
    ``validation`` (inputs, labels) batches, the latency of a batch of ``batch_size`` validation
    images, timed ``repeats`` times after a warm-up. ``model`` itself is left unchanged."""
    if not isinstance(model, FractalNet):
        raise TypeError(f"model must be a FractalNet, got {type(model).__name__}")
    for name, value, least in (("batch_size", batch_size, 1), ("repeats", repeats, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    calibration, validation = _reusable("calibration", calibration), _reusable("validation", validation)
    parameter = next(model.parameters())
    device = parameter.device
    example = _example_batch(validation, batch_size, device)
    working = copy.deepcopy(model).eval()
    batchnorms = _batchnorms(working)
    results, statistics_of, calibration_images = [], {}, 0

    def calibration_inputs():
        nonlocal calibration_images
        for batch in calibration:
            x = _inputs(batch)
            calibration_images += len(x)
            yield x.to(device)

    for mode, k in subnetworks_of(working):
        calibration_images = 0  # counted as each pass reads it
        reestimate_batchnorm_over(working, calibration_inputs(), **{mode: k})
        error, validation_images = _error(working, validation, device, {mode: k})
        median, low, high = _latency_ms(lambda: working(example, **{mode: k}), device, repeats)
        subnetwork = SubNetwork(mode, k, _depth(working, k), error, median / batch_size, low / batch_size,
                                high / batch_size)
        results.append(subnetwork)
        statistics_of[subnetwork.name] = {f"{name}.{buffer}": getattr(bn, buffer).detach().cpu().clone()
                                          for name, bn in batchnorms.items() if bn.num_batches_tracked > 0
                                          for buffer in STATISTICS}
    return Calibration(
        results, statistics_of, digest(model.parameters()), model.num_columns, device.type, device_name(device),
        str(parameter.dtype).removeprefix("torch."), batch_size, calibration_images, validation_images,
        versions=dict(fractal_kernels=__version__, torch=str(torch.__version__), triton=installed_version("triton")))


def _inputs(batch) -> torch.Tensor:
    """A calibration batch's inputs: the batch itself, or the first of an (inputs, labels) pair."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _example_batch(validation, batch_size: int, device: torch.device) -> torch.Tensor:
    """``batch_size`` validation images (repeated if the first batch has fewer) on ``device``."""
    x, _ = next(iter(validation))
    return x[torch.arange(batch_size) % len(x)].to(device)


def _error(model: nn.Module, validation, device, forward_arguments: dict) -> tuple[float, int]:
    wrong = total = 0
    with torch.no_grad():
        for x, labels in validation:
            out = model(x.to(device), **forward_arguments)
            wrong += (out.argmax(1).cpu() != labels.cpu()).sum().item()
            total += len(labels)
    if not total:
        raise ValueError("validation holds no images")
    return wrong / total, total


def _latency_ms(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn`` under no_grad, after three warm-up
    calls: CUDA events on a GPU, time.perf_counter on a CPU."""
    times = []
    with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(3):
            fn()
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start_s))
    low, median, high = (statistics.quantiles(times, n=10)[i] for i in (1, 4, 7))
    return median, low, high


@dataclass
class Prediction:
    logits: torch.Tensor
    subnetwork: SubNetwork  #: the sub-network that answered


@dataclass
class CascadePrediction:
    logits: torch.Tensor
    #: stage[b]: the index in ``stages`` of the sub-network that answered sample b.
    stage: torch.Tensor
    stages: list[SubNetwork]


class AnytimePredictor:
    """Serves a calibrated FractalNet: each sub-network runs with its own statistics. Holds an
    eval-mode copy of ``model`` (the model passed in is left as it is) and loads a sub-network's
    statistics into the copy's BatchNorms when it changes."""

    def __init__(self, model: FractalNet, calibration: Calibration):
        if not isinstance(model, FractalNet):
            raise TypeError(f"model must be a FractalNet, got {type(model).__name__}")
        if not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be a Calibration, got {type(calibration).__name__}")
        if calibration.num_columns != model.num_columns or calibration.model_digest != digest(model.parameters()):
            raise ValueError("calibration: made for another model (its parameters differ from this model's); "
                             "calibrate this one")
        device = next(model.parameters()).device
        if calibration.device != device.type:
            raise ValueError(f"calibration: its latencies were measured on {calibration.device}, the model is on "
                             f"{device.type}; calibrate on the device that serves")
        self.model = copy.deepcopy(model).eval()
        self.calibration = calibration
        self._batchnorms = _batchnorms(self.model)
        self._loaded: Optional[str] = None

    def run(self, x: torch.Tensor, subnetwork) -> torch.Tensor:
        """The logits of ``subnetwork`` (a SubNetwork or its name) on ``x``, with its statistics."""
        subnetwork = self.calibration[subnetwork] if isinstance(subnetwork, str) else subnetwork
        if self._loaded != subnetwork.name:
            load_statistics(self.model, self.calibration.statistics[subnetwork.name], self._batchnorms)
            self._loaded = subnetwork.name
        with torch.no_grad():
            return self.model(x, **subnetwork.forward_arguments)

    def predict(self, x: torch.Tensor, budget_ms: float) -> Prediction:
        """The answer of the most accurate sub-network whose latency per image fits ``budget_ms``
        (Calibration.choose), and which one answered."""
        subnetwork = self.calibration.choose(budget_ms)
        return Prediction(self.run(x, subnetwork), subnetwork)

    def cascade(self, x: torch.Tensor, threshold: float, stages: Optional[Sequence] = None) -> CascadePrediction:
        """Each sample answered by the first of ``stages`` (default: the fastest sub-network, then
        the whole network) whose confidence, its largest softmax probability, is above
        ``threshold``; the last stage answers the rest. Threshold 0: every sample stops at the
        first stage; 1: every sample goes on to the last."""
        stages = self._stages(stages)
        _check_threshold(threshold)
        logits = stage = None
        pending = torch.arange(len(x), device=x.device)
        for index, subnetwork in enumerate(stages):
            out = self.run(x[pending], subnetwork)
            if logits is None:
                logits = out.new_empty((len(x),) + out.shape[1:])
                stage = torch.empty(len(x), dtype=torch.int64, device=x.device)
            last = index == len(stages) - 1
            done = torch.ones_like(pending, dtype=torch.bool) if last else confidence(out) > threshold
            logits[pending[done]], stage[pending[done]] = out[done], index
            pending = pending[~done]
            if not len(pending):
                break
        return CascadePrediction(logits, stage, stages)

    def _stages(self, stages) -> list[SubNetwork]:
        if stages is None:
            fastest, whole = self.calibration.fastest(), self.calibration.whole()
            return [fastest, whole] if whole != fastest else [fastest]
        chosen = [self.calibration[s] if isinstance(s, str) else s for s in stages]
        if not chosen:
            raise ValueError("stages must name at least one sub-network")
        return chosen


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Each sample's largest softmax probability."""
    return F.softmax(logits.float(), dim=1).amax(1)


def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a confidence in [0, 1], got {threshold!r}")


def load_statistics(model: nn.Module, statistics: dict[str, torch.Tensor], batchnorms=None) -> None:
    """Copies a sub-network's statistics (Calibration.statistics[name]) into ``model``'s BatchNorms."""
    batchnorms = _batchnorms(model) if batchnorms is None else batchnorms
    for key, value in statistics.items():
        name, buffer = key.rsplit(".", 1)
        getattr(batchnorms[name], buffer).copy_(value)


def cascade_tradeoff(predictor: AnytimePredictor, validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     thresholds: Sequence[float], stages: Optional[Sequence] = None) -> list[dict]:
    """The cascade over ``validation`` at each threshold: accuracy, and the mean latency per
    image that the calibrated latencies give (each stage's per-image latency times the share of
    samples that reach it). Each stage runs once over every sample; the thresholds only choose."""
    stages = predictor._stages(stages)
    for threshold in thresholds:
        _check_threshold(threshold)
    outputs = [[] for _ in stages]
    labels = []
    device = next(predictor.model.parameters()).device
    for x, y in _reusable("validation", validation):
        x = x.to(device)
        for index, subnetwork in enumerate(stages):
            outputs[index].append(predictor.run(x, subnetwork).cpu())
        labels.append(y.cpu())
    labels = torch.cat(labels)
    outputs = [torch.cat(out) for out in outputs]
    sure = [confidence(out) for out in outputs]
    correct = [out.argmax(1) == labels for out in outputs]
    rows = []
    for threshold in thresholds:
        pending = torch.ones(len(labels), dtype=torch.bool)
        right = torch.zeros(len(labels), dtype=torch.bool)
        latency = 0.0
        for index, subnetwork in enumerate(stages):
            latency += subnetwork.latency_ms * pending.float().mean().item()
            done = pending & ((sure[index] > threshold) if index < len(stages) - 1 else True)
            right |= done & correct[index]
            pending &= ~done
        rows.append(dict(threshold=threshold, accuracy=right.float().mean().item(), mean_latency_ms=latency))
    return rows


def choose_threshold(tradeoff: list[dict], mean_budget_ms: float) -> dict:
    """The most accurate cascade_tradeoff row whose mean latency is within ``mean_budget_ms``."""
    fitting = [row for row in tradeoff if row["mean_latency_ms"] <= mean_budget_ms]
    if not fitting:
        fastest = min(row["mean_latency_ms"] for row in tradeoff)
        raise ValueError(f"mean_budget_ms={mean_budget_ms:g}: no threshold fits; the fastest cascade takes "
                         f"{fastest:.4g} ms per image")
    return max(fitting, key=lambda row: (row["accuracy"], -row["mean_latency_ms"]))


def extract(model: FractalNet, calibration: Calibration, subnetwork) -> nn.Module:
    """The sub-network for deployment, with its own statistics folded in, in eval mode: a column
    alone as a plain nn.Sequential (FractalNet.extract_column), a truncation to k columns as a
    FractalNet of k columns. Copies: ``model`` is left as it is."""
    predictor = AnytimePredictor(model, calibration)
    subnetwork = calibration[subnetwork] if isinstance(subnetwork, str) else subnetwork
    load_statistics(predictor.model, calibration.statistics[subnetwork.name], predictor._batchnorms)
    if subnetwork.mode == "column":
        return predictor.model.extract_column(subnetwork.k).eval()
    truncated = predictor.model
    for block in truncated.blocks:
        block.columns = block.columns[:subnetwork.k]
        block.num_columns = subnetwork.k
    truncated.num_columns = subnetwork.k
    return truncated.eval()

