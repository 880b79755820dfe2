"""pytest-benchmark suite of the model training steps (GPU only): ``pytest benchmarks/``."""

import pytest
import torch

from benchmarks import models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="model timings need a CUDA GPU")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("implementation", list(models.IMPLEMENTATIONS))
def test_training_step(benchmark, implementation, channels_last):
    device = torch.device("cuda")
    case = models.ModelCase("fractalnet20_cifar", implementation, torch.bfloat16, channels_last)
    _, forward, optimizer, x, labels = case.build(device)
    step = models.training_step(case, forward, optimizer, x, labels, device)

    def run():
        step()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark(run)
