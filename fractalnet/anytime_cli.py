"""The ``fractalnet anytime`` command (also ``python -m fractalnet.anytime_cli``) over the
fractalnet.anytime library: --calibrate a train checkpoint's sub-networks, then serve within
--budget-ms."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch

from . import data
from .anytime import (
    AnytimePredictor, Calibration, calibrate, calibration_path, cascade_tradeoff, choose_threshold,
)
from .extras import MissingExtra, require_train_extra
from .plots import error_axis, legend_beside, plain_ticks, pyplot, run_subtitle, save
from .training import (
    ConfigError, TrainConfig, load_checkpoint, load_dataset, model_from_checkpoint, prepared, resolve_device,
)


DESCRIPTION = """Anytime prediction from a fractalnet train checkpoint. --calibrate gives every
sub-network (each column alone, each truncation) its own BatchNorm statistics over the training
split, measures its error on a validation half of the test split and its latency per image on
this device, and writes DIR/NAME.anytime.pt (beside the checkpoint), anytime-serving.json and
anytime-pareto.png; it also measures a confidence cascade (the fastest sub-network first, the
unsure samples on to the whole network) against each single sub-network on the other half of
the test split, its threshold chosen on the validation half. --budget-ms serves that other half
within each budget (ms per image).

examples:
  fractalnet anytime --checkpoint runs/demo/last.pt --calibrate
  fractalnet anytime --checkpoint runs/demo/last.pt --budget-ms 0.5,2"""

#: The cascade's thresholds: what the command sweeps.
THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


class Batches:
    """Images of a split, by ``indices``, as (normalised inputs on ``device``, labels) batches:
    iterable more than once, preparing each batch as it goes (as training's evaluation does)."""

    def __init__(self, dataset, split, indices: torch.Tensor, config, device: torch.device):
        self.dataset, self.split, self.indices, self.config, self.device = dataset, split, indices, config, device

    def __iter__(self):
        for images, labels in data.batches(self.split, self.config.batch_size, self.indices, self.dataset.image_size):
            yield prepared(images, self.dataset, self.config, self.device), labels

    def __len__(self) -> int:
        return len(self.indices)


def serving_splits(dataset, config, device: torch.device) -> tuple[Batches, Batches, Batches]:
    """(calibration, validation, test): the training split for the statistics, and the test split
    halved by a permutation of the run's seed: validation chooses (errors, thresholds), test
    reports."""
    order = torch.randperm(len(dataset.test), generator=torch.Generator().manual_seed(config.seed))
    half = len(order) // 2
    return (Batches(dataset, dataset.train, torch.arange(len(dataset.train)), config, device),
            Batches(dataset, dataset.test, order[:half], config, device),
            Batches(dataset, dataset.test, order[half:], config, device))


def accuracy(predictor: AnytimePredictor, batches: Iterable, subnetwork) -> float:
    """The share of ``batches`` that ``subnetwork``, served with its statistics, gets right."""
    right = total = 0
    for x, labels in batches:
        right += (predictor.run(x, subnetwork).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return right / total


def cascade_against_single(predictor: AnytimePredictor, validation, test) -> tuple[list[dict], list[dict], list[dict]]:
    """For each sub-network slower than the fastest: the cascade (predictor.cascade's default
    stages) whose threshold validation chooses for that sub-network's latency as mean budget,
    against that sub-network, on ``test``; and the cascade's trade-off on validation and on test."""
    on_validation = cascade_tradeoff(predictor, validation, THRESHOLDS)
    test_rows = cascade_tradeoff(predictor, test, THRESHOLDS)
    on_test = {row["threshold"]: row for row in test_rows}
    rows = []
    fastest = predictor.calibration.fastest()
    for single in sorted(predictor.calibration.subnetworks, key=lambda s: s.latency_ms):
        if single == fastest:
            continue
        threshold = choose_threshold(on_validation, single.latency_ms)["threshold"]
        cascade = on_test[threshold]
        rows.append(dict(single=single.name, single_latency_ms=single.latency_ms,
                         single_accuracy=accuracy(predictor, test, single), threshold=threshold,
                         cascade_latency_ms=cascade["mean_latency_ms"], cascade_accuracy=cascade["accuracy"]))
    return rows, on_validation, test_rows


def write_pareto_plot(calibration: Calibration, tradeoff: list[dict], path: Path, subtitle: str) -> None:
    """Error against latency per image: every sub-network, the Pareto front, and the cascade."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, marker in (("column", "o"), ("columns", "s")):
        chosen = [s for s in calibration.subnetworks if s.mode == mode]
        ax.errorbar([s.latency_ms for s in chosen], [100 * s.error for s in chosen],
                    xerr=[[s.latency_ms - s.latency_low_ms for s in chosen],
                          [s.latency_high_ms - s.latency_ms for s in chosen]],
                    fmt=marker, capsize=3, label="single column k" if mode == "column" else "truncation columns=k")
        for s in chosen:
            ax.annotate(s.name, (s.latency_ms, 100 * s.error), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
    front = calibration.pareto()
    ax.plot([s.latency_ms for s in front], [100 * s.error for s in front], "k--", lw=1, label="Pareto front")
    ax.plot([r["mean_latency_ms"] for r in tradeoff], [100 * (1 - r["accuracy"]) for r in tradeoff], "^-",
            ms=4, label="cascade (mean latency)")
    ax.set_xscale("log")
    plain_ticks(ax, "x")
    ax.set(xlabel=f"latency (ms per image, batch {calibration.batch_size}, median and 20th-80th pct)",
           ylabel="validation error (%)", title="anytime prediction: error against latency")
    error_axis(ax, calibration.validation_images, "validation")
    legend_beside(ax)
    save(fig, path, subtitle)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalnet anytime", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a fractalnet train checkpoint (DIR/best.pt)")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--calibrate", action="store_true", help="calibrate every sub-network and write the results")
    action.add_argument("--budget-ms", metavar="X[,Y...]", type=_budgets,
                        help="serve within each budget (ms per image) with the saved calibration")
    p.add_argument("--batch-size", type=int, default=1, help="the batch size latencies hold for (default: 1)")
    p.add_argument("--repeats", type=int, default=20, help="timings of each sub-network (default: 20)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: this process's GPU if there is one)")
    p.add_argument("--threads", type=int, help="torch's CPU threads while timing (default: torch's; small batches "
                   "time steadier with 1 where other processes share the cores)")
    return p


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds such as 0.5 or 0.5,2, got {text!r}") from None
    if not all(0 < b < math.inf for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be positive milliseconds, got {text!r}")
    return budgets


def run(argv=None) -> dict:
    """The command; returns what it printed, as data."""
    args = parser().parse_args(argv)
    require_train_extra("fractalnet anytime")
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < (1 if name == "batch_size" else 3):
            raise ValueError(f"--{name.replace('_', '-')} must be at least {1 if name == 'batch_size' else 3}, "
                             f"got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    checkpoint = Path(args.checkpoint)
    saved_run = load_checkpoint(checkpoint, "--checkpoint")
    model = model_from_checkpoint(saved_run, device)
    config = TrainConfig.from_dict(saved_run["args"]).replace(device=None)
    dataset, config = load_dataset(config)
    calibration_, validation, test = serving_splits(dataset, config, device)
    saved = calibration_path(checkpoint)
    if args.calibrate:
        calibration = calibrate(model, calibration_, validation, batch_size=args.batch_size, repeats=args.repeats)
        calibration.save(saved)
        predictor = AnytimePredictor(model, calibration)
        against, tradeoff, tradeoff_test = cascade_against_single(predictor, validation, test)
        print(f"fractalnet anytime: {checkpoint}, calibrated on {device}\n\n{calibration.table()}\n")
        print(f"cascade (threshold chosen on the validation half for each mean budget) against the single "
              f"sub-network of that latency, on the other {len(test)} test images:\n")
        print("| budget: latency of | single error (%) | cascade threshold | cascade mean ms | cascade error (%) |")
        print("|---|---|---|---|---|")
        for row in against:
            print(f"| {row['single']} ({row['single_latency_ms']:.4g} ms) | {100 * (1 - row['single_accuracy']):.2f} "
                  f"| {row['threshold']:g} | {row['cascade_latency_ms']:.4g} | "
                  f"{100 * (1 - row['cascade_accuracy']):.2f} |")
        out = checkpoint.parent
        result = dict(checkpoint=str(checkpoint), calibration=str(saved), table=calibration.table(),
                      subnetworks=[dict(name=s.name, **asdict(s)) for s in calibration.subnetworks],
                      pareto=[s.name for s in calibration.pareto()], cascade_validation=tradeoff,
                      cascade_test=tradeoff_test, cascade_against_single=against, test_images=len(test),
                      versions=calibration.versions)
        (out / "anytime-serving.json").write_text(json.dumps(result, indent=1))
        subtitle = run_subtitle(config.dataset, config.epochs, [config.seed], calibration.hardware, None)
        write_pareto_plot(calibration, tradeoff, out / "anytime-pareto.png", subtitle)
        print(f"\nwrote {saved}, {out}/anytime-serving.json, {out}/anytime-pareto.png")
        return result
    calibration = Calibration.load(saved)
    predictor = AnytimePredictor(model, calibration)
    rows, served_accuracy = [], {}
    print(f"fractalnet anytime: {checkpoint} on {device} (calibrated at batch {calibration.batch_size} on "
          f"{calibration.hardware}); served on the {len(test)} held-out test images\n")
    print("| budget (ms per image) | sub-network | its latency (ms) | validation error (%) | served test error (%) |")
    print("|---|---|---|---|---|")
    for budget in args.budget_ms:
        fastest = calibration.pareto()[0]
        if budget < fastest.latency_ms:
            print(f"| {budget:g} | none fits (the fastest, {fastest.name}, takes {fastest.latency_ms:.4g}) | | | |")
            continue
        chosen = calibration.choose(budget)
        if chosen.name not in served_accuracy:  # budgets that choose alike serve alike
            served_accuracy[chosen.name] = accuracy(predictor, test, chosen)
        served = served_accuracy[chosen.name]
        rows.append(dict(budget_ms=budget, subnetwork=chosen.name, latency_ms=chosen.latency_ms,
                         validation_error=chosen.error, test_error=1 - served))
        print(f"| {budget:g} | {chosen.name} | {chosen.latency_ms:.4g} | {100 * chosen.error:.2f} | "
              f"{100 * (1 - served):.2f} |")
    if not rows:
        raise ValueError(f"--budget-ms: no budget fits; the fastest sub-network takes "
                         f"{calibration.pareto()[0].latency_ms:.4g} ms per image")
    return dict(served=rows)


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, MissingExtra, ValueError, FileNotFoundError) as error:
        print(f"fractalnet anytime: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
