"""FractalNet (Larsson, Maire, Shakhnarovich, ICLR 2017) on the fused ops of fractal_kernels.

A fractal block with C columns follows the expansion rule f_1(z) = conv(z),
f_{C+1}(z) = join(f_C(f_C(z)), conv(z)). Laid out as columns, column k (1 = shallowest) is a chain
of 2^(k-1) conv units, each spanning 2^(C-k) of the block's 2^(C-1) rows. After every row the
columns whose unit ends there are averaged by one multi-input join (as the official
implementation does) and the join feeds each of them; a row where only the deepest column ends
has no join.

With ``fused=True`` each join is one ``join_bn_relu`` over the raw (post-dropout) conv outputs of
the columns ending there, with those units' own BatchNorm parameters and buffers, and a unit that
ends alone uses ``bn_relu``; with ``fused=False`` the units run nn.BatchNorm2d and ReLU and the
join is the plain-PyTorch reference, the eager baseline. Both build the same modules, so their
state_dicts are interchangeable. The package launches nothing itself: it calls fractal_kernels.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import fractal_kernels as fk
from fractal_kernels import reference

from .drop_path import DropPath, chosen_column, copy_to_device, real_host_draws


class ConvUnit(nn.Module):
    """The paper's unit: 3x3 conv (no bias) -> dropout -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn = nn.BatchNorm2d(out_channels)

    def activate(self, raw: torch.Tensor, track_running_stats: bool = True) -> torch.Tensor:
        """Dropout, BatchNorm and ReLU of the conv output, unfused (nn.Dropout, nn.BatchNorm2d, ReLU);
        in training without ``track_running_stats`` the batch statistics leave the running ones alone."""
        if track_running_stats or not self.bn.training:
            return F.relu(self.bn(self.dropout(raw)))
        return F.relu(F.batch_norm(self.dropout(raw), None, None, self.bn.weight, self.bn.bias, True, 0.0, self.bn.eps))

    @property
    def dropout_rate(self) -> float:
        """The dropout rate in effect: 0 without dropout or when it is in eval mode."""
        dropout = self._modules["dropout"]  # not nn.Module.__getattr__: a microsecond a lookup, per step and unit
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def fused_arguments(self) -> dict:
        """The fused ops' arguments for this unit: its BatchNorm's (fk.batchnorm_arguments) and
        its dropout rate in effect."""
        args = fk.batchnorm_arguments(self._modules["bn"])
        args["dropout"] = self.dropout_rate
        return args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))

    def layers(self) -> list[nn.Module]:
        """Copies of the unit's layers, as a plain network would hold them."""
        return [copy.deepcopy(self.conv), copy.deepcopy(self.dropout), copy.deepcopy(self.bn), nn.ReLU()]


@dataclass(frozen=True)
class Execution:
    """How a FractalNet's units run, network-wide: set on the model (its ``fused``,
    ``skip_dropped`` and ``process_group``), which hands one to its blocks and stem.

    fused: the fused Triton ops, or nn.BatchNorm2d, ReLU and the reference join.
    skip_dropped: in training, compact column segments (see FractalNet).
    process_group: the ranks whose batch statistics the fused BatchNorms share in training.
    A combination that cannot work raises where it is set."""

    fused: bool = True
    skip_dropped: bool = False
    process_group: object = None

    def __post_init__(self):
        if self.process_group is not None and self.skip_dropped:
            raise ValueError("skip_dropped and process_group do not combine: compact column segments keep per-rank "
                             "BatchNorm statistics; set model.process_group = None or skip_dropped=False")
        if self.process_group is not None and not self.fused:
            raise ValueError("process_group: the unfused model's nn.BatchNorm2d keeps per-rank statistics; convert "
                             "it with nn.SyncBatchNorm.convert_sync_batchnorm, or use fused=True")


