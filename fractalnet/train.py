"""Train and evaluate a FractalNet: ``fractalnet train ...`` or ``python -m fractalnet.train ...``.

The paper's recipe is the default: SGD with momentum 0.9, lr 0.02, batch 100, 400 epochs, the
learning rate divided by 10 each time the remaining epochs halve. Runs under torchrun with
DistributedDataParallel (NCCL on GPUs, gloo on CPU). See ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data
from .drop_path import copy_to_device
from .graphs import GraphedTrainingStep
from .model import FractalNet, create_model, list_models

CHECKPOINT_FORMAT = "fractalnet-checkpoint-1"

#: Defaults, applied under what a resumed checkpoint and the command line give.
DEFAULTS = dict(
    dataset="digits", data=None, model="fractalnet20_cifar", epochs=400, batch_size=100, lr=0.02,
    weight_decay=0.0, columns=None, widths=None, dropout=None, local_drop=0.15, global_ratio=0.5,
    image_size=None, augment=None, seed=0, out=None, stop_after=None, amp=None, channels_last=False,
    compile=False, fused=True, recompute=False, skip_dropped=False, sync_bn=False, device=None, cuda_graphs=False,
    drop_path_per=None, reestimate_bn=True,
)
#: torch.compile's modes, as --compile takes them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Options that shape the model or the data: a resumed run takes them from its checkpoint.
ARCHITECTURE = ("dataset", "model", "columns", "widths", "dropout", "image_size", "fused", "seed")
#: Options of one run only: a resumed run does not inherit them.
RUN_ONLY = ("stop_after", "device")


class CLIError(Exception):
    """A user error: reported in one line, without a traceback."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractalnet train", description=__doc__,
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
    p.add_argument("--out", metavar="DIR", help="checkpoints, metrics.json and plots")
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


