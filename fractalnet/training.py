"""Training a FractalNet, as a library: the run's configuration (TrainConfig), the model and
dataset it names, the training loop (fit), evaluation, BatchNorm re-estimation and the anytime
table. The CLI (fractalnet.train) and the experiments (fractalnet.experiments) are built on it.

    config = TrainConfig(dataset="digits", epochs=20, widths=(8, 16, 32, 64, 64), out="runs/d")
    dataset, config = load_dataset(config)      # the dataset, and the config it settles
    model = build_model(config, dataset, device)
    result = fit(model, dataset, config, device)

The paper's recipe is the default: SGD with momentum 0.9, lr 0.02, batch 100, 400 epochs, the
learning rate divided by 10 each time the remaining epochs halve.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .drop_path import copy_to_device
from .extras import require_train_extra
from .graphs import GraphedTrainingStep, give_every_parameter_a_gradient
from .configs import create_model
from .model import FractalNet
from .plots import run_subtitle, write_plots

CHECKPOINT_FORMAT = "fractalnet-checkpoint-1"
#: torch.compile's modes, as TrainConfig.compile takes them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A configuration the run cannot have (a dataset it cannot read, a batch it cannot fill, a
    checkpoint of another run): the CLI reports it in one line."""


@dataclass(frozen=True)
class TrainConfig:
    """One run: the model, the data, the recipe and the run's options (``fractalnet train``'s
    options, one field each; None where the model or the dataset decides)."""

    dataset: str = "digits"
    data: Optional[str] = None
    model: str = "fractalnet20_cifar"
    epochs: int = 400
    batch_size: int = 100
    lr: float = 0.02
    weight_decay: float = 0.0
    columns: Optional[int] = None
    widths: Optional[Sequence[int]] = None
    dropout: Optional[Sequence[float]] = None
    local_drop: float = 0.15
    global_ratio: float = 0.5
    drop_path_per: Optional[str] = None
    reestimate_bn: bool = True
    image_size: Optional[int] = None
    augment: Optional[str] = None
    seed: int = 0
    out: Optional[str] = None
    stop_after: Optional[int] = None
    amp: Optional[str] = None
    channels_last: bool = False
    #: False, or one of COMPILE_MODES (True, in an older checkpoint: the default mode).
    compile: object = False
    fused: bool = True
    recompute: bool = False
    skip_dropped: bool = False
    sync_bn: bool = False
    device: Optional[str] = None
    cuda_graphs: bool = False

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The fields, as a checkpoint and metrics.json keep them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config of ``values``; keys it does not know are refused."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown configuration fields: {', '.join(unknown)}")
        return cls(**values)


def resolve_device(name: Optional[str], local_rank: int = 0) -> torch.device:
    """The device of ``--device name``: by default the GPU of this process (``local_rank``) if
    there is one, else the CPU; "cuda" without an index is this process's GPU. A device this
    machine does not have is a ConfigError."""
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                          "use --device cpu")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there is no GPU {index} (this machine has {torch.cuda.device_count()})")
    return torch.device("cuda", index)