class _ZeroGradients(torch.autograd.Function):
    """The identity on ``out`` that gives each of ``params`` a zero gradient: the parameters a
    training step does not reach (the other columns of a global batch, the units of an empty
    skip_dropped segment) get one, as they do where a compiled step's masks drop them."""

    @staticmethod
    def forward(ctx, out, *params):
        ctx.params = params
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        # A gradient that exists already is left as it is (adding zeros would change nothing and
        # cost a launch a parameter); traced, the graph returns the zeros.
        compiling = torch.compiler.is_compiling()
        return (grad, *[torch.zeros_like(p) if compiling or p.grad is None else None for p in ctx.params])


class DropoutSeeds:
    """The dropout seeds of one training step, drawn at once (one launch) and handed to the fused
    units in forward order."""

    def __init__(self, count: int, device: torch.device):
        self.seeds = torch.randint(2**62, (count,), device=device)
        self.used = 0

    def take(self, n: int) -> torch.Tensor:
        seeds = self.seeds[self.used:self.used + n]
        self.used += n
        return seeds


def _shared_arguments(a: dict) -> tuple:
    """The fused ops' arguments a join's units must share."""
    return a["training"], a["momentum"], a["eps"], a["dropout"]


def _per_unit_arguments(a: dict) -> tuple:
    """The fused ops' arguments a join takes one per unit."""
    return a["weight"], a["bias"], a["running_mean"], a["running_var"], a["num_batches_tracked"]


def normalize_and_join(units: Sequence[ConvUnit], raws: Sequence[torch.Tensor], execution: Execution,
                       mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                       seeds: Optional[DropoutSeeds] = None, track_running_stats: bool = True) -> torch.Tensor:
    """Dropout, BatchNorm and ReLU of each unit's conv output, then their join by drop-path
    ``mask``, or by gather table ``rows`` for compact outputs (skip_dropped, where one unit may be
    left: its output is still spread over the batch). A lone unit without a table has no join.
    Fused (``execution``), the ops take the dropout inside their kernels, seeded from ``seeds``,
    and with a process group use batch statistics over its ranks. Without
    ``track_running_stats`` (training only) the running statistics are left unchanged."""
    process_group = execution.process_group
    if not execution.fused:
        activations = [unit.activate(raw, track_running_stats) for unit, raw in zip(units, raws)]
        if rows is None and len(units) == 1:
            return activations[0]
        if rows is not None:
            return reference.gather_join(activations, rows)
        return reference.masked_join(activations, mask)
    args = [unit.fused_arguments() for unit in units]
    if not track_running_stats:
        # A BatchNorm frozen with .eval() keeps normalising by its running statistics.
        for a in args:
            if a["training"]:
                a.update(running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.0)
    shared = _shared_arguments(args[0])
    if (len(units) > 1 or rows is not None) and all(_shared_arguments(a) == shared for a in args):
        training, momentum, eps, dropout = shared
        weights, biases, running_means, running_vars, counters = zip(*map(_per_unit_arguments, args))
        unit_seeds = seeds.take(len(units)) if dropout else None
        if rows is not None:
            return fk.gather_join_bn_relu(raws, rows, weights, biases, running_means, running_vars, training, momentum,
                                          eps, num_batches_tracked=counters, dropout=dropout, seeds=unit_seeds)
        return fk.join_bn_relu(raws, mask, weights, biases, running_means, running_vars, training, momentum, eps,
                               process_group, num_batches_tracked=counters, dropout=dropout, seeds=unit_seeds)
    # A lone unit, or units that disagree (say, one BatchNorm frozen with .eval()): normalise
    # each, then join.
    activations = [fk.bn_relu(raw, **a, seed=seeds.take(1) if a["dropout"] else None, process_group=process_group)
                   for raw, a in zip(raws, args)]
    if rows is not None:
        return fk.gather_join(activations, rows)
    return activations[0] if len(units) == 1 else fk.masked_join(activations, mask)


