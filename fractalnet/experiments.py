"""The paper's experiments as one command.

    python -m fractalnet.experiments {depth,drop-path,anytime,deepest,all} --dataset digits --out DIR [--seeds N]
    fractalnet experiments ...                                             (the same)

* depth: for C = 1..4 columns (depth 5, 10, 20, 40 with B = 5 blocks; fewer blocks where the image
  is too small for five poolings, said in the output): the FractalNet (the model's default
  drop-path), its deepest column, and the plain network of that depth trained alone (same widths,
  pooling, dropout and schedule): test error and final training loss.
* drop-path: none, local only, local + global drawn per sample (the PyTorch ports), the same with
  BatchNorm statistics over only the samples each segment carries (skip_dropped), and local +
  global drawn per batch (the paper's code, the model's default): the whole network and each
  column alone, with the running statistics training left and with statistics re-estimated for
  the network evaluated.
* anytime: error and measured latency of each column alone and each truncation, each with its
  own re-estimated BatchNorm statistics.
* deepest: why the deepest column of the deepest FractalNet does not stand alone: how many steps
  trained it alone, the plain net after as many, the column's error with each kind of BatchNorm
  statistics, and the same FractalNet with global columns chosen in proportion to their depth.

Every run trains with the training library's loop (fractalnet.training.fit), writes its checkpoint
and result under DIR/runs/, and is not repeated once finished (an interrupted one resumes). Each
experiment writes DIR/<experiment>.md (tables), .json (every number, with hardware, versions,
seeds and wall time) and .png. The digits preset (32x32, B = 5, widths 8..64, 60 epochs: where
its learning curves settle) takes two CPU cores about two hours for one seed of everything; the
CIFAR settings are the paper's and want a GPU.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import data
from .extras import MissingExtra, installed_version, require_train_extra
from .model import FractalNet
from .plots import error_axis, legend_beside, plain_ticks, pyplot, run_subtitle, save
from .training import (
    ConfigError, TrainConfig, drop_path_generator, evaluate, fit, load_checkpoint, load_dataset, prepared, reestimated,
    device_name, resolve_device,
)

EXPERIMENTS = ("depth", "drop-path", "anytime", "deepest")

#: Per dataset: the architecture and recipe of every run (the paper's for CIFAR; small for the
#: embedded digits, so that ``all`` finishes on two CPU cores).
PRESETS = {
    "digits": dict(image_size=32, widths=(8, 16, 32, 64, 64), dropout=(0.0,) * 5, batch_size=50, epochs=60, lr=0.02),
    "cifar10": dict(image_size=32, widths=(64, 128, 256, 512, 512), dropout=(0.0, 0.1, 0.2, 0.3, 0.4),
                    batch_size=100, epochs=400, lr=0.02),
}
PRESETS["cifar100"] = PRESETS["cifar10"]
PRESETS["imagefolder"] = dict(image_size=64, widths=(64, 128, 256, 512, 512), dropout=(0.0,) * 5, batch_size=100,
                              epochs=90, lr=0.02)

#: Drop-path variants: (label, local_drop, global_ratio, drawn per, skip_dropped). skip_dropped is
#: the dense computation whose BatchNorm statistics leave out the samples a segment does not carry.
DROP_PATH = [("none", 0.0, 0.0, "sample", False), ("local", 0.15, 0.0, "sample", False),
             ("local+global per sample", 0.15, 0.5, "sample", False),
             ("local+global per sample, BN of carried samples", 0.15, 0.5, "sample", True),
             ("local+global per batch", 0.15, 0.5, "batch", False)]
#: The model's own drop-path (FractalNet's defaults): the depth and anytime experiments train it.
MODEL_DEFAULT = tuple(inspect.signature(FractalNet).parameters[name].default
                      for name in ("local_drop", "global_ratio", "drop_path_per", "skip_dropped"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalnet experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=(*EXPERIMENTS, "all"))
    p.add_argument("--dataset", choices=data.DATASETS, default="digits")
    p.add_argument("--data", metavar="DIR", help="folder of cifar10/cifar100/imagefolder data")
    p.add_argument("--out", metavar="DIR", required=True)
    p.add_argument("--seeds", type=int, default=1, help="runs of each configuration (seeds 0..N-1)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (a quick look)")
    p.add_argument("--image-size", type=int, help="override the preset's image size (fewer blocks if smaller)")
    p.add_argument("--columns", type=int, default=4, help="the deepest C of the depth experiment (default 4)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    return p


class Runner:
    """Trains, caches and evaluates the runs of the experiments."""

    def __init__(self, options: argparse.Namespace):
        self.options = options
        preset = dict(PRESETS[options.dataset])
        for key in ("epochs", "image_size"):
            if getattr(options, key):
                preset[key] = getattr(options, key)
        # The experiments re-estimate BatchNorm statistics themselves, for each network evaluated.
        config = TrainConfig(dataset=options.dataset, data=options.data, reestimate_bn=False, **preset)
        self.device = resolve_device(options.device)
        #: The recipe of every run (augmentation: "plus" for all but digits), seed and folder aside.
        self.dataset, self.config = load_dataset(config)
        # Each block halves the image: keep at least a 1x1 map after the last pooling.
        self.blocks = min(len(preset["widths"]), max(1, (self.dataset.image_size.bit_length() - 1)))
        self.out = Path(options.out)
        self.seeds = list(range(options.seeds))

    def run_config(self, seed: int, out: Path) -> TrainConfig:
        """The config of one run: the recipe, with its seed and folder."""
        return self.config.replace(seed=seed, out=str(out), device=str(self.device))

    def fractal(self, columns: int, drop_path: tuple = MODEL_DEFAULT,
                global_columns: str = "uniform") -> tuple[str, Callable[[], FractalNet]]:
        """The run name and builder of a FractalNet with ``columns`` columns and ``drop_path``
        (local_drop, global_ratio, drawn per, skip_dropped): one name per configuration, so
        experiments share the runs they have in common."""
        local_drop, global_ratio, per, skip = drop_path
        name = (f"fractal-C{columns}-local{local_drop}-global{global_ratio}-per-{per}" + ("-skip" if skip else "")
                + ("" if global_columns == "uniform" else f"-{global_columns}"))
        return name, lambda: FractalNet(
            self.dataset.num_classes, in_channels=self.dataset.channels, widths=self.config.widths[:self.blocks],
            dropout=self.config.dropout[:self.blocks], columns=columns, local_drop=local_drop,
            global_ratio=global_ratio, drop_path_per=per, skip_dropped=skip, global_columns=global_columns)

    def train(self, name: str, seed: int, build: Callable[[], nn.Module],
              curves: Optional[dict[str, dict]] = None) -> tuple[nn.Module, dict]:
        """The model of run ``name`` trained with ``seed``: from its finished result if there is
        one, resumed from its last checkpoint if it was interrupted, or trained now. ``curves``
        names sub-networks (label -> mode) whose learning curves the run's history records."""
        folder = self.out / "runs" / name / f"seed{seed}"
        config = self.run_config(seed, folder)
        torch.manual_seed(seed)
        model = build().to(self.device)
        result_path = folder / "result.json"
        if result_path.exists():
            model.load_state_dict(load_checkpoint(str(folder / "last.pt"))["model"])
            return model, json.loads(result_path.read_text())
        checkpoint = load_checkpoint(str(folder / "last.pt")) if (folder / "last.pt").exists() else None
        start = time.perf_counter()
        with progress(None, f"{name} seed {seed}", total=config.epochs, unit="epoch", leave=False) as bar:
            bar.update(checkpoint["epoch"] if checkpoint else 0)

            def after_epoch(trained: nn.Module) -> dict:
                bar.update()
                return {} if curves is None else self.curve_point(trained, curves)

            result = fit(model, self.dataset, config, self.device, checkpoint=checkpoint, verbose=False,
                         monitor=after_epoch)
        result["wall_seconds"] = time.perf_counter() - start  # of this process's share, if it resumed
        result_path.write_text(json.dumps(result, indent=1))
        return model, result

    def error(self, model: nn.Module, **mode) -> float:
        """Test error (%) in eval mode; ``mode`` is columns=k or column=k."""
        _, accuracy, _ = evaluate(model, self.dataset, self.config, self.device, **mode)
        return 100 * (1 - accuracy)

    def reestimated(self, model: nn.Module, **mode) -> nn.Module:
        """A copy of ``model`` with its BatchNorm statistics re-estimated for the sub-network ``mode``."""
        return reestimated(model, self.dataset, self.config, self.device, **mode)

    def error_reestimated(self, model: nn.Module, **mode) -> float:
        """Test error (%) of the sub-network ``mode`` with its own BatchNorm statistics."""
        return self.error(self.reestimated(model, **mode), **mode)

    def curve_point(self, model: nn.Module, curves: dict[str, dict]) -> dict:
        """For each sub-network (label -> mode), evaluated alone with its own re-estimated
        BatchNorm statistics: its loss over the whole training set (no augmentation, dropout or
        drop-path) and its test error. Uses no random numbers: training goes on as without it."""
        point = {}
        for label, mode in curves.items():
            evaluated = self.reestimated(model, **mode)
            train_loss, _, _ = evaluate(evaluated, self.dataset, self.config, self.device, split="train", **mode)
            _, accuracy, _ = evaluate(evaluated, self.dataset, self.config, self.device, **mode)
            point[label] = dict(train_loss=train_loss, test_error=100 * (1 - accuracy))
        return point


