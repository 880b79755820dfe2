"""Host time: the Python the package adds per op and per training step, with kernel launches
stubbed, side by side with the eager implementation's own host time in the same run.

    python -m benchmarks.host [--quick] --json PATH        (TRITON_INTERPRET unset)

On the fake GPU (fractal_kernels.testing.fake_gpu) the package takes its GPU path (triton_op
registration, autograd.Functions, tiling, argument lists) and every kernel launch returns at
once; the eager ops run for real on CPU tensors so small (one channel, batch 2) that their time
is dispatch, not arithmetic. Both sides run the same convolutions and pools. Neither includes
what a real GPU adds: Triton's own launch path for the fused kernels, the CUDA launch of each
eager ATen op. Each time is the best of several repeats (the least disturbed by the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fractal_kernels.testing import fake_gpu

#: Repeats of each measurement (the best is kept) and calls per repeat.
REPEATS, CALLS = 5, 50


def best_us(fn: Callable[[], object], calls: int = CALLS) -> float:
    """The least mean microseconds per call of ``fn`` over REPEATS repeats, after a warm-up."""
    for _ in range(3):
        fn()
    means = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return min(means)


def op_rows() -> list[dict]:
    """Forward + backward of each op on [2, 4, 1, 1] inputs: fused (launches stubbed) and eager."""
    import fractal_kernels as fk
    from fractal_kernels import reference

    def inputs(k):
        xs = [torch.randn(2, 4, 1, 1, requires_grad=True) for _ in range(k)]
        params = dict(weights=[torch.rand(4, requires_grad=True) for _ in range(k)],
                      biases=[torch.randn(4, requires_grad=True) for _ in range(k)],
                      running_means=[torch.zeros(4) for _ in range(k)], running_vars=[torch.ones(4) for _ in range(k)])
        return xs, torch.ones(k, 2, dtype=torch.bool), params

    def cases(ns):
        xs1, _, p1 = inputs(1)
        xs3, mask, p3 = inputs(3)
        one = {name: values[0] for name, values in p1.items()}
        return {
            "masked_join k=3": lambda: ns.masked_join(xs3, mask).sum().backward(),
            "bn_relu": lambda: ns.bn_relu(xs1[0], one["weights"], one["biases"], one["running_means"],
                                          one["running_vars"], True).sum().backward(),
            "join_bn_relu k=3": lambda: ns.join_bn_relu(xs3, mask, **p3, training=True).sum().backward(),
        }

    rows = []
    with fake_gpu.stubbed_launches(), fk.use_backend("triton"):
        fused = {name: best_us(fn) for name, fn in cases(fk).items()}
    eager = {name: best_us(fn) for name, fn in cases(reference).items()}
    for name in fused:
        rows.append(dict(op=name, fused_us=fused[name], eager_us=eager[name], fused_over_eager=fused[name] / eager[name]))
    return rows


def step_rows(networks: list[str]) -> list[dict]:
    """One training step (forward, backward, SGD step) of each network's structure, one channel
    wide, batch 2: the eager model, and the fused one with launches stubbed."""
    import fractal_kernels as fk
    from fractalnet import create_model, model_config

    from .models import DROP_PATH_PER

    rows = []
    for network in networks:
        size, classes = (32, 10) if "cifar" in network else (64, 1000)
        times = {}
        for implementation, options in (("eager", dict(fused=False)), ("fused", {}),
                                        ("fused+recompute", dict(recompute=True)),
                                        ("fused+skip", dict(skip_dropped=True))):
            torch.manual_seed(0)
            widths = (1,) * len(model_config(network)["widths"])
            model = create_model(network, classes, in_channels=1, widths=widths, drop_path_per=DROP_PATH_PER,
                                 **options)
            x, labels = torch.randn(2, 1, size, size), torch.randint(classes, (2,))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step():
                F.cross_entropy(model(x), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            with fake_gpu.stubbed_launches(), fk.use_backend("triton"):
                times[implementation] = best_us(step, calls=5) / 1e3
        rows.append(dict(network=network, batch=2, **{f"{k}_ms": v for k, v in times.items()},
                         fused_over_eager=times["fused"] / times["eager"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="FractalNet-20 only")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    fake_gpu.install()
    torch.set_num_threads(1)
    networks = ["fractalnet20_cifar"] if args.quick else ["fractalnet20_cifar", "fractalnet40_cifar"]
    result = dict(ops=op_rows(), steps=step_rows(networks))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
