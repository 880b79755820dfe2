"""The public ops, one record each, as the tests, the GPU check, the benchmarks and the traffic
model call them: adding an op adds a record here (and its kernels, launchers and reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class OpInputs:
    """One call's tensors: inputs, join (drop-path ``mask`` or gather table ``rows``, or
    neither), per-input BatchNorm parameters and statistics (empty lists for a join), and the
    output gradient where a caller takes one."""

    xs: list[torch.Tensor]
    mask: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    weights: list = ()
    biases: list = ()
    running_means: list = ()
    running_vars: list = ()
    grad: Optional[torch.Tensor] = None

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [*self.xs, *self.weights, *self.biases]


@dataclass(frozen=True)
class OpSpec:
    """One public op: ``batch_norm`` (per-input BatchNorm(+ReLU) before the join) and its
    ``join``: "none" (one input, no join), "mask" (a drop-path mask, or None: the mean) or
    "rows" (compact inputs and their gather table)."""

    name: str
    batch_norm: bool
    join: str

    @property
    def single_input(self) -> bool:
        return self.join == "none"

    def call(self, fn: Callable, inputs: OpInputs, training: bool = True) -> torch.Tensor:
        """``fn`` (this op of some implementation: fractal_kernels', the reference's, a compiled
        one) on ``inputs``, in training mode or not (BatchNorm ops)."""
        args = [inputs.xs[0]] if self.single_input else [inputs.xs]
        if self.join != "none":
            args.append(inputs.rows if self.join == "rows" else inputs.mask)
        if not self.batch_norm:
            return fn(*args)
        params = (inputs.weights, inputs.biases, inputs.running_means, inputs.running_vars)
        if self.single_input:
            params = tuple(p[0] for p in params)
        return fn(*args, *params, training)


OPS = {
    spec.name: spec
    for spec in (
        OpSpec("masked_join", False, "mask"),
        OpSpec("gather_join", False, "rows"),
        OpSpec("bn_relu", True, "none"),
        OpSpec("join_bn_relu", True, "mask"),
        OpSpec("gather_join_bn_relu", True, "rows"),
    )
}


def full_table(k: int, batch: int, device=None) -> torch.Tensor:
    """The gather table of k inputs that each hold every sample, in order."""
    return torch.arange(batch, device=device).expand(k, batch).contiguous()