def milestones(epochs: int) -> list[int]:
    """Epochs at which the learning rate drops tenfold: each time the remaining epochs halve."""
    return sorted({epochs - epochs // 2**i for i in range(1, 5) if epochs // 2**i > 0})


def lr_at(epoch: int, config) -> float:
    return config.lr * 0.1 ** sum(epoch >= m for m in milestones(config.epochs))


def load_checkpoint(path, option: str = "--resume") -> dict:
    """A ``fractalnet train`` checkpoint (last.pt or best.pt); ``option`` names the argument that
    gave ``path`` in the errors."""
    if not Path(path).is_file():
        raise ConfigError(f"{option}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"{option}: cannot read {path}: truncated or not a checkpoint "
                          f"({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{option}: {path} is not a fractalnet train checkpoint")
    return checkpoint


def load(path, device="cpu", option: str = "path") -> FractalNet:
    """The FractalNet that a ``fractalnet train`` checkpoint holds (``DIR/best.pt`` or
    ``DIR/last.pt``), rebuilt from the run's options, on ``device``, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path, option), device)


def model_from_checkpoint(checkpoint: dict, device="cpu") -> FractalNet:
    """load's model, from a checkpoint already read (load_checkpoint)."""
    state = checkpoint["model"]
    first_conv = state["stem.conv.weight" if "stem.conv.weight" in state else "blocks.0.columns.0.0.conv.weight"]
    model = model_of(TrainConfig.from_dict(checkpoint["args"]), num_classes=state["head.weight"].shape[0],
                     in_channels=first_conv.shape[1])
    model.load_state_dict(state)
    return model.to(device).eval()


def save_atomically(obj, path: Path) -> None:
    """Writes ``obj`` to a temporary file and renames it, so a crash never leaves a broken file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def model_of(config, num_classes: int, in_channels: int) -> FractalNet:
    """The FractalNet a run's config names (its model, with the run's overrides), on the CPU."""
    overrides = {k: getattr(config, k) for k in ("columns", "widths", "dropout") if getattr(config, k) is not None}
    if config.skip_dropped:
        overrides["skip_dropped"] = True
    if config.drop_path_per is not None:
        overrides["drop_path_per"] = config.drop_path_per
    try:
        return create_model(config.model, num_classes, in_channels=in_channels, local_drop=config.local_drop,
                            global_ratio=config.global_ratio, fused=config.fused, recompute=config.recompute,
                            **overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_model(config, dataset: data.Dataset, device: torch.device) -> FractalNet:
    model = model_of(config, dataset.num_classes, dataset.channels)
    if dataset.image_size < model.min_image_size:
        raise ConfigError(f"{len(model.blocks)} blocks need images of at least {model.min_image_size}x"
                          f"{model.min_image_size} (each block pools by 2), got {dataset.image_size}x"
                          f"{dataset.image_size}: raise --image-size or give fewer --widths")
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def autocast(config, device):
    if config.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def prepared(images, dataset, config, device, generator=None):
    """A batch of uint8 images on ``device`` (from pinned memory, without a host wait, to a GPU),
    augmented with ``generator`` if given, normalised, in the run's memory format."""
    images = copy_to_device(images, device)
    if generator is not None:
        images = data.augment(images, generator)
    x = data.normalize(images, dataset)
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def evaluate(model: nn.Module, dataset: data.Dataset, config, device, split: str = "test",
             **mode) -> tuple[float, float, float]:
    """(loss, accuracy, seconds) on ``split`` ("test" or "train", never augmented); ``mode`` is
    columns=k or column=k."""
    model.eval()
    images_of = {"test": dataset.test, "train": dataset.train}[split]
    correct, loss, start = 0, 0.0, time.perf_counter()
    indices = torch.arange(len(images_of))
    with torch.no_grad(), autocast(config, device):
        for images, labels in data.batches(images_of, 500, indices, dataset.image_size):
            labels = copy_to_device(labels, device)
            out = model(prepared(images, dataset, config, device), **mode).float()
            loss += F.cross_entropy(out, labels, reduction="sum").item()
            correct += (out.argmax(1) == labels).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss / len(images_of), correct / len(images_of), time.perf_counter() - start


def reestimate_batchnorm(model: nn.Module, dataset: data.Dataset, config, device, **mode) -> None:
    """Sets every BatchNorm's running statistics, in place, to the average of the batch
    statistics that the network run as ``mode`` (the whole network, columns=k or column=k) sees
    over the training set, without augmentation, dropout or drop-path. Drop-path trains many
    sub-networks, and the running averages mix their statistics; the network evaluated has its
    own (the BatchNorm re-estimation of Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021)."""
    inputs = (prepared(images, dataset, config, device) for images, _ in
              data.batches(dataset.train, config.batch_size, torch.arange(len(dataset.train)), dataset.image_size))
    with autocast(config, device):
        reestimate_batchnorm_over(model, inputs, **mode)


def reestimate_batchnorm_over(model: nn.Module, inputs: Iterable[torch.Tensor], **mode) -> None:
    """reestimate_batchnorm over the batches ``inputs`` (ready for the model): every BatchNorm's
    running statistics become the average of the batch statistics it sees; a BatchNorm the
    network run as ``mode`` does not reach is left reset (num_batches_tracked 0)."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    model.eval()
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # the cumulative average
        bn.train()
    with torch.no_grad():
        for x in inputs:
            model(x, **mode)
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
    model.eval()


def drop_path_arguments(model: nn.Module, generators: dict) -> Callable[[], dict]:
    """The drop-path arguments of each training step's forward. Drawn per batch (without
    skip_dropped), the structure is drawn here, on the host, from the run's drop-path generator
    (the same on every rank) and passed in: eager, compiled and graphed steps take the same
    structures and run the same step for each (a compiled step one graph per structure). A local
    batch's masks come from the device's default generator, which training_state seeds alike on
    every rank, since every rank must drop alike (a generator argument would stop torch.compile
    and CUDA graphs). With skip_dropped the model draws everything on the host from that
    generator."""
    if not (isinstance(model, FractalNet) and model.drop_path_per == "batch"):
        return dict
    generator = generators["drop_path"]
    if model.skip_dropped:
        return lambda: {"generator": generator}
    return lambda: {"structure": model.draw_structure(generator)}


def train_epoch(epoch, forward, optimizer, scaler, dataset, config, device, generators, rank, world,
                verbose: bool = True, graphed: Optional[GraphedTrainingStep] = None,
                drop_path: Callable[[], dict] = dict) -> dict:
    """One epoch over this rank's shard of a permutation shared by all ranks (full batches only);
    ``drop_path()`` gives each step's drop-path arguments (drop_path_arguments); with
    ``graphed``, each step a replay of its CUDA graphs."""
    from tqdm import tqdm

    permutation = torch.randperm(len(dataset.train), generator=generators["data"])
    shard = permutation[rank::world]
    steps = len(permutation) // world // config.batch_size
    shard = shard[: steps * config.batch_size]
    augment = generators["augment"] if config.augment == "plus" else None
    # Loss and accuracy stay on the device, read once at the end of the epoch: no step waits for
    # the GPU to report them.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(data.batches(dataset.train, config.batch_size, shard, dataset.image_size), total=steps,
               desc=f"epoch {epoch + 1}/{config.epochs}", disable=None if rank == 0 and verbose else True, leave=False)
    for images, labels in bar:
        labels = copy_to_device(labels, device)
        if graphed is not None:
            graphed(prepared(images, dataset, config, device, augment), labels)
            seen += len(labels)
            bar.set_postfix(img_s=f"{seen * world / (time.perf_counter() - start):.0f}")
            continue
        with autocast(config, device):
            out = forward(prepared(images, dataset, config, device, augment), **drop_path())
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


def graphed_step(model, optimizer, dataset, config, device, generators, graphed=None, capture=None):
    """The run's GraphedTrainingStep (made once, on a batch of the training set's shapes)."""
    if graphed is not None:
        return graphed
    images, labels = next(data.batches(dataset.train, config.batch_size, torch.arange(config.batch_size),
                                       dataset.image_size))
    return GraphedTrainingStep(model, optimizer, prepared(images, dataset, config, device),
                               copy_to_device(labels, device), generator=generators.get("drop_path"), capture=capture)


def reestimated(model: nn.Module, dataset: data.Dataset, config, device, **mode) -> nn.Module:
    """A copy of ``model`` with its BatchNorm statistics re-estimated for the sub-network
    ``mode`` (the whole network, columns=k or column=k) over the training set, in this process
    alone: the copy has no process group (a rank sees the whole training set here, and may be the
    only one evaluating)."""
    group = getattr(model, "process_group", None)
    model = copy.deepcopy(model, memo={id(group): None} if group is not None else None)
    reestimate_batchnorm(model, dataset, config, device, **mode)
    return model


def anytime_table(model: FractalNet, dataset, config, device, reestimate: bool = False) -> list[dict]:
    """Accuracy and latency of each single column and each truncation columns=k; with
    ``reestimate`` (``model`` holding the whole network's re-estimated statistics), each other
    sub-network with BatchNorm statistics re-estimated for it (on a copy)."""
    rows = []
    for mode in ("column", "columns"):
        for k in range(1, model.num_columns + 1):
            whole = mode == "columns" and k == model.num_columns
            evaluated = reestimated(model, dataset, config, device, **{mode: k}) if reestimate and not whole else model
            evaluate(evaluated, dataset, config, device, **{mode: k})  # warm-up
            _, accuracy, seconds = evaluate(evaluated, dataset, config, device, **{mode: k})
            depth = sum(len(block.columns[k - 1]) for block in model.blocks)
            rows.append(dict(mode=mode, k=k, depth=depth, accuracy=accuracy,
                             ms_per_image=1e3 * seconds / len(dataset.test)))
    return rows


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device: torch.device) -> str:
    """The hardware a run ran on, as its results and figures name it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def load_dataset(config: TrainConfig, world: int = 1) -> tuple[data.Dataset, TrainConfig]:
    """The run's dataset, and the config with what depends on it settled (the image size; the
    augmentation, "plus" for all but digits), after checking the batch and epoch counts."""
    try:
        dataset = data.load(config.dataset, config.data, config.image_size, config.seed)
    except data.DataError as error:
        raise ConfigError(str(error)) from None
    augment = config.augment or ("none" if config.dataset == "digits" else "plus")
    config = config.replace(image_size=dataset.image_size, augment=augment)
    if config.batch_size < 1 or config.batch_size * world > len(dataset.train):
        raise ConfigError(f"--batch-size {config.batch_size} cannot be filled: {len(dataset.train)} training images "
                          f"for {world} process(es)")
    if config.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {config.epochs}")
    if not config.lr > 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be at least 0, got {config.weight_decay}")
    return dataset, config


@dataclass
class TrainingState:
    """What a run carries from epoch to epoch and keeps in its checkpoints."""

    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    #: "data" (the epochs' permutations), "augment", and drawn per batch "drop_path".
    generators: dict
    history: list
    best_accuracy: float
    start_epoch: int


def drop_path_generator(config: TrainConfig) -> torch.Generator:
    """The CPU generator of a run's per-batch drop-path structures, seeded from its config (the
    same on every rank)."""
    return torch.Generator().manual_seed(config.seed + 2**31)


def training_state(model: nn.Module, config: TrainConfig, device: torch.device, rank: int,
                   checkpoint: Optional[dict]) -> TrainingState:
    """The optimizer, gradient scaler and random streams of a run, seeded from ``config`` (and
    torch's generators seeded), or restored from ``checkpoint`` with the model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    generators = {"data": torch.Generator().manual_seed(config.seed),
                  "augment": torch.Generator(device=device).manual_seed(config.seed + 1 + rank)}
    # The same on every rank: a local batch's drop-path masks must agree across ranks, and they
    # come from the device's generator (traceable, and registered with CUDA graphs). Dropout and
    # per-sample drop-path draw alike too, over each rank's own samples.
    torch.manual_seed(config.seed + 2)
    draws_per_batch = isinstance(model, FractalNet) and model.drop_path_per == "batch"
    if draws_per_batch:  # one draw for the whole global batch: the same on every rank
        generators["drop_path"] = drop_path_generator(config)
    state = TrainingState(optimizer, scaler, generators, [], 0.0, 0)
    if checkpoint is None:
        return state
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state.history, state.best_accuracy, state.start_epoch = (checkpoint["history"], checkpoint["best_accuracy"],
                                                             checkpoint["epoch"])
    rng = checkpoint["rng"]
    generators["data"].set_state(rng["data"])
    if draws_per_batch and rng.get("drop_path") is not None:
        generators["drop_path"].set_state(rng["drop_path"])
    torch.set_rng_state(rng["torch"])  # torch's streams are the same on every rank
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    if rank == 0:  # the other ranks' augmentation streams were not saved: they restart from their seeds
        generators["augment"].set_state(rng["augment"])
    return state


def checkpoint_of(model: nn.Module, state: TrainingState, config: TrainConfig, epochs_done: int,
                  device: torch.device) -> dict:
    """What last.pt and best.pt hold after ``epochs_done`` epochs: everything a resumed run
    needs to continue bit for bit (this rank's random streams included)."""
    generators = state.generators
    return dict(
        format=CHECKPOINT_FORMAT, model=model.state_dict(), optimizer=state.optimizer.state_dict(),
        scaler=state.scaler.state_dict() if state.scaler is not None else None, epoch=epochs_done,
        args=config.as_dict(), history=state.history, best_accuracy=state.best_accuracy,
        schedule=dict(milestones=milestones(config.epochs), gamma=0.1),
        rng=dict(torch=torch.get_rng_state(), data=generators["data"].get_state(),
                 augment=generators["augment"].get_state(),
                 drop_path=generators["drop_path"].get_state() if "drop_path" in generators else None,
                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
    )


def compiled(module: nn.Module, config: TrainConfig) -> Callable:
    """The training forward: ``module`` itself, or compiled in the config's mode."""
    if not config.compile:
        return module
    return torch.compile(module, mode=None if config.compile in (True, "default") else config.compile)


def fit(model: nn.Module, dataset: data.Dataset, config: TrainConfig, device: torch.device, *, rank: int = 0,
        world: int = 1, checkpoint: Optional[dict] = None, verbose: bool = True,
        monitor: Optional[Callable[[nn.Module], dict]] = None) -> dict:
    """Trains ``model`` (a FractalNet, or any classifier, such as a column extracted from one)
    with the recipe in ``config`` (settled by load_dataset): SGD with momentum, the paper's
    schedule, checkpoints and metrics under ``config.out``; a finished FractalNet then gets its
    BatchNorm statistics re-estimated and its anytime table (finish). ``monitor(model)``, if
    given, runs after each epoch's test and its dict joins that epoch's history (it must leave
    the model and the random streams as it found them). Returns the result."""
    require_train_extra("fractalnet.training.fit")
    state = training_state(model, config, device, rank, checkpoint)
    # A batch drawn global runs one column, and skip_dropped may leave a segment without
    # samples: those steps reach only some parameters.
    leaves_parameters_out = isinstance(model, FractalNet) and (model.drop_path_per == "batch" or model.skip_dropped)
    trained = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=leaves_parameters_out)
               if world > 1 else model)
    forward = compiled(trained, config)
    give_every_parameter_a_gradient(model)
    drop_path = drop_path_arguments(model, state.generators)
    graphed = None
    out = Path(config.out) if config.out else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    report = rank == 0 and verbose

    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    for epoch in range(state.start_epoch, last_epoch):
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(epoch, config)
        model.train()
        if config.cuda_graphs:
            graphed = graphed_step(model, state.optimizer, dataset, config, device, state.generators, graphed)
        stats = train_epoch(epoch, forward, state.optimizer, state.scaler, dataset, config, device, state.generators,
                            rank, world, verbose, graphed, drop_path)
        test_loss, test_accuracy, _ = evaluate(model, dataset, config, device)
        state.history.append(dict(epoch=epoch + 1, lr=lr_at(epoch, config), **stats, test_loss=test_loss,
                                  test_accuracy=test_accuracy, **(monitor(model) if monitor is not None else {})))
        improved = test_accuracy > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, test_accuracy)
        if report:
            print(f"epoch {epoch + 1}/{config.epochs}  lr {lr_at(epoch, config):.4g}  loss {stats['train_loss']:.4f}  "
                  f"train acc {100 * stats['train_accuracy']:.2f}%  test acc {100 * test_accuracy:.2f}%  "
                  f"{stats['images_per_s']:.0f} img/s  {stats['epoch_seconds']:.1f} s", flush=True)
        if out is not None and rank == 0:
            saved = checkpoint_of(model, state, config, epoch + 1, device)
            save_atomically(saved, out / "last.pt")
            if improved:
                save_atomically(saved, out / "best.pt")

    history = state.history
    result = dict(args=config.as_dict(), history=history,
                  final_accuracy=history[-1]["test_accuracy"] if history else None, best_accuracy=state.best_accuracy)
    if world > 1:
        # Parameters agree across ranks; running statistics too with --sync-bn.
        print(f"rank {rank}: weights sha256 {digest(model.parameters())} "
              f"buffers sha256 {digest(model.buffers())}", flush=True)
    if last_epoch == config.epochs and isinstance(model, FractalNet):
        finish(model, dataset, config, device, rank, result, report)
    return result


