"""pytest-benchmark suite of the kernel cases (GPU only): ``pytest benchmarks/``."""

import pytest
import torch

from benchmarks import cases
from benchmarks.kernels import timed_function

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel timings need a CUDA GPU")


@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
@pytest.mark.parametrize("direction", cases.DIRECTIONS)
@pytest.mark.parametrize("case", cases.op_cases(quick=True), ids=lambda c: c.label)
def test_kernel(benchmark, case, direction, implementation):
    device = torch.device("cuda")
    mask = case.drop_path_mask()
    inputs = case.make(device, None if mask is None else mask.to(device))
    fn = timed_function(case, implementation, inputs, direction)

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info["bytes"] = case.minimal_bytes(direction, mask)
    benchmark(run)