def progress(iterable, desc: str, **options):
    """A progress bar with the time left, in a terminal only (tqdm's own test: disable=None)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=None, **options)


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def depth(runner: Runner, columns: int) -> dict:
    rows = []
    for c in progress(range(1, columns + 1), "depth"):
        fractal, column, plain, losses = [], [], [], {"fractal": [], "plain": []}
        curves = []
        for seed in runner.seeds:
            # The training-apparatus curves: the deepest network, first seed only (each point
            # re-estimates and evaluates three networks: it costs more than the epoch itself).
            deepest = c == columns and seed == runner.seeds[0]
            name, build = runner.fractal(c)
            model, result = runner.train(name, seed, build,
                                         {"fractal": {}, "deepest column": {"column": c}} if deepest else None)
            fractal.append(runner.error_reestimated(model))
            column.append(runner.error_reestimated(model, column=c))
            losses["fractal"].append(result["history"][-1]["train_loss"])
            alone, plain_result = runner.train(f"plain-C{c}", seed, lambda: build().extract_column(c),
                                               {"plain": {}} if deepest else None)
            plain.append(runner.error(alone))
            losses["plain"].append(plain_result["history"][-1]["train_loss"])
            if deepest:
                curves.append({label: curves_of(run, label)
                               for run, labels in ((result, ("fractal", "deepest column")), (plain_result, ("plain",)))
                               for label in labels})
        rows.append(dict(columns=c, depth=runner.blocks * 2 ** (c - 1), fractal_error=fractal,
                         deepest_column_error=column, plain_error=plain, fractal_train_loss=losses["fractal"],
                         plain_train_loss=losses["plain"], **({"curves": curves} if curves else {})))
    table = ["| depth (C) | FractalNet error % | its deepest column alone % | plain net trained alone % | "
             "final train loss fractal / plain |", "|---|---|---|---|---|"]
    table += [f"| {r['depth']} ({r['columns']}) | {_mean(r['fractal_error'])} | {_mean(r['deepest_column_error'])} | "
              f"{_mean(r['plain_error'])} | {_mean(r['fractal_train_loss'])} / {_mean(r['plain_train_loss'])} |"
              for r in rows]
    return dict(rows=rows, table=table, notes=DEPTH_NOTES)


DEPTH_NOTES = ("FractalNets trained with the model's default drop-path and evaluated with BatchNorm statistics "
               "re-estimated for the network evaluated (the whole network, or the deepest column alone); the "
               "plain net is the deepest column of an untrained FractalNet, trained alone without drop-path and "
               "evaluated with its running statistics. depth-curves.png: for the deepest network, after every "
               "epoch, the loss over the training set and the test error of the fractal, of its deepest column "
               "alone and of the plain net, each with BatchNorm statistics re-estimated for it (the first seed).")


def drop_path(runner: Runner, columns: int) -> dict:
    rows = []
    for variant in progress(DROP_PATH, "drop-path"):
        label, *drop = variant
        whole, loss = {"running": [], "reestimated": []}, []
        alone = {c: {"running": [], "reestimated": []} for c in range(1, columns + 1)}
        for seed in runner.seeds:
            name, build = runner.fractal(columns, tuple(drop))
            model, result = runner.train(name, seed, build)
            loss.append(result["history"][-1]["train_loss"])
            whole["running"].append(runner.error(model))
            whole["reestimated"].append(runner.error_reestimated(model))
            for c in range(1, columns + 1):
                alone[c]["running"].append(runner.error(model, column=c))
                alone[c]["reestimated"].append(runner.error_reestimated(model, column=c))
        rows.append(dict(variant=label, local_drop=drop[0], global_ratio=drop[1], drawn_per=drop[2],
                         skip_dropped=drop[3], train_loss=loss, error=whole, column_error=alone))
    header = " | ".join(f"column {c} alone %" for c in range(1, columns + 1))
    table = [f"| drop-path | final train loss | whole network % | {header} |", "|---|---|---|" + "---|" * columns]
    table += [f"| {r['variant']} | {_mean(r['train_loss'])} | " + " | ".join(
        f"{_mean(e['running'])} / {_mean(e['reestimated'])}" for e in (r["error"], *r["column_error"].values())) + " |"
        for r in rows]
    return dict(columns=columns, rows=rows, table=table, notes=DROP_PATH_NOTES)


DROP_PATH_NOTES = ("Errors as running statistics / re-estimated: with the BatchNorm running statistics training "
                   "left, then with statistics re-estimated over the training set for the network evaluated. "
                   "\"BN of carried samples\" trains with skip_dropped: each segment's BatchNorm statistics cover "
                   "only the samples that segment carries.")


def anytime(runner: Runner, columns: int) -> dict:
    rows = []
    for seed in progress(runner.seeds, "anytime"):
        name, build = runner.fractal(columns)
        model, _ = runner.train(name, seed, build)
        config = runner.config
        for mode in ("column", "columns"):
            for k in range(1, columns + 1):
                evaluated = runner.reestimated(model, **{mode: k})
                evaluate(evaluated, runner.dataset, config, runner.device, **{mode: k})  # warm-up
                _, accuracy, seconds = evaluate(evaluated, runner.dataset, config, runner.device, **{mode: k})
                units = sum(len(block.columns[c - 1]) for block in model.blocks
                            for c in ([k] if mode == "column" else range(1, k + 1)))
                rows.append(dict(mode=mode, k=k, seed=seed,
                                 depth=sum(len(block.columns[k - 1]) for block in model.blocks), conv_units=units,
                                 error=100 * (1 - accuracy), ms_per_image=1e3 * seconds / len(runner.dataset.test)))
    table = ["| network | depth | conv units run | error % | ms/image |", "|---|---|---|---|---|"]
    table += [f"| {'column ' if r['mode'] == 'column' else 'columns 1..'}{r['k']} | {r['depth']} | {r['conv_units']} | "
              f"{r['error']:.2f} | {r['ms_per_image']:.3f} |" for r in rows]
    return dict(columns=columns, rows=rows, table=table, notes=ANYTIME_NOTES)


ANYTIME_NOTES = ("The model's default drop-path; each sub-network evaluated with its own re-estimated BatchNorm "
                 "statistics; latency is the wall time of the test set in batches of 500 on this device, divided "
                 "by its images.")


def deepest(runner: Runner, columns: int) -> dict:
    """Why the deepest column does not stand alone: for the deepest FractalNet (the depth
    experiment's runs, and one whose global batches choose their column in proportion to its
    depth), how many steps trained the deepest column alone, the plain net's error after as many
    steps, and the deepest column's error with each kind of BatchNorm statistics."""
    c = columns
    curves = {"fractal": {}, "deepest column": {"column": c}}
    rows = []
    for seed in progress(runner.seeds, "deepest"):
        plain, plain_result = runner.train(f"plain-C{c}", seed, lambda: runner.fractal(c)[1]().extract_column(c),
                                           {"plain": {}})
        plain_curve = curves_of(plain_result, "plain")
        plain_end = plain_curve[-1] if plain_curve else runner.curve_point(plain, {"plain": {}})["plain"]
        steps_per_epoch = len(runner.dataset.train) // runner.config.batch_size
        for choice in ("uniform", "by-depth"):
            name, build = runner.fractal(c, global_columns=choice)
            model, result = runner.train(name, seed, build, curves)
            solo = solo_steps(model, runner.run_config(seed, Path()), steps_per_epoch, c)
            curve = curves_of(result, "deepest column")
            column = curve[-1] if curve else runner.curve_point(model, {"column": {"column": c}})["column"]
            # The plain net after as many steps as the column trained alone (whole epochs, one at
            # least): read from its learning curve, where its run recorded one.
            matched_epoch = max(1, round(solo / steps_per_epoch))
            matched = plain_curve[matched_epoch - 1] if plain_curve else {"test_error": None, "train_loss": None}
            rows.append(dict(
                seed=seed, global_columns=choice, solo_steps=solo, steps=steps_per_epoch * runner.config.epochs,
                fractal_error=runner.error_reestimated(model),
                column_error=dict(running=runner.error(model, column=c),
                                  reestimated=runner.error_reestimated(model, column=c),
                                  batch=error_with_batch_statistics(runner, model, column=c)),
                column_train_loss=column["train_loss"], plain_error=plain_end["test_error"],
                plain_train_loss=plain_end["train_loss"], plain_matched_epoch=matched_epoch,
                plain_matched_error=matched["test_error"], plain_matched_train_loss=matched["train_loss"],
                curve=curve))
    table = [f"| global column | steps column {c} trained alone (of all) | FractalNet % | column {c} alone: running / "
             "re-estimated / batch statistics % | its train loss | plain net after as many steps: epoch, error %, "
             "train loss | plain net at the end: error %, train loss |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['global_columns']} (seed {r['seed']}) | {r['solo_steps']} ({r['steps']}) | "
              f"{r['fractal_error']:.2f} | "
              f"{r['column_error']['running']:.2f} / {r['column_error']['reestimated']:.2f} / "
              f"{r['column_error']['batch']:.2f} | {r['column_train_loss']:.3f} | {r['plain_matched_epoch']}, "
              f"{_number(r['plain_matched_error'], '.2f')}, {_number(r['plain_matched_train_loss'], '.3f')} | "
              f"{r['plain_error']:.2f}, {r['plain_train_loss']:.3f} |" for r in rows]
    return dict(columns=c, rows=rows, table=table, notes=DEEPEST_NOTES)


