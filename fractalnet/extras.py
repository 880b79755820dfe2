"""What only training needs: the ``[train]`` extra (tqdm, matplotlib, scikit-learn, pillow).

The model needs none of it; ``fractalnet train``, ``fractalnet experiments`` and
``fractalnet.training`` check for all of it before they start, so that a missing package is a
one-line error at the start of a run, not a traceback at its end (the plots)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Optional

#: The modules the training extra provides, and the distributions they come from.
TRAIN_MODULES = {"tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn", "PIL": "pillow"}


class MissingExtra(ImportError):
    """An optional dependency of what was asked for is not installed."""


def require_train_extra(what: str) -> None:
    """Raises MissingExtra naming ``what``, the missing packages and the install command."""
    missing = [package for module, package in TRAIN_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}, which the [train] extra installs: "
                           "pip install 'fractal-kernels[train]'")


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``, None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
