"""One object per kernel pass: its launcher, which eager mode calls, and the torch.library op
registered from it, which torch traces.

torch.library's rule is that the function behind a custom op is its eager callable; so here the
launcher itself is registered. Under TRITON_INTERPRET=1 the ops are opaque ``custom_op``s (an
interpreted kernel cannot be traced into a graph); otherwise they are ``triton_op``s, whose
launches torch.compile traces as graph nodes (``wrap_triton``) and analyses for the tensors each
kernel writes.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Callable, Optional, Sequence

import torch

from .launch import INTERPRETING, is_plain

#: Compiled kernels use triton_op where torch has it (torch >= 2.6), so that torch.compile sees
#: and schedules the Triton kernels themselves.
USE_TRITON_OP = hasattr(torch.library, "triton_op") and not INTERPRETING

#: A launcher's per-input list of optional tensors (None for an absent weight, statistic, ...).
OptionalTensors = list[Optional[torch.Tensor]]


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor standing for an absent entry of a mutated tensor list."""
    return like.new_empty(0)


def _is_field_tuple(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields")


class KernelOp:
    """A launcher and its torch.library op ``name``. ``eager`` is the launcher; ``traced(...)``
    takes the launcher's arguments and calls the op; ``on(traced)`` is the one or the other.

    The op's schema is the launcher's signature with two changes, both read from it: an argument
    of a NamedTuple type (the Join) is passed field by field, and a mutated list of optional
    tensors takes an empty placeholder for each None (auto_functionalize takes mutable Tensor,
    Tensor? and Tensor[], but not Tensor?[]). A launcher's ``tiling`` keyword, a host-side cache
    of its inputs' geometry that it computes when None, is no op argument: the op tiles for
    itself (while torch traces, sizes may be symbols). The launcher also serves as the fake
    kernel: it only allocates and launches, so on fake tensors it computes output metadata.
    """

    def __init__(self, name: str, launcher: Callable, mutates_args: Sequence[str]):
        self.eager = launcher
        hints = typing.get_type_hints(launcher)
        signature = inspect.signature(launcher)
        #: Per positional parameter of the launcher: its NamedTuple type, "placeholders", or None.
        self._conversions = []
        parameters = []
        for p in signature.parameters.values():
            if p.name == "tiling":
                continue
            hint = hints[p.name]
            if _is_field_tuple(hint):
                fields = typing.get_type_hints(hint)
                parameters += [inspect.Parameter(f"{p.name}_{f}", p.kind, annotation=fields[f]) for f in hint._fields]
                self._conversions.append(hint)
                continue
            if p.name in mutates_args and hint == OptionalTensors:
                hint = list[torch.Tensor]
                self._conversions.append("placeholders")
            elif p.kind is not inspect.Parameter.KEYWORD_ONLY:
                self._conversions.append(None)
            parameters.append(p.replace(annotation=hint))

        @functools.wraps(launcher)  # torch.library finds the kernels through __wrapped__
        def from_op(*args, **kwargs):
            return launcher(*self._launcher_args(args), **kwargs)

        from_op.__signature__ = signature.replace(parameters=parameters, return_annotation=hints["return"])
        if USE_TRITON_OP:
            self.op = torch.library.triton_op(name, from_op, mutates_args=tuple(mutates_args))
        else:
            self.op = torch.library.custom_op(name, from_op, mutates_args=tuple(mutates_args))
            self.op.register_fake(from_op)

    def on(self, traced: bool) -> Callable:
        """``traced`` or ``eager``, as the caller's tensors need."""
        return self.traced if traced else self.eager

    def traced(self, *args, tiling=None, **kwargs):
        """The op on the launcher's arguments (``tiling`` is the op's own business)."""
        return self.op(*self.op_args(*args), **kwargs)

    def op_args(self, *args) -> list:
        """The op's positional arguments from the launcher's."""
        like = args[0] if isinstance(args[0], torch.Tensor) else args[0][0]
        flat = []
        for value, conversion in zip(args, self._conversions):
            if conversion is None:
                flat.append(value)
            elif conversion == "placeholders":
                flat.append([placeholder(like) if t is None else t for t in value])
            else:
                flat += [list(v) if isinstance(v, tuple) else v for v in value]
        return flat

    def _launcher_args(self, flat: tuple) -> list:
        """The launcher's positional arguments from the op's."""
        args, i = [], 0
        for conversion in self._conversions:
            if conversion is None:
                args.append(flat[i])
            elif conversion == "placeholders":
                args.append([None if t.numel() == 0 else t for t in flat[i]])
            else:
                n = len(conversion._fields)
                args.append(conversion(*flat[i:i + n]))
                i += n - 1
            i += 1
        return args


def kernel_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Registers the decorated launcher as the torch.library op ``name`` (see KernelOp)."""
    return lambda launcher: KernelOp(name, launcher, mutates_args)


def runs_eagerly(x: torch.Tensor) -> bool:
    """Whether an op on x may launch through a plain autograd.Function and the launchers instead
    of its torch.library ops: plain tensors, and nothing tracing or intercepting ops
    (torch.compile, a dispatch mode such as fake tensors or functionalization, a functorch
    transform)."""
    return (is_plain(x) and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and not torch._C._are_functorch_transforms_active())


def eager_apply(function: type) -> Callable:
    """The C-level apply of autograd.Function ``function``, for eager calls only (runs_eagerly):
    Function.apply's Python prologue (binding setup_context's arguments, functorch's checks and
    dead-wrapper unwrapping) costs microseconds a call and has nothing to do there, since no
    functorch transform is active and the Function defines no setup_context."""
    if function.setup_context is not torch.autograd.Function.setup_context:
        raise TypeError(f"{function.__name__} defines setup_context: its apply needs Function.apply's prologue")
    return super(torch.autograd.Function, function).apply