DEEPEST_NOTES = ("Solo steps: the training steps whose per-batch structure was a global batch of the deepest column "
                 "(the run's own draws, replayed); in every other step that column trains only as part of joins. "
                 "The plain net (the deepest column trained alone, every step) is read from its learning curve after "
                 "as many epochs as the column's solo steps make. Statistics: the running ones training left, "
                 "re-estimated over the training set for the column alone, and each test batch's own (batches of "
                 "the training batch size). by-depth: global batches choose their column in proportion to its depth "
                 "(FractalNet(global_columns='by-depth')), not uniformly as the paper does.")


def curves_of(result: dict, label: str) -> Optional[list[dict]]:
    """The learning curve of sub-network ``label`` that a run recorded (one point per epoch), or
    None: the depth experiment records curves for its first seed only, and a later experiment
    reuses its runs as they are."""
    history = result["history"]
    return [h[label] for h in history] if label in history[-1] else None


def _number(value: Optional[float], spec: str) -> str:
    """``value`` formatted, or "no curve" where it could not be read (None)."""
    return "no curve" if value is None else format(value, spec)


def solo_steps(model: FractalNet, config: TrainConfig, steps_per_epoch: int, column: int) -> int:
    """How many of a run's training steps drew a global batch of ``column``: its structures
    replayed from the run's drop-path generator (training.drop_path_generator)."""
    generator = drop_path_generator(config)
    return sum(model.draw_structure(generator) == column for _ in range(steps_per_epoch * config.epochs))


