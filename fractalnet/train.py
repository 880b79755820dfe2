"""Train and evaluate a FractalNet: ``fractalnet train ...`` or ``python -m fractalnet.train ...``.

The command line of fractalnet.training (the library: TrainConfig, fit): its options are the
config's fields.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import data
from .extras import MissingExtra, require_train_extra
from .configs import list_models
from .training import (
    COMPILE_MODES, ConfigError, TrainConfig, build_model, fit, load_checkpoint, load_dataset, resolve_device,
)

DESCRIPTION = """Train a FractalNet and evaluate it: the whole network, each column alone and each
truncation (anytime prediction). The paper's recipe is the default: SGD with momentum 0.9, lr 0.02,
batch 100, 400 epochs, the learning rate divided by 10 each time the remaining epochs halve,
drop-path local 0.15 and global 0.5 drawn per batch. Without --out a run writes under
runs/MODEL-DATE-TIME. Runs under torchrun with DistributedDataParallel (NCCL on GPUs, gloo on CPU).

example: fractalnet train --dataset digits --widths 32,64,128 --dropout 0,0.1,0.2 --image-size 16 --epochs 30"""

#: Options that shape the model or the data: a resumed run takes them from its checkpoint.
ARCHITECTURE = ("dataset", "model", "columns", "widths", "dropout", "image_size", "fused", "seed")
#: Options of one run only: a resumed run does not inherit them.
RUN_ONLY = ("stop_after", "device")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalnet train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    p.add_argument("--dataset", choices=data.DATASETS, help="default: digits (embedded, no download)")
    p.add_argument("--data", metavar="DIR", help="folder of cifar10/cifar100/imagefolder data")
    p.add_argument("--model", choices=list_models(), help="default: fractalnet20_cifar")
    p.add_argument("--epochs", type=int, help="default: 400")
    p.add_argument("--batch-size", type=int, help="per process; default: 100")
    p.add_argument("--lr", type=float, help="default: 0.02")
    p.add_argument("--weight-decay", type=float, help="default: 0")
    p.add_argument("--columns", type=int, help="columns C of every block (default: the model's)")
    p.add_argument("--widths", type=_floats_or_ints(int), help="channels per block, e.g. 32,64,128")
    p.add_argument("--dropout", type=_floats_or_ints(float), help="dropout per block, e.g. 0,0.1,0.2")
    p.add_argument("--local-drop", type=float, help="local drop-path rate (default: 0.15)")
    p.add_argument("--global-ratio", type=float, help="fraction of global drop-path samples (default: 0.5)")
    p.add_argument("--drop-path-per", choices=("batch", "sample"),
                   help="draw drop-path per batch (the paper's code) or per sample (default: the model's)")
    p.add_argument("--reestimate-bn", action=argparse.BooleanOptionalAction,
                   help="after training, set the BatchNorm running statistics to their average over the "
                        "training set for the whole network (default: on; drop-path models only)")
    p.add_argument("--image-size", type=int, help="resize images to this size (default: 32; imagefolder 224)")
    p.add_argument("--augment", choices=("none", "plus"),
                   help='"plus": the paper\'s translation and flip (default for all but digits)')
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--out", metavar="DIR", help="checkpoints, metrics.json and plots (default: runs/MODEL-DATE-TIME)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (DIR/last.pt)")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (a time-boxed run; continue it with --resume)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype")
    p.add_argument("--channels-last", action="store_const", const=True, help="channels-last memory layout")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the training forward, in MODE (default; reduce-overhead: CUDA graphs of the "
                        "compiled graphs; max-autotune; max-autotune-no-cudagraphs)")
    p.add_argument("--no-fused", dest="fused", action="store_const", const=False,
                   help="the eager baseline: nn.BatchNorm2d, ReLU and the reference join")
    p.add_argument("--recompute", action="store_const", const=True,
                   help="recompute BN+ReLU outputs in backward instead of keeping them (fused model)")
    p.add_argument("--skip-dropped", action="store_const", const=True,
                   help="compute only the column segments drop-path keeps (fused model)")
    p.add_argument("--sync-bn", action="store_const", const=True,
                   help="BatchNorm statistics over all ranks (torchrun)")
    p.add_argument("--cuda-graphs", action="store_const", const=True,
                   help="replay the training step from CUDA graphs, one per drop-path structure (fractalnet.graphs)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    return p


def _floats_or_ints(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def resolve(argv) -> tuple[TrainConfig, Optional[dict]]:
    """The run's config: the defaults, under a resumed checkpoint's options, under the command
    line's; and the checkpoint (None without --resume)."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    checkpoint = load_checkpoint(given.pop("resume")) if "resume" in given else None
    options = {}
    if checkpoint is not None:
        options.update({k: v for k, v in checkpoint["args"].items() if k not in RUN_ONLY})
        changed = [k for k in ARCHITECTURE if k in given and given[k] != checkpoint["args"].get(k)]
        if changed:
            raise ConfigError(f"--resume: the checkpoint was trained with other {', '.join(changed)}")
    options.update(given)
    if options.get("out") is None:
        model = options.get("model", TrainConfig.model)
        options["out"] = os.path.join("runs", f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")
    return TrainConfig.from_dict(options), checkpoint


def distributed_setup(config: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_cuda_graphs(config: TrainConfig, device: torch.device, world: int) -> None:
    """--cuda-graphs: what the graphed step needs (fractalnet.graphs), as CLI errors."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, got {device}")
    refused = {"--skip-dropped": config.skip_dropped, "--compile": config.compile, "--amp": config.amp,
               "--sync-bn or several processes": config.sync_bn or world > 1, "--no-fused": not config.fused}
    for option, given in refused.items():
        if given:
            raise ConfigError(f"--cuda-graphs does not combine with {option}")


def warn_of_no_effect(config: TrainConfig, device: torch.device, world: int) -> None:
    """Options torch would run as asked but to no purpose: a warning that says what to do."""
    if config.sync_bn and world == 1:
        warnings.warn("--sync-bn in a single process changes nothing: run under torchrun --nproc-per-node N to "
                      "synchronise BatchNorm across processes", stacklevel=2)
    if config.amp == "fp16" and device.type == "cpu":
        warnings.warn("--amp fp16 on a CPU: fp16 autocast is meant for GPUs; on a CPU use --amp bf16 or no --amp",
                      stacklevel=2)


def header(config: TrainConfig, dataset: data.Dataset, model: nn.Module, device: torch.device, world: int) -> str:
    """What a run is about to do, before it starts: the model, the data, the recipe, where it writes."""
    parameters = sum(p.numel() for p in model.parameters())
    processes = f" x {world} processes" if world > 1 else ""
    return (f"fractalnet train: {config.model}, {parameters:,} parameters, on {device}{processes}\n"
            f"  data    {config.dataset}: {len(dataset.train):,} training and {len(dataset.test):,} test images, "
            f"{dataset.image_size}x{dataset.image_size}, {dataset.num_classes} classes\n"
            f"  recipe  {config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, drop-path local "
            f"{config.local_drop} and global {config.global_ratio}\n"
            f"  output  {config.out}/ (last.pt, best.pt, metrics.json, curves.png, anytime.png)")


def run(argv=None) -> dict:
    config, checkpoint = resolve(argv)
    require_train_extra("fractalnet train")
    rank, world, device = distributed_setup(config)
    dataset, config = load_dataset(config, world)
    if config.sync_bn and config.skip_dropped:
        raise ConfigError("--sync-bn and --skip-dropped do not combine: compact segments keep per-rank statistics")
    if config.cuda_graphs:
        check_cuda_graphs(config, device, world)
    warn_of_no_effect(config, device, world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, dataset, device)
    if rank == 0:
        print(header(config, dataset, model, device, world), flush=True)
    if config.sync_bn and world > 1:
        if config.fused:
            model.process_group = dist.group.WORLD
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        return fit(model, dataset, config, device, rank=rank, world=world, checkpoint=checkpoint)
    finally:
        if world > 1:
            dist.destroy_process_group()


def main(argv=None) -> int:
    try:
        run(argv)
    except (ConfigError, MissingExtra) as error:
        print(f"fractalnet train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
