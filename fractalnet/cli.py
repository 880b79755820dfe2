"""The ``fractalnet`` console script: ``fractalnet train [options]`` or ``fractalnet experiments ...``.

Apart from both commands' modules, so that neither imports the other's (experiments builds on
train; train knows nothing of experiments).
"""

from __future__ import annotations

import sys

from . import experiments, train

USAGE = ("usage: fractalnet train [options] | fractalnet experiments {depth,drop-path,anytime,all} [options]\n"
         "       (--help after either for its options)")


def console(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train.main(argv[1:])
    if argv[:1] == ["experiments"]:
        return experiments.main(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(console())
