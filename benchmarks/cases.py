"""Benchmark cases: the real join and unit shapes of the paper's networks, and the goals and
input counts of each op (fractal_kernels.testing.OPS says how to call it)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

import fractal_kernels as fk
from fractal_kernels import reference
from fractal_kernels.testing.ops import OPS as SPECS
from fractal_kernels.testing.ops import OpInputs, OpSpec
from fractal_kernels.testing.traffic import minimal_bytes
from fractalnet import DropPath

#: (batch, [(channels, spatial size) of each block]) of the benchmarked networks.
NETWORKS = {
    "fractalnet20_cifar": (100, [(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)]),
    "fractalnet34_imagenet": (32, [(64, 56), (128, 28), (256, 14), (512, 7)]),
}
#: The --quick subset: the first and last CIFAR blocks and the first ImageNet block.
QUICK_SHAPES = {(100, 64, 32, 32), (100, 512, 2, 2), (32, 64, 56, 56)}
IMPLEMENTATIONS = ("eager", "compile", "fused")
DIRECTIONS = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Benchmarked:
    """One op as the benchmarks see it: its record (fractal_kernels.testing.OPS), the input
    counts ``ks`` benchmarked, and its goals: the least speedups over eager and over
    torch.compile and the least fraction of copy bandwidth, forward+backward (None: no goal).
    A masked op is benchmarked with and without its mask; a gathered op's inputs are compact
    column segments, the samples a drop-path draw keeps, with their gather table."""

    spec: OpSpec
    ks: tuple[int, ...]
    eager_goal: Optional[float] = None
    compile_goal: Optional[float] = None
    copy_goal: Optional[float] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def batch_norm(self) -> bool:
        return self.spec.batch_norm

    @property
    def masked(self) -> bool:
        return self.spec.join == "mask"

    @property
    def gathered(self) -> bool:
        return self.spec.join == "rows"


OPS = {
    bench.name: bench
    for bench in (
        Benchmarked(SPECS["masked_join"], (2, 3, 4), 4.0, None, 0.90),
        Benchmarked(SPECS["bn_relu"], (1,), 1.5),
        Benchmarked(SPECS["join_bn_relu"], (2, 3, 4), 3.0, 1.3, 0.80),
        Benchmarked(SPECS["gather_join"], (3,)),
        Benchmarked(SPECS["gather_join_bn_relu"], (3,)),
    )
}


def shapes(quick: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(network, [N, C, H, W]) of every block's units and joins."""
    return [
        (network, (batch, c, s, s))
        for network, (batch, blocks) in NETWORKS.items()
        for c, s in blocks
        if not quick or (batch, c, s, s) in QUICK_SHAPES
    ]


@dataclass(frozen=True)
class OpCase:
    op: str
    k: int
    network: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    channels_last: bool

    @property
    def benchmarked(self) -> Benchmarked:
        return OPS[self.op]

    @property
    def label(self) -> str:
        layout = "nhwc" if self.channels_last else "nchw"
        name = self.op if self.benchmarked.ks == (1,) else f"{self.op} k={self.k}"
        return f"{name} {'x'.join(map(str, self.shape))} {str(self.dtype)[6:]} {layout}"

    def drop_path_mask(self, seed: int = 0) -> Optional[torch.Tensor]:
        """A real drop-path draw for a join of the deepest k of four columns (local rate 0.15, half
        the samples global), on the CPU; None for an op without a mask (a gathered op's inputs
        are the rows this draw keeps: gather_table)."""
        if not (self.benchmarked.masked or self.benchmarked.gathered):
            return None
        drop_path = DropPath(self.shape[0], [1, 2, 3, 4], 4, 1, 0.15, 0.5, torch.device("cpu"),
                             torch.Generator().manual_seed(seed))
        return drop_path.mask(0, {2: 2, 3: 4, 4: 8}[self.k])

    def gather_table(self) -> tuple[torch.Tensor, list[int]]:
        """A gathered op's table ([k, batch], the row of input i that holds sample b, or -1) and
        its inputs' row counts: the samples the case's drop-path draw keeps (real CPU tensors,
        also inside a FakeTensorMode)."""
        with unset_fake_temporarily():
            kept = self.drop_path_mask()
            rows = torch.where(kept, kept.long().cumsum(1) - 1, -1)
            return rows, kept.sum(1).tolist()

    def make(self, device: torch.device, mask: Optional[torch.Tensor], seed: int = 0) -> OpInputs:
        """Random inputs on ``device`` (fake ones inside a FakeTensorMode) with the given mask (a
        gathered op: compact inputs with its gather_table)."""
        gen = torch.Generator().manual_seed(seed)
        channels = self.shape[1]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format

        def tensor(*shape, grad=False, dtype=self.dtype):
            t = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
            return t.requires_grad_(grad)

        rows = None
        sizes = [self.shape[0]] * self.k
        if self.benchmarked.gathered:
            table, sizes = self.gather_table()
            rows, mask = torch.tensor(table.tolist(), device=device), None
        xs = [tensor(size, *self.shape[1:]).to(memory_format=layout).requires_grad_() for size in sizes]
        bn = self.benchmarked.batch_norm
        weights = [tensor(channels, grad=True, dtype=torch.float32) for _ in range(self.k)] if bn else []
        biases = [tensor(channels, grad=True, dtype=torch.float32) for _ in range(self.k)] if bn else []
        running_means = [torch.zeros(channels, device=device) for _ in range(self.k)] if bn else []
        running_vars = [torch.ones(channels, device=device) for _ in range(self.k)] if bn else []
        grad = tensor(*self.shape).to(memory_format=layout)
        return OpInputs(xs, mask, rows, weights, biases, running_means, running_vars, grad)

    def function(self, implementation: str, inputs: OpInputs) -> Callable[[], torch.Tensor]:
        """The op's forward (training mode for BatchNorm) with one implementation."""
        fn = {"eager": getattr(reference, self.op), "compile": _compiled(self.op),
              "fused": _fused(self.op)}[implementation]
        return lambda: self.benchmarked.spec.call(fn, inputs)

    def minimal_bytes(self, direction: str, mask: Optional[torch.Tensor]) -> int:
        """Bytes the fused design must move (fractal_kernels.testing.traffic.minimal_bytes)."""
        if self.benchmarked.gathered:
            rows, sizes = self.gather_table()
            xs = [torch.empty((size, *self.shape[1:]), dtype=self.dtype, device="meta") for size in sizes]
            return minimal_bytes(self.op, xs, rows=rows)[direction]
        xs = [torch.empty(self.shape, dtype=self.dtype, device="meta") for _ in range(self.k)]
        return minimal_bytes(self.op, xs, mask)[direction]


def op_cases(quick: bool, dtypes=(torch.float32, torch.bfloat16)) -> list[OpCase]:
    return [
        OpCase(op, k, network, shape, dtype, channels_last)
        for network, shape in shapes(quick)
        for op, spec in OPS.items()
        for k in spec.ks
        for dtype in dtypes
        for channels_last in (False, True)
    ]


@functools.lru_cache(maxsize=None)
def _compiled(op: str) -> Callable:
    """torch.compile of the reference op, specialised to each case's shapes: the limits on
    recompilation are raised so that no case silently falls back to eager."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4096))
    return torch.compile(getattr(reference, op), dynamic=False)


def _fused(op: str) -> Callable:
    fn = getattr(fk, op)

    def run(*args):
        with fk.use_backend("triton"):
            return fn(*args)

    return run
