"""nn.Module drop-ins built on the fused ops: FusedBatchNormReLU2d, MaskedJoin, and
fuse_batchnorm_relu, which swaps the BatchNorm -> ReLU pairs of an existing model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .ops import bn_relu, masked_join

logger = logging.getLogger("fractal_kernels")


class FusedBatchNormReLU2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``ReLU``, as one fused op.

    A subclass of nn.BatchNorm2d with the same constructor, parameters, buffers and state_dict (it
    loads a plain BatchNorm2d's state_dict and the other way round), ``momentum=None`` (cumulative
    average), ``num_batches_tracked``, ``track_running_stats``, empty batches and ``.eval()``
    handled as torch does. With a ``process_group`` of several ranks, training uses batch
    statistics over all of them, as nn.SyncBatchNorm does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, process_group=None, **kwargs):
        # kwargs: what this torch's BatchNorm2d takes besides (bias=False in recent releases).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FusedBatchNormReLU2d":
        """The fused module holding ``bn``'s own parameters and buffers (shared, not copied, so an
        optimizer built on them keeps working)."""
        fused = cls.__new__(cls)
        fused.__dict__ = dict(bn.__dict__)
        fused.process_group = None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return bn_relu(x, **batchnorm_arguments(self), process_group=self.process_group)


def batchnorm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> dict:
    """The bn_relu arguments that reproduce ``bn``'s own forward: its parameters, its running
    statistics where it tracks them, batch statistics in training (or without running
    statistics), its momentum (None: the cumulative average), and in training its
    ``num_batches_tracked``, which the statistics kernel increments as nn.BatchNorm2d.forward
    does, with no launch of its own and no read back to the host."""
    parameters, buffers = bn._parameters, bn._buffers
    try:  # registered in the module's own tables (as None where absent), as they usually are
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        num_batches_tracked = buffers["num_batches_tracked"]
    except KeyError:
        weight, bias, running_mean, running_var, num_batches_tracked = (
            _module_tensor(bn, name) for name in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked"))
    track = not bn.training or bn.track_running_stats
    counting = bn.training and bn.track_running_stats and num_batches_tracked is not None
    return dict(
        weight=weight,
        bias=bias,
        running_mean=running_mean if track else None,
        running_var=running_var if track else None,
        training=bn.training or (running_mean is None and running_var is None),
        momentum=bn.momentum if counting or bn.momentum is not None else 0.0,
        eps=bn.eps,
        num_batches_tracked=num_batches_tracked if counting else None,
    )


def _module_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>``, a parameter or buffer, read from the module's own tables where it is
    registered there: nn.Module.__getattr__ costs about a microsecond a call, and a forward
    reads five. Anything else (a parametrization, a property) goes through getattr."""
    parameters, buffers = module._parameters, module._buffers
    if name in parameters:
        return parameters[name]
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