def finish(model: FractalNet, dataset: data.Dataset, config: TrainConfig, device: torch.device, rank: int,
           result: dict, report: bool) -> None:
    """The end of a finished run, into ``result``: the BatchNorm statistics re-estimated for the
    whole network (drop-path models, with config.reestimate_bn; on every rank, since
    synchronised BatchNorm gathers them from all) and kept in last.pt; on rank 0 the anytime
    table, metrics.json and the plots."""
    out = Path(config.out) if config.out else None
    reestimate = config.reestimate_bn and bool(model.local_drop or model.global_ratio) and model.num_columns > 1
    if reestimate:
        reestimate_batchnorm(model, dataset, config, device)
    if rank != 0:
        return
    if reestimate:
        _, accuracy, _ = evaluate(model, dataset, config, device)
        result.update(final_accuracy_running_stats=result["final_accuracy"], final_accuracy=accuracy)
        if report:
            print(f"BatchNorm statistics re-estimated for the whole network: test acc "
                  f"{100 * result['final_accuracy_running_stats']:.2f}% -> {100 * accuracy:.2f}%", flush=True)
        if out is not None:
            checkpoint_state = torch.load(out / "last.pt", weights_only=False)
            checkpoint_state["model"] = model.state_dict()
            save_atomically(checkpoint_state, out / "last.pt")
    history = result["history"]
    anytime = anytime_table(model, dataset, config, device, reestimate=reestimate)
    result.update(anytime=anytime, peak_memory_bytes=peak_memory_bytes(device),
                  images_per_s=sum(h["images_per_s"] for h in history) / max(len(history), 1))
    if report:
        print("\nanytime prediction (test set)\n  mode     k  depth  accuracy  ms/image")
        for r in anytime:
            print(f"  {r['mode']:<7} {r['k']:>2}  {r['depth']:>5}  {100 * r['accuracy']:7.2f}%  "
                  f"{r['ms_per_image']:8.3f}")
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        subtitle = run_subtitle(config.dataset, config.epochs, [config.seed], device_name(device), len(dataset.test))
        write_plots(history, anytime, out, subtitle, len(dataset.test))
        if report:
            print(f"\nwrote {out}/metrics.json, curves.png, anytime.png, last.pt, best.pt")
