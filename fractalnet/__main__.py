"""``python -m fractalnet``: the ``fractalnet`` command."""

import sys

from .cli import console

sys.exit(console())