class MaskedJoin(nn.Module):
    """The join of a fractal block as a module: the per-sample mean of the inputs that survive
    drop-path, on the fused masked_join.

    ``forward(inputs, mask=None)`` takes the inputs as a list or tuple, or stacked in one
    [k, B, ...] tensor as the PyTorch ports build them, and a [k, B] bool or 0/1 float mask.
    Without a mask, in training and with ``local_drop`` > 0, it draws local drop-path itself:
    each input dropped with probability ``local_drop``, one restored where all were dropped
    (from ``generator``, or torch's). In eval, or with neither, it is the plain mean.
    """

    def __init__(self, local_drop: float = 0.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0.0 <= local_drop <= 1.0:
            raise ValueError(f"local_drop must be a probability in [0, 1], got {local_drop}")
        self.local_drop = local_drop
        self.generator = generator

    def forward(self, inputs: Union[Sequence[torch.Tensor], torch.Tensor],
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            inputs = list(inputs.unbind(0))
        if mask is None and self.training and self.local_drop > 0:
            mask = self.draw_mask(len(inputs), inputs[0].shape[0], inputs[0].device)
        return masked_join(inputs, mask)

    def draw_mask(self, k: int, batch: int, device: torch.device) -> torch.Tensor:
        """A [k, batch] local drop-path mask: one draw, and the input with the largest draw
        restored where all were dropped (uniform among them, since all fell below local_drop)."""
        draw = torch.rand(k, batch, generator=self.generator,
                          device=self.generator.device if self.generator is not None else device).to(device)
        keep = draw >= self.local_drop
        restored = torch.arange(k, device=device)[:, None] == draw.argmax(0, keepdim=True)
        return keep | (restored & ~keep.any(0, keepdim=True))

    def extra_repr(self) -> str:
        return f"local_drop={self.local_drop}"


@dataclass
class FusionReport:
    """What fuse_batchnorm_relu did: the BatchNorm2d modules swapped (by name), those it left,
    with why, the normalisation layers of other kinds it does not fuse, and whether it traced a
    forward (without an example input it sees only pairs inside an nn.Sequential)."""

    swapped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    not_fused: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = True

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} of {len(self.swapped) + len(self.skipped)} BatchNorm2d -> ReLU pairs"]
        lines += [f"  left {name}: {why}" for name, why in self.skipped]
        lines += [f"  not fused {name}: {why}" for name, why in self.not_fused]
        if self.skipped and not self.traced:
            lines.append("  pass an example input, fuse_batchnorm_relu(model, x), to trace one forward: it finds the "
                         "pairs outside an nn.Sequential and through functional ReLUs too")
        return "\n".join(lines)


#: Normalisation layers that fuse_batchnorm_relu names when it leaves them (only nn.BatchNorm2d fuses).
_NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _not_fused(model: nn.Module) -> list[tuple[str, str]]:
    """The normalisation layers of ``model`` that are not a plain nn.BatchNorm2d, with why."""
    return [(name, f"{type(m).__name__} (only nn.BatchNorm2d is fused)") for name, m in model.named_modules()
            if isinstance(m, _NORMALISATIONS) and type(m) is not nn.BatchNorm2d
            and not isinstance(m, FusedBatchNormReLU2d)]


#: Calls that apply ReLU to their first argument.
_RELUS = {"relu", "relu_"}
#: Calls that only read a tensor's metadata: not consumers of its values.
_METADATA = {"size", "dim", "numel", "stride", "is_contiguous", "storage_offset", "element_size", "data_ptr",
             "__len__", "__format__", "__repr__", "__get__", "shape", "device", "dtype", "ndim", "requires_grad",
             "is_floating_point", "untyped_storage"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class _ConsumerTrace(TorchFunctionMode):
    """Records, for each BatchNorm2d output of a forward, the calls that consume it and the
    ReLU module running each call, if any."""

    def __init__(self, outputs: dict):
        super().__init__()
        self.outputs = outputs  # id(tensor) -> (tensor, BatchNorm name)
        self.consumers: dict[int, list[tuple[str, Optional[str]]]] = {}
        self.relu_modules: list[str] = []  # the ReLU modules running now (a stack)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name not in _METADATA:
            flat = [a for arg in (*args, *kwargs.values()) for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            for tensor in flat:
                if isinstance(tensor, torch.Tensor) and id(tensor) in self.outputs:
                    module = self.relu_modules[-1] if self.relu_modules else None
                    self.consumers.setdefault(id(tensor), []).append((name, module))
            # An in-place op turns the tensor into its own output: later uses are not the
            # BatchNorm's output any more.
            inplace = name.endswith("_") or kwargs.get("inplace") or (name == "relu" and len(args) > 1 and args[1])
            if inplace and args and isinstance(args[0], torch.Tensor):
                self.outputs.pop(id(args[0]), None)
        return func(*args, **kwargs)


def fuse_batchnorm_relu(model: nn.Module, example_input=None) -> FusionReport:
    """Swaps the BatchNorm2d -> ReLU pairs of ``model`` for FusedBatchNormReLU2d, in place.

    With ``example_input`` (a tensor, or a tuple of forward arguments) the pairs are found from
    one forward of it, in eval mode and without gradients: every BatchNorm2d whose output goes to
    a ReLU and nowhere else, wherever the modules live (attributes, ModuleList, Sequential) and
    whether the ReLU is a module, ``F.relu``, ``F.relu_``, ``torch.relu`` or ``Tensor.relu_``.
    Without one, only a BatchNorm2d directly followed by an nn.ReLU inside an nn.Sequential.

    Each swapped BatchNorm becomes a FusedBatchNormReLU2d sharing its parameters and buffers (the
    state_dict is unchanged); an nn.ReLU module that served only it becomes nn.Identity; a
    functional ReLU stays (ReLU of the fused, non-negative output is that output). Returns a
    FusionReport ("swapped 14 of 14 BatchNorm2d -> ReLU pairs", and why any were left), also
    logged at INFO on the "fractal_kernels" logger.
    """
    not_fused = _not_fused(model)
    report = _fuse_traced(model, example_input) if example_input is not None else _fuse_sequential(model)
    report.not_fused = not_fused
    logger.info("%s", report)
    return report


def _fuse_sequential(model: nn.Module) -> FusionReport:
    report = FusionReport(traced=False)
    batchnorms = [name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    for parent_name, sequential in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        for (name, module), (next_name, following) in zip(children, children[1:]):
            if type(module) is nn.BatchNorm2d and type(following) is nn.ReLU:
                setattr(sequential, name, FusedBatchNormReLU2d.from_batchnorm(module))
                setattr(sequential, next_name, nn.Identity())
                report.swapped.append(f"{parent_name}.{name}".lstrip("."))
    report.skipped = [(name, "not followed by an nn.ReLU inside an nn.Sequential") for name in batchnorms
                      if name not in report.swapped]
    return report


def _fuse_traced(model: nn.Module, example_input) -> FusionReport:
    batchnorms = {name: m for name, m in model.named_modules() if type(m) is nn.BatchNorm2d}
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    calls = {name: 0 for name in (*batchnorms, *relus)}
    trace = _ConsumerTrace(outputs)

    traced: dict[int, str] = {}  # every BatchNorm output of the forward, by id (kept alive in ``kept``)
    kept = []

    def record_output(name):
        def hook(module, inputs, output):
            calls[name] += 1
            outputs[id(output)] = (output, name)
            traced[id(output)] = name
            kept.append(output)
        return hook

    def enter_relu(name):
        def hook(module, inputs):
            calls[name] += 1
            trace.relu_modules.append(name)
        return hook

    def leave_relu(module, inputs, output):
        trace.relu_modules.pop()

    handles = [m.register_forward_hook(record_output(n)) for n, m in batchnorms.items()]
    for name, relu in relus.items():
        handles += [relu.register_forward_pre_hook(enter_relu(name)), relu.register_forward_hook(leave_relu)]
    modes = {m: m.training for m in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad(), trace:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)

    uses: dict[str, list[list[tuple[str, Optional[str]]]]] = {name: [] for name in batchnorms}
    for key, name in traced.items():
        uses[name].append(trace.consumers.get(key, []))
    relu_uses: dict[str, int] = {}
    report = FusionReport()
    swaps = {}
    for name, per_call in uses.items():
        if not per_call:
            report.skipped.append((name, "the example's forward does not call it"))
            continue
        if any(len(consumers) != 1 or consumers[0][0] not in _RELUS for consumers in per_call):
            others = sorted({func for consumers in per_call for func, _ in consumers if func not in _RELUS})
            why = f"its output also feeds {', '.join(others)}" if others else "its output feeds no ReLU"
            report.skipped.append((name, why))
            continue
        swaps[name] = {module for consumers in per_call for _, module in consumers}
        for module in swaps[name]:
            if module is not None:
                relu_uses[module] = relu_uses.get(module, 0) + len(per_call)
    replaced = {}
    for name, modules in swaps.items():
        replaced[batchnorms[name]] = FusedBatchNormReLU2d.from_batchnorm(batchnorms[name])
        for module in modules:
            # A ReLU module that served only swapped BatchNorms is now the identity.
            if module is not None and relu_uses[module] == calls[module]:
                replaced[relus[module]] = nn.Identity()
        report.swapped.append(name)
    # Everywhere a module is held (a shared module has one name but several parents).
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child in replaced:
                setattr(parent, child_name, replaced[child])
    return report