def error_with_batch_statistics(runner: Runner, model: nn.Module, **mode) -> float:
    """Test error (%) of the sub-network ``mode`` normalising each test batch (of the training
    batch size) with its own statistics; the model is left as it was."""
    evaluated = copy.deepcopy(model).eval()
    for module in evaluated.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    correct = 0
    with torch.no_grad():
        for images, labels in data.batches(runner.dataset.test, runner.config.batch_size,
                                           torch.arange(len(runner.dataset.test)), runner.dataset.image_size):
            out = evaluated(prepared(images, runner.dataset, runner.config, runner.device), **mode)
            correct += (out.argmax(1).cpu() == labels).sum().item()
    return 100 * (1 - correct / len(runner.dataset.test))


def plot(name: str, result: dict, path: Path) -> None:
    """The experiment's figure (and the depth experiment's learning curves), from its result."""
    plt = pyplot()
    test_images = result.get("test_images")

    def subtitle(seeds, statistic: str = "mean ± sd") -> str:
        return run_subtitle(result["dataset"], result["recipe"]["epochs"], seeds, result["environment"]["device"],
                            test_images, statistic)

    fig, ax = plt.subplots(figsize=(9, 4))
    rows = result["rows"]
    if name == "depth":
        depths = [r["depth"] for r in rows]
        for key, label in (("fractal_error", "FractalNet"), ("deepest_column_error", "its deepest column"),
                           ("plain_error", "plain net alone")):
            spread = [statistics.stdev(r[key]) if len(r[key]) > 1 else 0.0 for r in rows]
            ax.errorbar(depths, [statistics.mean(r[key]) for r in rows], yerr=spread, marker="o", capsize=3,
                        label=label)
        ax.set(xscale="log", xlabel="depth (conv layers)", ylabel="test error (%)", title="error by depth")
        plain_ticks(ax, "x")
        ax.set_xticks(depths, [str(d) for d in depths])
        error_axis(ax, test_images)
    elif name == "drop-path":
        columns = range(1, result["columns"] + 1)
        for r in rows:
            error = {int(c): e for c, e in r["column_error"].items()}  # str keys once read back from JSON
            ax.plot(list(columns), [statistics.mean(error[c]["reestimated"]) for c in columns], marker="o",
                    label=r["variant"])
        ax.set(xticks=list(columns), yscale="log", xlabel="column alone (BatchNorm re-estimated)",
               ylabel="test error (%, log scale)", title="columns by drop-path")
        plain_ticks(ax)
    elif name == "deepest":
        for r in (r for r in rows if r["curve"]):
            ax.plot(range(1, len(r["curve"]) + 1), [point["test_error"] for point in r["curve"]],
                    label=f"column {result['columns']} alone,\nglobal column {r['global_columns']} (seed {r['seed']})")
        ax.set(xlabel="epoch", ylabel="test error (%, BatchNorm re-estimated)",
               title="the deepest column while the fractal trains")
        error_axis(ax, test_images)
    else:
        for mode, marker in (("column", "o"), ("columns", "s")):
            points = [r for r in rows if r["mode"] == mode]
            ax.plot([r["ms_per_image"] for r in points], [r["error"] for r in points], marker=marker,
                    label="column k alone" if mode == "column" else "columns 1..k")
        ax.set(xlabel="latency (ms per image)", ylabel="test error (%)", title="anytime prediction")
        error_axis(ax, test_images)
    legend_beside(ax)
    save(fig, path, subtitle(result["seeds"]))
    curves = [r["curves"] for r in rows if "curves" in r]
    if curves:
        plot_curves(curves[0], rows[-1]["depth"], path.with_name(f"{name}-curves.png"),
                    subtitle(result["seeds"][:len(curves[0])], "mean"))