class FractalBlock(nn.Module):
    """One fractal block of ``columns`` columns; ``self.columns[k - 1][u]`` is unit u of column k."""

    def __init__(self, in_channels: int, out_channels: int, columns: int, dropout: float):
        super().__init__()
        #: Set by the FractalNet that holds the block.
        self.execution = Execution()
        self.num_columns = columns
        self.columns = nn.ModuleList(
            nn.ModuleList(
                ConvUnit(in_channels if unit == 0 else out_channels, out_channels, dropout) for unit in range(2**k)
            )
            for k in range(columns)
        )

    def span(self, column: int) -> int:
        """Rows spanned by one unit of ``column`` (1-based)."""
        return 2 ** (self.num_columns - column)

    def endings(self, active: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(row, the active columns whose unit ends there) for each row where one does."""
        rows = [(row, [c for c in active if row % self.span(c) == 0])
                for row in range(1, 2 ** (self.num_columns - 1) + 1)]
        return [(row, ending) for row, ending in rows if ending]

    def unit(self, column: int, row: int) -> ConvUnit:
        """The unit of ``column`` that ends at ``row``."""
        return self.columns[column - 1][row // self.span(column) - 1]

    def forward(self, x: torch.Tensor, active: Sequence[int], masks: dict[int, torch.Tensor],
                seeds: Optional[DropoutSeeds] = None, track_running_stats: bool = True,
                unreached: Optional[list] = None):
        """The block restricted to the ``active`` columns (ascending), with the drop-path masks of
        its joins by row (none outside training) and the fused units' dropout seeds, run as its
        ``execution`` says; without ``track_running_stats`` its BatchNorms leave their running
        statistics unchanged. Units of the active columns that the output does not depend on
        (those of skip_dropped segments no sample survives) are appended to ``unreached``."""
        endings = self.endings(active)
        if self.execution.skip_dropped and masks:
            return self._forward_skipping_dropped(x, active, endings, masks, seeds,
                                                  [] if unreached is None else unreached)
        inputs = {column: x for column in active}
        for row, ending in endings:
            units = [self.unit(column, row) for column in ending]
            raws = [unit.conv(inputs[column]) for unit, column in zip(units, ending)]
            out = normalize_and_join(units, raws, self.execution, mask=masks.get(row), seeds=seeds,
                                     track_running_stats=track_running_stats)
            inputs.update((column, out) for column in ending)
        return out

    def _forward_skipping_dropped(self, x, active, endings, masks, seeds, unreached):
        """Each column segment (its units from one join to the next) runs only on the samples
        that survive at the join ending it: their rows are gathered at the segment's start, and
        the join reads the compact outputs through a gather table. The masks are on the host, so
        the compact sizes are known without reading anything back from the device."""
        ending_at = dict(endings)
        inputs = {column: x for column in active}
        segments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # column -> (compact tensor, host samples)
        for row, ending in endings:
            for column in ending:
                if column not in segments:
                    end = next(r for r in masks if r >= row and column in ending_at[r])
                    samples = masks[end][ending_at[end].index(column)].nonzero().squeeze(1)
                    segments[column] = (inputs[column].index_select(0, copy_to_device(samples, x.device)), samples)
            units = [self.unit(column, row) for column in ending]
            raws = [unit.conv(segments[column][0]) for unit, column in zip(units, ending)]
            if row not in masks:  # a lone unit inside a segment
                (column,) = ending
                samples = segments[column][1]
                # A segment without samples stays empty (BatchNorm of no rows is undefined).
                compact = normalize_and_join(units, raws, self.execution, seeds=seeds) if len(samples) else raws[0]
                if not len(samples):
                    unreached.extend(units)
                segments[column] = (compact, samples)
                continue
            samples = [segments.pop(column)[1] for column in ending]
            # A segment no sample survives contributes nothing: it is left out of the join.
            present = [j for j, s in enumerate(samples) if len(s)]
            unreached.extend(unit for unit, s in zip(units, samples) if not len(s))
            if not present:
                out = x.new_zeros((x.shape[0],) + raws[0].shape[1:])
            else:
                table = torch.full((len(present), x.shape[0]), -1, dtype=torch.int64)
                for j, i in enumerate(present):
                    table[j, samples[i]] = torch.arange(len(samples[i]))
                out = normalize_and_join([units[i] for i in present], [raws[i] for i in present], self.execution,
                                         rows=copy_to_device(table, x.device), seeds=seeds)
            inputs.update((column, out) for column in ending)
        return out


class ImageNetStem(nn.Module):
    """7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        #: Set by the FractalNet that holds the stem.
        self.execution = Execution()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.execution.fused:
            h = fk.bn_relu(h, **fk.batchnorm_arguments(self.bn), process_group=self.execution.process_group)
        else:
            h = F.relu(self.bn(h))
        return self.pool(h)

    def layers(self) -> list[nn.Module]:
        return [copy.deepcopy(self.conv), copy.deepcopy(self.bn), nn.ReLU(), copy.deepcopy(self.pool)]


#: How a global draw chooses its column: uniformly (the paper's), or in proportion to its depth.
GLOBAL_COLUMNS = ("uniform", "by-depth")


def _execution_field(name: str) -> property:
    """A FractalNet attribute that is a field of its Execution: setting it hands the model and its
    blocks a new Execution (which checks the combination)."""

    def set_field(model, value):
        model.execution = replace(model.execution, **{name: value})

    return property(lambda model: getattr(model.execution, name), set_field,
                    doc=f"The ``{name}`` of the model's :class:`Execution`.")


class FractalNet(nn.Module):
    """FractalNet: one fractal block per width, each followed by a 2x2 max-pool (join, then pool),
    then global average pooling and a linear head.

    Args:
        num_classes: outputs of the linear head.
        in_channels: input channels.
        widths: channels of each block.
        columns: C, the columns of every block (the deepest has 2^(C-1) units).
        dropout: dropout rate of each block's units (after the conv, as the paper's code).
        local_drop: local drop-path rate of a join input.
        global_ratio: fraction of the samples that are global (follow one column everywhere).
        global_columns: how a global sample's (or batch's) column is chosen among the active
            ones: "uniform" (the paper's) or "by-depth" (in proportion to the column's depth,
            2^(c-1): the deepest column of C = 4 gets 8/15 of the global draws, not 1/4).
        fused: the fused Triton ops (True) or nn.BatchNorm2d, ReLU and the reference join (False).
        recompute: with ``fused``, save each BN+ReLU output only as a recipe and rebuild it in
            backward by one apply pass from the raw conv outputs and batch statistics that the
            fused ops keep anyway. Costs one extra read of the raw outputs and one write per
            activation in backward (memory-bound, no convolution rerun, no statistics recomputed);
            saves the activations the next convolutions and pools would keep. Eager mode, Triton
            backend; ignored under torch.compile, whose partitioner decides what to recompute.
        imagenet_stem: a 7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem, and no pool after the
            last block (FractalNet-34); otherwise no stem and a pool after every block (CIFAR).
        drop_path_per: "batch" (one draw for the whole batch, as the paper's code does: a
            global batch runs its column alone and leaves the running statistics unchanged) or
            "sample" (each sample draws its own, as the PyTorch ports do). Per sample, the
            40-layer network trains badly (docs/experiments/drop-path.md). A compiled
            ``model(x)`` cannot branch on a host draw: there a global batch runs every column,
            the masks keeping only its own, and the running statistics are put back after it:
            the same step, in one graph; ``structure=`` (as the training loop passes it) compiles
            one graph per structure, the step eager mode takes.
        skip_dropped: in training, run each column segment only on the samples that survive at
            the join ending it (drop-path makes the rest wasted work), and join the compact
            outputs with gather_join_bn_relu. The BatchNorm statistics of a segment then cover
            the samples that flow through it: the one difference from the dense model. Its
            drop-path masks are drawn on the host (a CPU generator), so that the compact sizes
            are known without reading anything back from the device.

    Setting ``model.process_group`` (a torch.distributed group of several ranks) makes the fused
    model's BatchNorms use batch statistics over those ranks in training, as nn.SyncBatchNorm.
    ``fused``, ``skip_dropped`` and ``process_group`` are the model's :class:`Execution`, which its
    blocks share; setting one to a combination that cannot work (a process group with
    skip_dropped, or unfused) raises there.

    In training, every parameter gets a gradient every step, zeros where the step does not reach
    it (the other columns of a global batch or a truncation, the units of an empty skip_dropped
    segment), so that momentum and weight decay move every parameter every step, as the paper's
    code does, whatever the loop (``zero_grad()`` to None or not) and the compiler.

    ``model(x, columns=k)`` runs the network truncated to its k shallowest columns (the fractal
    f_k; in training with drop-path among them); ``model(x, column=k)`` runs column k alone.
    In training with drop-path drawn per batch, ``model(x, structure=s)`` takes structure s
    instead of drawing one (see :meth:`structures` and :meth:`draw_structure`): "local" (the
    masks drawn from ``generator`` where its device is, by default on x's device from its default
    generator) or a column c (a global batch of column c): one CUDA graph, or one compiled graph,
    per structure then serves every step (fractalnet.graphs; the training loop passes the
    structure it draws in every mode).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        columns: int = 3,
        dropout: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4),
        local_drop: float = 0.15,
        global_ratio: float = 0.5,
        fused: bool = True,
        recompute: bool = False,
        imagenet_stem: bool = False,
        skip_dropped: bool = False,
        drop_path_per: str = "batch",
        global_columns: str = "uniform",
    ):
        super().__init__()
        widths, dropout = list(widths), list(dropout)
        if not widths or len(widths) != len(dropout):
            raise ValueError(f"widths and dropout need one entry per block; got {len(widths)} and {len(dropout)}")
        if not isinstance(columns, int) or columns < 1:
            raise ValueError(f"columns must be a positive integer, got {columns!r}")
        for name, value in [("local_drop", local_drop), ("global_ratio", global_ratio)] + [
            (f"dropout[{i}]", p) for i, p in enumerate(dropout)
        ]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if num_classes < 1 or in_channels < 1 or min(widths) < 1:
            raise ValueError("num_classes, in_channels and widths must be positive")
        if drop_path_per not in ("sample", "batch"):
            raise ValueError(f"drop_path_per must be 'sample' or 'batch', got {drop_path_per!r}")
        if global_columns not in GLOBAL_COLUMNS:
            raise ValueError(f"global_columns must be one of {', '.join(GLOBAL_COLUMNS)}, got {global_columns!r}")
        self.drop_path_per = drop_path_per
        self.global_columns = global_columns
        self.num_columns = columns
        self.local_drop = local_drop
        self.global_ratio = global_ratio
        self.recompute = recompute
        self.stem = ImageNetStem(in_channels, widths[0]) if imagenet_stem else None
        self.pool_last = not imagenet_stem
        block_inputs = [widths[0] if imagenet_stem else in_channels] + widths[:-1]
        self.blocks = nn.ModuleList(
            FractalBlock(cin, cout, columns, p) for cin, cout, p in zip(block_inputs, widths, dropout)
        )
        self.execution = Execution(fused, skip_dropped)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(widths[-1], num_classes)
        self.last_drop_path: Optional[DropPath] = None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    @property
    def execution(self) -> Execution:
        """How the units run (fused, skip_dropped, process_group): the model's and its blocks'."""
        return self._execution

    @execution.setter
    def execution(self, execution: Execution) -> None:
        self._execution = execution
        for module in (*self.blocks, self.stem):
            if module is not None:
                module.execution = execution

    fused = _execution_field("fused")
    skip_dropped = _execution_field("skip_dropped")
    process_group = _execution_field("process_group")

    @property
    def min_image_size(self) -> int:
        """The least input height and width the network takes: each block's 2x2 max-pool (and
        the ImageNet stem's two stride-2 layers) must leave at least one pixel."""
        def output(size: int) -> int:
            if self.stem is not None:
                size = (size - 1) // 2 + 1  # the 7x7/2 conv, padding 3
                size = (size - 1) // 2 + 1  # the 3x3/2 max-pool, padding 1
            for _ in range(len(self.blocks) if self.pool_last else len(self.blocks) - 1):
                size //= 2
            return size

        return next(size for size in itertools.count(1) if output(size) >= 1)

    def active_columns(self, columns: Optional[int] = None, column: Optional[int] = None) -> list[int]:
        """The columns a forward pass runs (1-based, ascending)."""
        if columns is not None and column is not None:
            raise ValueError("give columns= (a truncation) or column= (one column), not both")
        for name, k in (("columns", columns), ("column", column)):
            if k is not None and (not isinstance(k, int) or not 1 <= k <= self.num_columns):
                raise ValueError(f"{name} must be an integer from 1 to {self.num_columns}, got {k!r}")
        if column is not None:
            return [column]
        return list(range(1, (columns or self.num_columns) + 1))

    def forward(
        self,
        x: torch.Tensor,
        columns: Optional[int] = None,
        column: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        structure: Union[str, int, None] = None,
    ) -> torch.Tensor:
        active = self.active_columns(columns, column)
        drop_path = None
        track_running_stats = True
        restored = None  # traced per-batch drop-path: (global batch?, running buffers, their values before)
        if structure is not None:
            self._check_structure(structure, active)
            if structure != "local":  # a global batch of that column: it runs alone (see below)
                active, track_running_stats = [structure], False
        if self.training and len(active) > 1:
            # skip_dropped sizes its segments from the masks, and a batch drawn as a whole is
            # global or not: drawn on the host, both are known there without a synchronisation.
            per_batch = self.drop_path_per == "batch"
            host_draw = self.skip_dropped or (per_batch and structure is None)
            if host_draw and generator is not None and generator.device.type != "cpu":
                raise ValueError("generator: skip_dropped and per-batch drop-path draw on the host; "
                                 "pass a CPU generator")
            device = torch.device("cpu") if self.skip_dropped else x.device
            drop_path = DropPath(x.shape[0], active, self.num_columns, len(self.blocks), self.local_drop,
                                 self.global_ratio, device, generator, per_batch=per_batch, local=structure == "local",
                                 column_weights=self.column_weights(active))
            if per_batch and structure is None and torch.compiler.is_compiling():
                # Traced, a host branch would break the graph: every column runs, the masks
                # dropping all but a global batch's own (the same output and gradients, zeros for
                # the other columns), and the running statistics are put back after a global batch.
                bns = [unit.bn for unit in self.units()]
                restored = (drop_path.is_global[0], bns, [{n: b.clone() for n, b in bn.named_buffers()} for bn in bns])
            elif per_batch and drop_path.batch_column is not None:
                # The whole batch follows one column: run that column alone (the others would
                # only feed joins that drop them). Its BatchNorms see a single column, not the
                # network that eval runs, so their running statistics are left unchanged.
                active, track_running_stats = [drop_path.batch_column], False
        self.last_drop_path = drop_path
        seeds = None
        if self.fused and self.training and any(unit.dropout_rate for unit in self.units()):
            seeds = DropoutSeeds(sum(1 for _ in self.units()), x.device)
        # Under torch.compile the partitioner makes its own recomputation choices.
        recompute = self.recompute and self.fused and self.training and not torch.compiler.is_compiling()
        unreached = []
        with fk.recompute_activations() if recompute else contextlib.nullcontext():
            h = self.stem(x) if self.stem is not None else x
            for i, block in enumerate(self.blocks):
                masks = ({row: drop_path.mask(i, row) for row in drop_path.rows}
                         if len(active) > 1 and drop_path is not None else {})
                h = block(h, active, masks, seeds, track_running_stats, unreached)
                if self.pool_last or i < len(self.blocks) - 1:
                    h = self.pool(h)
        out = self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        if restored is not None:
            # New tensors, not in-place copies: the BatchNorms saved their buffers for backward.
            is_global, bns, before = restored
            for bn, buffers in zip(bns, before):
                for name, value in buffers.items():
                    setattr(bn, name, torch.where(is_global, value, getattr(bn, name)))
        if self.training and torch.is_grad_enabled():
            # Every parameter gets a gradient every step, zeros where the step does not reach it,
            # whatever the loop and the compiler (DESIGN.md, "Training semantics").
            unreached.extend(unit for block in self.blocks for k, column in enumerate(block.columns, 1)
                             if k not in active for unit in column)
            params = [p for unit in unreached for p in unit.parameters() if p.requires_grad]
            if params:
                out = _ZeroGradients.apply(out, *params)
        return out

    def structures(self, columns: Optional[int] = None) -> list:
        """The drop-path structures a training step of the truncation to ``columns`` can take: drawn
        per batch, "local" and each active column (a global batch); per sample, one (None)."""
        active = self.active_columns(columns)
        return ["local", *active] if self.drop_path_per == "batch" and len(active) > 1 else [None]

    def draw_structure(self, generator: Optional[torch.Generator] = None, columns: Optional[int] = None):
        """The drop-path structure of a training step drawn per batch, on the host: with
        probability ``global_ratio`` a global batch of one active column (as ``global_columns`` says),
        otherwise "local"; two numbers from the CPU ``generator`` (or torch's), so that ranks
        seeded alike draw alike. None where :meth:`structures` has one (drawn per sample, or one
        column). What ``model(x, structure=...)`` takes: the training loop draws it for eager,
        compiled and graphed steps alike."""
        structures = self.structures(columns)
        if structures == [None]:
            return None
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator: the structure is drawn on the host; pass a CPU generator")
        with real_host_draws():
            first, second = torch.rand(2, generator=generator).tolist()
        if first < self.global_ratio:
            return structures[1 + chosen_column(second, len(structures) - 1, self.column_weights(structures[1:]))]
        return "local"

    def column_weights(self, columns: Sequence[int]) -> Optional[list[float]]:
        """The relative odds of each of ``columns`` for a global draw: None for uniform."""
        return [2.0 ** (c - 1) for c in columns] if self.global_columns == "by-depth" else None

    def _check_structure(self, structure, active: list[int]) -> None:
        if not self.training or self.drop_path_per != "batch" or self.skip_dropped or len(active) < 2:
            raise ValueError("structure: a forced drop-path structure is for training a model that draws drop-path "
                             "per batch over two or more columns, without skip_dropped")
        if structure != "local" and (isinstance(structure, bool) or structure not in active):
            raise ValueError(f"structure must be 'local' or one of the active columns {active}, got {structure!r}")

    def units(self) -> Iterator[ConvUnit]:
        """Every conv unit of the network, block by block."""
        for block in self.blocks:
            for column in block.columns:
                yield from column

    def extract_column(self, column: int) -> nn.Sequential:
        """Column ``column`` as a plain nn.Sequential with no joins: the paper's extraction of a
        fixed-depth subnetwork. Its layers are copies (it trains on its own), and its eval output
        equals ``model(x, column=column)``. A fused model's copy uses FusedBatchNormReLU2d."""
        (column,) = self.active_columns(column=column)
        layers = self.stem.layers() if self.stem is not None else []
        for i, block in enumerate(self.blocks):
            for unit in block.columns[column - 1]:
                layers += unit.layers()
            if self.pool_last or i < len(self.blocks) - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), copy.deepcopy(self.head)]
        plain = nn.Sequential(*layers)
        if self.fused:
            fk.fuse_batchnorm_relu(plain)
        return plain
