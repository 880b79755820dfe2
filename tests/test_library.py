"""library.py: the composite torch.library ops of the public BatchNorm ops declare what they
mutate, and decompose into the kernel ops (what torch traces), single-pass or split as the
tiling has it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fractal_kernels import library

pytestmark = pytest.mark.both_sessions


class OpNames(TorchDispatchMode):
    """The names of the ops dispatched within the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def written(op) -> set[str]:
    return {arg.name for arg in op._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}


def test_schemas_declare_the_running_statistics_they_update():
    assert written(library.join_bn_relu) == {"running_means", "running_vars", "num_batches_tracked"}
    assert written(library.gather_join_bn_relu) == {"running_means", "running_vars", "num_batches_tracked"}
    assert written(library.bn_relu) == {"running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("momentum,kernel_ops", [
    (0.1, ["fractal_kernels.bn_forward"]),  # small: one launch computes and applies the statistics
    (None, ["fractal_kernels.bn_stats", "fractal_kernels.bn_apply"]),  # the cumulative average: split
])
def test_the_composite_ops_decompose_into_the_kernel_ops(momentum, kernel_ops):
    xs = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    params = [[torch.ones(3) for _ in range(2)] for _ in range(2)]
    running = [[torch.zeros(3) for _ in range(2)], [torch.ones(3) for _ in range(2)]]
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    with OpNames() as seen:
        library.join_bn_relu(xs, mask, *params, *running, True, momentum, 1e-5, counters)
    assert [name for name in seen.names if name.startswith("fractal_kernels.")] == kernel_ops
    assert all(int(c) == 1 for c in counters)