def plot_curves(curves: list[dict], depth: int, path: Path, subtitle: str) -> None:
    """The paper's training-apparatus figure: loss over the training set and test error by epoch,
    mean over seeds, of the fractal, its deepest column alone and the plain net of that depth."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in curves[0]:
        epochs = range(1, len(curves[0][label]) + 1)
        for ax, key in zip(axes, ("train_loss", "test_error")):
            ax.plot(epochs, [statistics.mean(seed[label][e - 1][key] for seed in curves) for e in epochs],
                    label=f"{label} ({depth} layers)" if label != "fractal" else "fractal")
    axes[0].set(yscale="log", xlabel="epoch", ylabel="training loss (whole training set, log scale)",
                title="training loss, evaluated alone")
    axes[1].set(yscale="log", xlabel="epoch", ylabel="test error (%, log scale)", title="test error")
    for ax in axes:
        plain_ticks(ax)
    legend_beside(axes[1])
    save(fig, path, subtitle)


def environment(device: torch.device) -> dict:
    return dict(device=device_name(device), torch=torch.__version__, triton=installed_version("triton"),
                python=platform.python_version(), threads=torch.get_num_threads())


def main(argv=None) -> int:
    options = parser().parse_args(argv)
    try:
        require_train_extra("fractalnet experiments")
        runner = Runner(options)
    except (ConfigError, MissingExtra) as error:
        print(f"fractalnet experiments: error: {error}", file=sys.stderr)
        return 2
    runner.out.mkdir(parents=True, exist_ok=True)
    if runner.blocks < len(runner.config.widths):
        print(f"{runner.dataset.image_size}x{runner.dataset.image_size} images: {runner.blocks} blocks of the "
              f"preset's {len(runner.config.widths)} (each pools by 2)", flush=True)
    chosen = EXPERIMENTS if options.experiment == "all" else (options.experiment,)
    began = time.perf_counter()
    for name in chosen:
        start = time.perf_counter()
        experiment = {"depth": depth, "drop-path": drop_path, "anytime": anytime, "deepest": deepest}[name]
        result = experiment(runner, options.columns)
        result.update(experiment=name, dataset=options.dataset, seeds=runner.seeds, blocks=runner.blocks,
                      test_images=len(runner.dataset.test),
                      recipe={k: getattr(runner.config, k) for k in ("image_size", "widths", "dropout", "batch_size",
                                                                     "epochs", "lr", "augment")},
                      environment=environment(runner.device), wall_seconds=time.perf_counter() - start)
        stem = runner.out / name
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        heading = (f"# {name}: {options.dataset}, {runner.blocks} blocks, seeds {runner.seeds}\n\n"
                   f"{result['environment']['device']}, torch {result['environment']['torch']}; "
                   f"{result['wall_seconds'] / 60:.1f} min; recipe {result['recipe']}\n\n")
        stem.with_suffix(".md").write_text(heading + "\n".join(result["table"]) + f"\n\n{result['notes']}\n")
        plot(name, result, stem.with_suffix(".png"))
        print(f"\n{name} ({result['wall_seconds'] / 60:.1f} min)\n" + "\n".join(result["table"]), flush=True)
    print(f"\n{', '.join(chosen)}: {(time.perf_counter() - began) / 60:.1f} min in all; wrote {runner.out}/",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
