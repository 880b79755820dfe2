"""The paper's named FractalNet configurations, and create_model to build one."""

from __future__ import annotations

from .model import FractalNet

_CONFIGS = {
    "fractalnet20_cifar": dict(widths=(64, 128, 256, 512, 512), columns=3, dropout=(0.0, 0.1, 0.2, 0.3, 0.4)),
    "fractalnet40_cifar": dict(widths=(64, 128, 256, 512, 512), columns=4, dropout=(0.0, 0.1, 0.2, 0.3, 0.4)),
    "fractalnet34_imagenet": dict(
        widths=(64, 128, 256, 512), columns=4, dropout=(0.0, 0.0, 0.0, 0.0), imagenet_stem=True
    ),
}


def list_models() -> list[str]:
    """The names create_model knows."""
    return sorted(_CONFIGS)


def model_config(name: str) -> dict:
    """The FractalNet arguments of a named configuration (see list_models)."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return dict(_CONFIGS[name])


def create_model(name: str, num_classes: int, **overrides) -> FractalNet:
    """A FractalNet of a named configuration (see list_models); keyword arguments override it.

    fractalnet20_cifar: C=3, 5 blocks of widths 64..512 (33,724,618 parameters for 10 classes);
    fractalnet40_cifar: C=4; fractalnet34_imagenet: a 7x7 stem and four C=4 blocks (34 layers).
    """
    return FractalNet(num_classes, **{**model_config(name), **overrides})
