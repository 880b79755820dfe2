"""Datasets for the training CLI, read from local files only (nothing is downloaded), and batch
augmentation done on the device.

* ``digits``: the handwritten digits scikit-learn ships (1797 8x8 images, 10 classes), with a
  fixed seeded 80/20 train/test split: the embedded default.
* ``cifar10`` / ``cifar100``: the standard python-pickle layout (cifar-10-batches-py,
  cifar-100-python) under ``--data``.
* ``imagefolder``: ``--data``/train/<class>/*.jpg and ``--data``/val/<class>/*.jpg, read with Pillow.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


class DataError(ValueError):
    """A dataset that is missing or not in the expected layout (the message shows the layout)."""


@dataclass
class Split:
    """Images (uint8, [N, C, H, W], on CPU or the device) and int64 labels, or, for image folders,
    a list of files read per batch."""

    images: Optional[torch.Tensor]
    labels: torch.Tensor
    files: Optional[list[Path]] = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]


CIFAR_LAYOUT = {
    "cifar10": "DIR/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch} (python pickles)",
    "cifar100": "DIR/cifar-100-python/{train, test} (python pickles)",
}
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/<image files> and DIR/val/<class>/<image files> (JPEG, PNG, ...)"


def load(name: str, data_dir: Optional[str], image_size: Optional[int], seed: int = 0) -> Dataset:
    """The named dataset; ``image_size`` resizes it (default: its own size, 32 for digits)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits(image_size or 32, seed)
    if data_dir is None:
        layout = CIFAR_LAYOUT.get(name, IMAGEFOLDER_LAYOUT)
        raise DataError(f"--data DIR is needed for {name}; expected layout: {layout}")
    root = Path(data_dir)
    if not root.is_dir():
        layout = CIFAR_LAYOUT.get(name, IMAGEFOLDER_LAYOUT)
        raise DataError(f"data folder {root} does not exist; expected layout: {layout}")
    if name == "imagefolder":
        return _image_folder(root, image_size or 224)
    return _cifar(name, root, image_size)


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _with_statistics(name, train, test, num_classes) -> Dataset:
    pixels = train.images.float() / 255
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    return Dataset(name, train, test, num_classes, train.images.shape[1], train.images.shape[-1], mean, std)


def _digits(image_size: int, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    images = _resized(images, image_size)
    train = Split(images[order[:cut]], labels[order[:cut]])
    test = Split(images[order[cut:]], labels[order[cut:]])
    return _with_statistics("digits", train, test, 10)


def _unpickle(path: Path, name: str) -> dict:
    if not path.is_file():
        raise DataError(f"missing {path}; expected layout: {CIFAR_LAYOUT[name]}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as error:
        raise DataError(f"cannot read {path} ({error}); expected layout: {CIFAR_LAYOUT[name]}") from None


def _cifar_split(batches: list[dict], path: Path, name: str) -> Split:
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    try:
        data = np.concatenate([b[b"data"] for b in batches])
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.uint8))
    except (KeyError, ValueError) as error:
        raise DataError(f"{path} is not in the CIFAR pickle format ({error}); expected: {CIFAR_LAYOUT[name]}") from None
    return Split(images, torch.from_numpy(labels).long())


def _cifar(name: str, root: Path, image_size: Optional[int]) -> Dataset:
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        folder = root / "cifar-100-python"
        train_files, test_files = ["train"], ["test"]
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}; expected layout: {CIFAR_LAYOUT[name]}")
    train = _cifar_split([_unpickle(folder / f, name) for f in train_files], folder, name)
    test = _cifar_split([_unpickle(folder / f, name) for f in test_files], folder, name)
    if image_size:
        train.images, test.images = _resized(train.images, image_size), _resized(test.images, image_size)
    return _with_statistics(name, train, test, 10 if name == "cifar10" else 100)


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder_split(folder: Path, classes: list[str]) -> Split:
    files, labels = [], []
    for index, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataError(f"no images under {folder}; expected layout: {IMAGEFOLDER_LAYOUT}")
    return Split(None, torch.tensor(labels), files)


def _image_folder(root: Path, image_size: int) -> Dataset:
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataError(f"missing folder {root / part}; expected layout: {IMAGEFOLDER_LAYOUT}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root / 'train'}; expected layout: {IMAGEFOLDER_LAYOUT}")
    train, test = _folder_split(root / "train", classes), _folder_split(root / "val", classes)
    # ImageNet statistics: computing them would read every image.
    return Dataset("imagefolder", train, test, len(classes), 3, image_size, [0.485, 0.456, 0.406],
                   [0.229, 0.224, 0.225])


def read_images(files: list[Path], size: int) -> torch.Tensor:
    """Decodes image files to a uint8 [N, 3, size, size] batch (shorter side resized, center crop)."""
    from PIL import Image

    batch = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            batch.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(batch)


def batches(split: Split, batch_size: int, indices: torch.Tensor,
            size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of ``indices`` in batches; the last partial batch is kept."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = split.images[chunk] if split.images is not None else read_images([split.files[i] for i in chunk], size)
        yield images, split.labels[chunk]


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The paper's "+" augmentation on a batch, on its device: random translation by up to
    ``padding`` pixels (zero-padded crop) and random horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    shifted = padded[batch, channels, rows, cols]
    flip = torch.rand(n, generator=generator, device=generator.device).to(images.device) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def normalize(images: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """uint8 images to normalised float32."""
    constants = _channel_statistics if not is_fake(images) else _channel_statistics.__wrapped__
    mean, std = constants(tuple(dataset.mean), tuple(dataset.std), images.device)
    return (images.float() / 255 - mean) / std


@functools.lru_cache(maxsize=16)
def _channel_statistics(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants as [1, C, 1, 1] tensors on ``device``, made once (not for fake
    tensors): a tensor built from a list every step is a host-to-device copy every step."""
    return tuple(torch.tensor(values, device=device)[None, :, None, None] for values in (mean, std))