def milestones(epochs: int) -> list[int]:
    """Epochs at which the learning rate drops tenfold: each time the remaining epochs halve."""
    return sorted({epochs - epochs // 2**i for i in range(1, 5) if epochs // 2**i > 0})


def lr_at(epoch: int, args) -> float:
    return args.lr * 0.1 ** sum(epoch >= m for m in milestones(args.epochs))


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def resolve(argv) -> tuple[argparse.Namespace, Optional[dict]]:
    """The run's options: defaults, then a resumed checkpoint's, then the command line's."""
    given = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    checkpoint = load_checkpoint(given["resume"]) if "resume" in given else None
    options = dict(DEFAULTS)
    if checkpoint is not None:
        options.update({k: v for k, v in checkpoint["args"].items() if k not in RUN_ONLY})
        changed = [k for k in ARCHITECTURE if k in given and given[k] != checkpoint["args"].get(k)]
        if changed:
            raise CLIError(f"--resume: the checkpoint was trained with other {', '.join(changed)}")
    options.update(given)
    return argparse.Namespace(**options), checkpoint


def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise CLIError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CLIError(f"--resume: cannot read {path}: truncated or not a checkpoint "
                       f"({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"--resume: {path} is not a fractalnet train checkpoint")
    return checkpoint


def save_atomically(obj, path: Path) -> None:
    """Writes ``obj`` to a temporary file and renames it, so a crash never leaves a broken file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def distributed_setup(args) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(args, dataset: data.Dataset, device: torch.device) -> FractalNet:
    overrides = {k: getattr(args, k) for k in ("columns", "widths", "dropout") if getattr(args, k) is not None}
    if args.skip_dropped:
        overrides["skip_dropped"] = True
    if args.drop_path_per is not None:
        overrides["drop_path_per"] = args.drop_path_per
    try:
        model = create_model(
            args.model, dataset.num_classes, in_channels=dataset.channels, local_drop=args.local_drop,
            global_ratio=args.global_ratio, fused=args.fused, recompute=args.recompute, **overrides,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def autocast(args, device):
    if args.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def prepared(images, dataset, args, device, generator=None):
    """A batch of uint8 images on ``device`` (from pinned memory, without a host wait, to a GPU),
    augmented with ``generator`` if given, normalised, in the run's memory format."""
    images = copy_to_device(images, device)
    if generator is not None:
        images = data.augment(images, generator)
    x = data.normalize(images, dataset)
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def evaluate(model: nn.Module, dataset: data.Dataset, args, device, split: str = "test",
             **mode) -> tuple[float, float, float]:
    """(loss, accuracy, seconds) on ``split`` ("test" or "train", never augmented); ``mode`` is
    columns=k or column=k."""
    model.eval()
    images_of = {"test": dataset.test, "train": dataset.train}[split]
    correct, loss, start = 0, 0.0, time.perf_counter()
    indices = torch.arange(len(images_of))
    with torch.no_grad(), autocast(args, device):
        for images, labels in data.batches(images_of, 500, indices, dataset.image_size):
            labels = copy_to_device(labels, device)
            out = model(prepared(images, dataset, args, device), **mode).float()
            loss += F.cross_entropy(out, labels, reduction="sum").item()
            correct += (out.argmax(1) == labels).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss / len(images_of), correct / len(images_of), time.perf_counter() - start


def reestimate_batchnorm(model: nn.Module, dataset: data.Dataset, args, device, **mode) -> None:
    """Sets every BatchNorm's running statistics, in place, to the average of the batch
    statistics that the network run as ``mode`` (the whole network, columns=k or column=k) sees
    over the training set, without augmentation, dropout or drop-path. Drop-path trains many
    sub-networks, and the running averages mix their statistics; the network evaluated has its
    own (the BatchNorm re-estimation of Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021)."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    model.eval()
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # the cumulative average
        bn.train()
    with torch.no_grad(), autocast(args, device):
        for images, _ in data.batches(dataset.train, args.batch_size, torch.arange(len(dataset.train)),
                                      dataset.image_size):
            model(prepared(images, dataset, args, device), **mode)
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
    model.eval()


def drop_path_arguments(model: nn.Module, generators: dict, world: int) -> Callable[[], dict]:
    """The drop-path arguments of each training step's forward. Drawn per batch (without
    skip_dropped), the structure is drawn here, on the host, from the run's drop-path generator
    (the same on every rank) and passed in: eager, compiled and graphed steps take the same
    structures and run the same step for each (a compiled step one graph per structure). A local
    batch's masks come from the device's default generator, or with several ranks from the
    shared host generator, since every rank must drop alike. With skip_dropped the model draws
    everything on the host from that generator."""
    if not (isinstance(model, FractalNet) and model.drop_path_per == "batch"):
        return dict
    generator = generators["drop_path"]
    if model.skip_dropped:
        return lambda: {"generator": generator}
    masks = generator if world > 1 else None

    def arguments():
        structure = model.draw_structure(generator)
        return {"structure": structure, "generator": masks} if structure == "local" else {"structure": structure}

    return arguments


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


def train_epoch(epoch, forward, optimizer, scaler, dataset, args, device, generators, rank, world,
                verbose: bool = True, graphed: Optional[GraphedTrainingStep] = None,
                drop_path: Callable[[], dict] = dict) -> dict:
    """One epoch over this rank's shard of a permutation shared by all ranks (full batches only);
    ``drop_path()`` gives each step's drop-path arguments (drop_path_arguments); with
    ``graphed``, each step a replay of its CUDA graphs."""
    permutation = torch.randperm(len(dataset.train), generator=generators["data"])
    shard = permutation[rank::world]
    steps = len(permutation) // world // args.batch_size
    shard = shard[: steps * args.batch_size]
    augment = generators["augment"] if args.augment == "plus" else None
    # Loss and accuracy stay on the device, read once at the end of the epoch: no step waits for
    # the GPU to report them.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(data.batches(dataset.train, args.batch_size, shard, dataset.image_size), total=steps,
               desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if rank == 0 and verbose else True, leave=False)
    for images, labels in bar:
        labels = copy_to_device(labels, device)
        if graphed is not None:
            graphed(prepared(images, dataset, args, device, augment), labels)
            seen += len(labels)
            bar.set_postfix(img_s=f"{seen * world / (time.perf_counter() - start):.0f}")
            continue
        with autocast(args, device):
            out = forward(prepared(images, dataset, args, device, augment), **drop_path())
            loss = F.cross_entropy(out.float(), labels)
        optimizer.zero_grad(set_to_none=False)  # see give_every_parameter_a_gradient
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (out.argmax(1) == labels).sum()
        seen += len(labels)
        bar.set_postfix(img_s=f"{seen * world / (time.perf_counter() - start):.0f}")
    if graphed is not None:
        train_loss, train_accuracy = graphed.epoch_totals()
    else:
        loss_total, correct_total = torch.stack([loss_sum, correct.double()]).tolist()  # the epoch's one read
        train_loss, train_accuracy = loss_total / seen, correct_total / seen
    elapsed = time.perf_counter() - start
    return dict(train_loss=train_loss, train_accuracy=train_accuracy, images_per_s=seen * world / elapsed,
                epoch_seconds=elapsed)


def graphed_step(model, optimizer, dataset, args, device, generators, graphed=None, capture=None):
    """The run's GraphedTrainingStep (made once, on a batch of the training set's shapes)."""
    if graphed is not None:
        return graphed
    images, labels = next(data.batches(dataset.train, args.batch_size, torch.arange(args.batch_size),
                                       dataset.image_size))
    return GraphedTrainingStep(model, optimizer, prepared(images, dataset, args, device),
                               copy_to_device(labels, device), generator=generators.get("drop_path"), capture=capture)


def reestimated(model: nn.Module, dataset: data.Dataset, args, device, **mode) -> nn.Module:
    """A copy of ``model`` with its BatchNorm statistics re-estimated for the sub-network
    ``mode`` (the whole network, columns=k or column=k) over the training set, in this process
    alone: the copy has no process group (a rank sees the whole training set here, and may be the
    only one evaluating)."""
    group = getattr(model, "process_group", None)
    model = copy.deepcopy(model, memo={id(group): None} if group is not None else None)
    reestimate_batchnorm(model, dataset, args, device, **mode)
    return model


def anytime_table(model: FractalNet, dataset, args, device, reestimate: bool = False) -> list[dict]:
    """Accuracy and latency of each single column and each truncation columns=k; with
    ``reestimate`` (``model`` holding the whole network's re-estimated statistics), each other
    sub-network with BatchNorm statistics re-estimated for it (on a copy)."""
    rows = []
    for mode in ("column", "columns"):
        for k in range(1, model.num_columns + 1):
            whole = mode == "columns" and k == model.num_columns
            evaluated = reestimated(model, dataset, args, device, **{mode: k}) if reestimate and not whole else model
            evaluate(evaluated, dataset, args, device, **{mode: k})  # warm-up
            _, accuracy, seconds = evaluate(evaluated, dataset, args, device, **{mode: k})
            depth = sum(len(block.columns[k - 1]) for block in model.blocks)
            rows.append(dict(mode=mode, k=k, depth=depth, accuracy=accuracy,
                             ms_per_image=1e3 * seconds / len(dataset.test)))
    return rows


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_plots(history: list[dict], anytime: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot(epochs, [h["test_loss"] for h in history], label="test")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [100 * (1 - h["test_accuracy"]) for h in history])
    right.set(xlabel="epoch", ylabel="test error (%)", title="test error")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("column", "o"), ("columns", "s")):
        rows = [r for r in anytime if r["mode"] == mode]
        label = "single column k" if mode == "column" else "truncation columns=k"
        left.plot([r["depth"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker, label=label)
        right.plot([r["ms_per_image"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker, label=label)
    left.set(xlabel="depth of column k (conv layers)", ylabel="test accuracy (%)", title="accuracy by depth")
    right.set(xlabel="latency (ms per image)", ylabel="test accuracy (%)", title="accuracy by latency")
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "anytime.png", dpi=100)
    plt.close(fig)


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def check_cuda_graphs(args, device: torch.device, world: int) -> None:
    """--cuda-graphs: what the graphed step needs (fractalnet.graphs), as CLI errors."""
    if device.type != "cuda":
        raise CLIError(f"--cuda-graphs needs a CUDA device, got {device}")
    refused = {"--skip-dropped": args.skip_dropped, "--compile": args.compile, "--amp": args.amp,
               "--sync-bn or several processes": args.sync_bn or world > 1, "--no-fused": not args.fused}
    for option, given in refused.items():
        if given:
            raise CLIError(f"--cuda-graphs does not combine with {option}")


def run(argv=None) -> dict:
    args, checkpoint = resolve(argv)
    rank, world, device = distributed_setup(args)
    dataset = load_dataset(args, world)
    if args.sync_bn and args.skip_dropped:
        raise CLIError("--sync-bn and --skip-dropped do not combine: compact segments keep per-rank statistics")
    if args.cuda_graphs:
        check_cuda_graphs(args, device, world)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, dataset, device)
    if args.sync_bn and world > 1:
        if args.fused:
            model.process_group = dist.group.WORLD
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        return fit(model, dataset, args, device, rank=rank, world=world, checkpoint=checkpoint)
    finally:
        if world > 1:
            dist.destroy_process_group()


def load_dataset(args, world: int = 1) -> data.Dataset:
    """The run's dataset, with the options that depend on it checked and settled."""
    try:
        dataset = data.load(args.dataset, args.data, args.image_size, args.seed)
    except data.DataError as error:
        raise CLIError(str(error)) from None
    args.image_size = dataset.image_size
    if args.augment is None:
        args.augment = "none" if args.dataset == "digits" else "plus"
    if args.batch_size < 1 or args.batch_size * world > len(dataset.train):
        raise CLIError(f"--batch-size {args.batch_size} cannot be filled: {len(dataset.train)} training images "
                       f"for {world} process(es)")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be at least 1, got {args.epochs}")
    return dataset


def fit(model: nn.Module, dataset: data.Dataset, args, device: torch.device, *, rank: int = 0, world: int = 1,
        checkpoint: Optional[dict] = None, verbose: bool = True,
        monitor: Optional[Callable[[nn.Module], dict]] = None) -> dict:
    """Trains ``model`` (a FractalNet, or any classifier, such as a column extracted from one)
    with the recipe in ``args``: SGD with momentum, the paper's schedule, checkpoints and
    metrics under ``args.out``. A FractalNet also gets its anytime table. ``monitor(model)``, if
    given, runs after each epoch's test and its dict joins that epoch's history (it must leave
    the model and the random streams as it found them). Returns the result."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    generators = {"data": torch.Generator().manual_seed(args.seed),
                  "augment": torch.Generator(device=device).manual_seed(args.seed + 1 + rank)}
    torch.manual_seed(args.seed + 2 + rank)  # dropout and per-sample drop-path: independent per rank
    draws_per_batch = isinstance(model, FractalNet) and model.drop_path_per == "batch"
    if draws_per_batch:  # one draw for the whole global batch: the same on every rank
        generators["drop_path"] = torch.Generator().manual_seed(args.seed + 2**31)
    history, best, start_epoch = [], 0.0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history, best, start_epoch = checkpoint["history"], checkpoint["best_accuracy"], checkpoint["epoch"]
        generators["data"].set_state(checkpoint["rng"]["data"])
        if draws_per_batch and checkpoint["rng"].get("drop_path") is not None:
            generators["drop_path"].set_state(checkpoint["rng"]["drop_path"])
        if rank == 0:  # the other ranks' streams were not saved: they restart from their seeds
            generators["augment"].set_state(checkpoint["rng"]["augment"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    # A batch drawn global runs one column, and skip_dropped may leave a segment without
    # samples: those steps leave parameters without a gradient.
    leaves_parameters_out = isinstance(model, FractalNet) and (draws_per_batch or model.skip_dropped)
    trained = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=leaves_parameters_out)
               if world > 1 else model)
    # (A checkpoint of an older run may hold compile=True: the default mode.)
    forward = torch.compile(trained, mode=None if args.compile in (True, "default") else args.compile) \
        if args.compile else trained
    give_every_parameter_a_gradient(model)
    drop_path = drop_path_arguments(model, generators, world)
    graphed = None
    out = Path(args.out) if args.out else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    report = rank == 0 and verbose

    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start_epoch, last_epoch):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        model.train()
        if args.cuda_graphs:
            graphed = graphed_step(model, optimizer, dataset, args, device, generators, graphed)
        stats = train_epoch(epoch, forward, optimizer, scaler, dataset, args, device, generators, rank, world,
                            verbose, graphed, drop_path)
        test_loss, test_accuracy, _ = evaluate(model, dataset, args, device)
        history.append(dict(epoch=epoch + 1, lr=lr_at(epoch, args), **stats, test_loss=test_loss,
                            test_accuracy=test_accuracy, **(monitor(model) if monitor is not None else {})))
        improved = test_accuracy > best
        best = max(best, test_accuracy)
        if report:
            print(f"epoch {epoch + 1}/{args.epochs}  lr {lr_at(epoch, args):.4g}  loss {stats['train_loss']:.4f}  "
                  f"train acc {100 * stats['train_accuracy']:.2f}%  test acc {100 * test_accuracy:.2f}%  "
                  f"{stats['images_per_s']:.0f} img/s  {stats['epoch_seconds']:.1f} s", flush=True)
        if out is not None and rank == 0:
            state = dict(
                format=CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch + 1,
                args={k: v for k, v in vars(args).items() if k in DEFAULTS}, history=history, best_accuracy=best,
                schedule=dict(milestones=milestones(args.epochs), gamma=0.1),
                rng=dict(torch=torch.get_rng_state(), data=generators["data"].get_state(),
                         augment=generators["augment"].get_state(),
                         drop_path=generators["drop_path"].get_state() if draws_per_batch else None,
                         cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
            )
            save_atomically(state, out / "last.pt")
            if improved:
                save_atomically(state, out / "best.pt")

    result = dict(args={k: v for k, v in vars(args).items() if k in DEFAULTS}, history=history,
                  final_accuracy=history[-1]["test_accuracy"] if history else None, best_accuracy=best)
    if world > 1:
        # Parameters agree across ranks; running statistics too with --sync-bn.
        print(f"rank {rank}: weights sha256 {digest(model.parameters())} "
              f"buffers sha256 {digest(model.buffers())}", flush=True)
    finished = last_epoch == args.epochs and isinstance(model, FractalNet)
    reestimate = (finished and args.reestimate_bn and (model.local_drop or model.global_ratio)
                  and model.num_columns > 1)
    if reestimate:  # on every rank: synchronised BatchNorm gathers the statistics of all
        reestimate_batchnorm(model, dataset, args, device)
    if rank == 0 and finished:
        if reestimate:
            _, accuracy, _ = evaluate(model, dataset, args, device)
            result.update(final_accuracy_running_stats=result["final_accuracy"], final_accuracy=accuracy)
            if report:
                print(f"BatchNorm statistics re-estimated for the whole network: test acc "
                      f"{100 * result['final_accuracy_running_stats']:.2f}% -> {100 * accuracy:.2f}%", flush=True)
            if out is not None:
                checkpoint_state = torch.load(out / "last.pt", weights_only=False)
                checkpoint_state["model"] = model.state_dict()
                save_atomically(checkpoint_state, out / "last.pt")
        anytime = anytime_table(model, dataset, args, device, reestimate=reestimate)
        result.update(anytime=anytime, peak_memory_bytes=peak_memory_bytes(device),
                      images_per_s=sum(h["images_per_s"] for h in history) / max(len(history), 1))
        if report:
            print("\nanytime prediction (test set)\n  mode     k  depth  accuracy  ms/image")
            for r in anytime:
                print(f"  {r['mode']:<7} {r['k']:>2}  {r['depth']:>5}  {100 * r['accuracy']:7.2f}%  "
                      f"{r['ms_per_image']:8.3f}")
        if out is not None:
            (out / "metrics.json").write_text(json.dumps(result, indent=1))
            write_plots(history, anytime, out)
            if report:
                print(f"\nwrote {out}/metrics.json, curves.png, anytime.png, last.pt, best.pt")
    return result


def main(argv=None) -> int:
    try:
        run(argv)
    except CLIError as error:
        print(f"fractalnet train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
