"""Activation recomputation for the fused ops: keep raw conv outputs, not BN+ReLU outputs.

The fused ops already keep only their raw inputs and per-channel statistics for their own
backward, but whatever consumes their output (the next convolution, a max-pool) saves that output
too. Within :func:`recompute_activations`, those consumers save a recipe instead: in backward the
activation is rebuilt by one apply pass over the raw inputs with the batch statistics of the
forward (never recomputed, and the running statistics never updated twice), bit for bit the same.

The cost is one extra read of the raw inputs and one write per activation in backward; the
saving is the activation itself. Eager mode only: under torch.compile, Inductor's partitioner
makes its own recomputation choices.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch

# id(output) -> (weak reference to the output, function that recomputes it)
_recipes: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}
_depth = 0


def recording() -> bool:
    """Whether the fused ops should register recipes for their outputs."""
    return _depth > 0 and torch.is_grad_enabled()


def register(output: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> None:
    """Lets consumers of ``output`` save ``recompute`` in its place (while the output lives)."""
    key = id(output)
    _recipes[key] = (weakref.ref(output, lambda _: _recipes.pop(key, None)), recompute)


class _Recipe:
    __slots__ = ("recompute",)

    def __init__(self, recompute: Callable[[], torch.Tensor]):
        self.recompute = recompute


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active around recompute_activations."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def _outer_hooks():
    # The enclosing saved_tensors_hooks (say, CPU offloading or a measurement), so that tensors
    # this block keeps still go through them. A private torch API (torch >= 2.0): called
    # directly, so that a torch without it fails here rather than bypass the outer hooks.
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


@contextlib.contextmanager
def recompute_activations() -> Iterator[None]:
    """Within the block, outputs of the fused ops (Triton backend) are recomputed in backward
    instead of being saved by the ops that consume them."""
    global _depth
    outer = _outer_hooks()

    def pack(tensor: torch.Tensor):
        entry = _recipes.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return _Recipe(entry[1])
        return tensor if outer is None else _Outer(outer[0](tensor))

    def unpack(saved):
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.recompute()
        if isinstance(saved, _Outer):
            return outer[1](saved.packed)
        return saved

    _depth += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _depth -= 1
