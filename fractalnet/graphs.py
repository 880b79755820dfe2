"""A FractalNet training step captured in CUDA graphs: forward, loss, backward and SGD step
replayed with no host work but a copy of the batch and the choice of a graph.

    step = GraphedTrainingStep(model, optimizer, example_images, example_labels)
    for images, labels in batches:
        step(images, labels)             # the batch is copied into the graphs' static inputs
    loss, accuracy = step.epoch_totals()  # device sums, read once

Drop-path drawn per sample is one graph (its masks and the dropout seeds are drawn inside it
from the device's default generator, which every captured graph registers, so each replay draws
afresh). Drawn per batch, the structure is a host draw (``FractalNet.draw_structure``: global or
local, and the column, from ``generator``, as the eager training loop draws it) and each
structure has its own graph: "local", whose masks are drawn on the device inside the graph, and
one per column, the column alone (``FractalNet.structures``: C + 1 graphs).

The graphs share one memory pool. That is safe for replays in any order: every tensor a step
keeps past its end (parameters, gradients, optimizer state, running statistics, the loss and
accuracy sums) is allocated before any capture, outside the pool, so within the pool a graph
holds only its own intermediates, which end with its replay; no graph reads memory another
graph's replay writes.

Capture needs every kernel compiled, the gradients and the optimizer state allocated and the
learning rate fixed: each structure is warmed up on a side stream first, and the model, its
buffers and the optimizer state are put back as they were afterwards (the warm-up steps do not
count). A step whose optimizer's learning rates differ from the captured ones captures again
first (the paper's schedule changes the rate four times). SGD only (its state at the first step,
a momentum buffer equal to the gradient, is what a zero buffer gives in the captured step);
skip_dropped (shapes change every step), synchronised BatchNorm and an fp16 GradScaler are
refused. Every parameter gets a gradient every step (zeros where a global batch's column does not
reach), as in the paper's Caffe code: momentum moves every parameter every step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import FractalNet


def give_every_parameter_a_gradient(model: nn.Module) -> None:
    """Zero gradients for the parameters that have none. The training loop then zeroes gradients
    in place (never to None): every step gives every parameter a gradient, zeros where a global
    batch's column or an empty skip_dropped segment does not reach it, so that momentum and weight
    decay move every parameter every step, as the paper's Caffe code does, in eager, compiled
    (whose graphs give those zeros themselves) and graphed steps alike (CUDA graphs need the
    gradients to exist before capture)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def cuda_graph_capture(pool) -> Callable[[Callable[[], object]], Callable[[], None]]:
    """The capture of the graphs: ``capture(step)`` records one call of ``step`` in a CUDA graph
    (in ``pool``) and returns its replay."""

    def capture(step):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        return graph.replay

    return capture


class GraphedTrainingStep:
    """One FractalNet training step (forward, ``loss_fn``, backward, ``optimizer.step()``) per call,
    replayed from CUDA graphs (see the module docstring).

    Args:
        model: a FractalNet in training mode, on a CUDA device.
        optimizer: torch.optim.SGD over its parameters.
        example_images, example_labels: a batch of the shapes every call will have (it is also
            what the warm-up steps run on).
        loss_fn: ``loss_fn(logits, labels)``, a scalar.
        generator: a CPU generator for the per-batch structure draw (None: torch's).
        warmup: warm-up steps of each structure before its capture.
        capture: how a step is recorded (tests pass one that records nothing and replays by
            running the step; by default CUDA graphs sharing one pool).
    """

    def __init__(self, model: FractalNet, optimizer: torch.optim.Optimizer, example_images: torch.Tensor,
                 example_labels: torch.Tensor, loss_fn: Callable = F.cross_entropy,
                 generator: Optional[torch.Generator] = None, warmup: int = 3,
                 capture: Optional[Callable] = None):
        if not isinstance(model, FractalNet):
            raise TypeError(f"model must be a FractalNet, got {type(model).__name__}")
        if not model.training:
            raise ValueError("model must be in training mode (model.train())")
        if model.skip_dropped:
            raise ValueError("skip_dropped changes its shapes every step: a CUDA graph cannot replay it")
        if model.process_group is not None:
            raise ValueError("model.process_group: synchronised BatchNorm is not captured in CUDA graphs")
        if type(optimizer) is not torch.optim.SGD:
            raise TypeError(f"optimizer must be torch.optim.SGD, got {type(optimizer).__name__}")
        if capture is None and example_images.device.type != "cuda":
            raise ValueError(f"example_images: CUDA graphs need CUDA tensors, got a tensor on {example_images.device}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator: the structure is drawn on the host; pass a CPU generator")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.generator, self.warmup = generator, warmup
        self.images, self.labels = example_images.clone(), example_labels.clone()
        device = self.images.device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.structures = model.structures()
        self._capture = capture
        self._pool = None
        self._capture_all()

    # --------------------------------------------------------------------------------------
    def _step(self, structure) -> None:
        """The step a graph records: every tensor it keeps past its end exists before capture."""
        self.optimizer.zero_grad(set_to_none=False)
        logits = self.model(self.images) if structure is None else self.model(self.images, structure=structure)
        loss = self.loss_fn(logits, self.labels)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach().double() * self.labels.shape[0]
            self.correct += (logits.argmax(1) == self.labels).sum()

    def _state(self) -> list[torch.Tensor]:
        state = [p for p in self.model.parameters()] + [b for b in self.model.buffers()]
        state += [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return state + [self.loss_sum, self.correct]

    def _capture_all(self) -> None:
        """Warm-up and capture of every structure, the state put back afterwards."""
        give_every_parameter_a_gradient(self.model)
        saved = {id(t): t.detach().clone() for t in self._state()}
        cuda = self.images.device.type == "cuda"
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for structure in self.structures:
                for _ in range(self.warmup):
                    self._step(structure)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
        capture = self._capture or cuda_graph_capture(self._pool)
        self._captured_lrs = self._lrs()
        self.replays = {structure: capture(lambda structure=structure: self._step(structure))
                        for structure in self.structures}
        with torch.no_grad():
            for t in self._state():
                # The optimizer state the warm-up created starts from zero: SGD's first step
                # (a momentum buffer equal to the gradient) is what the captured step makes of it.
                if id(t) in saved:
                    t.copy_(saved[id(t)])
                else:
                    t.zero_()
            for p in self.model.parameters():
                p.grad.zero_()

    def _lrs(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        """One training step on (images, labels), of the example's shapes; returns the structure
        it ran."""
        if images.shape != self.images.shape or labels.shape != self.labels.shape:
            raise ValueError(f"images and labels must have the example's shapes {tuple(self.images.shape)} and "
                             f"{tuple(self.labels.shape)}, got {tuple(images.shape)} and {tuple(labels.shape)}")
        if self._lrs() != self._captured_lrs:  # the graphs hold the rate they were captured with
            self._capture_all()
        self.images.copy_(images, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        structure = self.model.draw_structure(self.generator)
        self.replays[structure]()
        self.seen += labels.shape[0]
        return structure

    def epoch_totals(self) -> tuple[float, float]:
        """(mean loss, accuracy) over the steps since the last call, read from the device once."""
        loss, correct = torch.stack([self.loss_sum, self.correct.double()]).tolist()
        seen, self.seen = max(self.seen, 1), 0
        self.loss_sum.zero_(), self.correct.zero_()
        return loss / seen, correct / seen
