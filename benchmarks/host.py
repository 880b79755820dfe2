"""Host time: the CPU time per op and per training step, fused beside eager in the same run.

    python -m benchmarks.host [--quick] --json PATH        (TRITON_INTERPRET unset)

On the fake GPU (fractal_kernels.testing.fake_gpu) the package takes its GPU path (triton_op
registration, autograd.Functions, tiling, argument lists) and every launch goes through Triton's
own launch path as on a GPU (JITFunction.run's binder, specialisation and cache key, or the
package's direct launches of the compiled variants) up to the C launcher, which only reads the
tensors' pointers. The eager ops run for real on CPU tensors so small (one channel, batch 2) that
their time is dispatch, not arithmetic; neither side includes the CUDA driver's launch of each
kernel. Both sides run the same convolutions and pools, and in a step the same drop-path
structures (the generator is reset before each repeat). Times are the thread's CPU time (the
machine may be shared: wall time is not stable), eager and fused alternated repeat by repeat,
the best repeat kept (the least disturbed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fractal_kernels.testing import fake_gpu

#: Repeats of each measurement (the best is kept; --quick: fewer) and calls per repeat. This
#: machine's speed drifts over seconds: many short repeats, alternated, let both sides meet its
#: quiet spells.
REPEATS, QUICK_REPEATS, CALLS = 21, 7, 50


def best_us(fns: dict[str, Callable[[], object]], calls: int = CALLS, reset: Callable[[], object] = lambda: None,
            repeats: int = REPEATS) -> dict[str, float]:
    """The least mean microseconds of thread CPU time per call of each of ``fns``, over
    ``repeats`` repeats that alternate between them, after a warm-up; names starting with "fused"
    run in ``fused()``. ``reset`` runs before each repeat of each function (to give every side
    the same random draws)."""

    def context(name):
        return fused() if name.startswith("fused") else contextlib.nullcontext()

    for name, fn in fns.items():
        with context(name):
            for _ in range(3):
                fn()
    means: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            reset()
            with context(name):
                start = time.thread_time()
                for _ in range(calls):
                    fn()
                means[name].append((time.thread_time() - start) / calls * 1e6)
    return {name: min(values) for name, values in means.items()}


@contextlib.contextmanager
def fused() -> Iterator[None]:
    """The Triton backend, with launches stopped at the C launcher."""
    import fractal_kernels as fk

    with fake_gpu.stubbed_launches(), fk.use_backend("triton"):
        yield


def _op_cases(ns) -> dict[str, Callable[[], object]]:
    """Forward + backward of each op of namespace ``ns`` (fractal_kernels or its reference) on
    [2, 4, 1, 1] inputs."""

    def inputs(k):
        xs = [torch.randn(2, 4, 1, 1, requires_grad=True) for _ in range(k)]
        params = dict(weights=[torch.rand(4, requires_grad=True) for _ in range(k)],
                      biases=[torch.randn(4, requires_grad=True) for _ in range(k)],
                      running_means=[torch.zeros(4) for _ in range(k)], running_vars=[torch.ones(4) for _ in range(k)])
        return xs, torch.ones(k, 2, dtype=torch.bool), params

    xs1, _, p1 = inputs(1)
    xs3, mask, p3 = inputs(3)
    one = {name: values[0] for name, values in p1.items()}
    return {
        "masked_join k=3": lambda: ns.masked_join(xs3, mask).sum().backward(),
        "bn_relu": lambda: ns.bn_relu(xs1[0], one["weights"], one["biases"], one["running_means"],
                                      one["running_vars"], True).sum().backward(),
        "join_bn_relu k=3": lambda: ns.join_bn_relu(xs3, mask, **p3, training=True).sum().backward(),
    }


def launch_arguments(fn: Callable[[], object]) -> list[dict]:
    """The kernels ``fn`` launches (fused, launches stubbed), each with its launch count and the
    number of arguments it passes (positional and constexpr keywords)."""
    from fractal_kernels.launch import record_launches

    with record_launches(run=True) as records, fused():
        fn()
    counts = Counter((r.kernel.fn.__name__, len(r.kernel.params)) for r in records)
    return [dict(kernel=name, arguments=arguments, launches=n) for (name, arguments), n in counts.items()]


def op_rows(repeats: int = REPEATS) -> list[dict]:
    """Forward + backward of each op: fused and eager (the reference), alternated."""
    import fractal_kernels as fk
    from fractal_kernels import reference

    ops, eager = _op_cases(fk), _op_cases(reference)
    rows = []
    for name in ops:
        times = best_us({"fused": ops[name], "eager": eager[name]}, repeats=repeats)
        rows.append(dict(op=name, fused_us=times["fused"], eager_us=times["eager"],
                         fused_over_eager=times["fused"] / times["eager"], launches=launch_arguments(ops[name])))
    return rows


#: implementation -> model options.
STEP_IMPLEMENTATIONS = {"eager": dict(fused=False), "fused": {}, "fused+recompute": dict(recompute=True),
                        "fused+skip": dict(skip_dropped=True)}


def step_rows(networks: list[str], drop_path_pers: tuple[str, ...] = ("sample", "batch"),
              repeats: int = REPEATS) -> list[dict]:
    """One training step (forward, backward, SGD step) of each network's structure, one channel
    wide, batch 2, drop-path drawn per sample and per batch: the eager model and the fused ones,
    alternated, on the same drop-path draws (one generator, reset before each repeat)."""
    from fractalnet import create_model, model_config

    rows = []
    for network in networks:
        size, classes = (32, 10) if "cifar" in network else (64, 1000)
        for per in drop_path_pers:
            generator = torch.Generator()
            steps = {}
            for implementation, options in STEP_IMPLEMENTATIONS.items():
                torch.manual_seed(0)
                widths = (1,) * len(model_config(network)["widths"])
                model = create_model(network, classes, in_channels=1, widths=widths, drop_path_per=per, **options)
                x, labels = torch.randn(2, 1, size, size), torch.randint(classes, (2,))
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                def step(model=model, x=x, labels=labels, optimizer=optimizer):
                    F.cross_entropy(model(x, generator=generator), labels).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                steps[implementation] = step
            times = {name: us / 1e3 for name, us in best_us(steps, calls=5, reset=lambda: generator.manual_seed(1),
                                                            repeats=repeats).items()}
            rows.append(dict(network=network, batch=2, drop_path_per=per, **{f"{k}_ms": v for k, v in times.items()},
                             fused_over_eager=times["fused"] / times["eager"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="FractalNet-20 only, drop-path per batch only")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    fake_gpu.install()
    torch.set_num_threads(1)
    # Stubbed launches leave the fused ops' outputs uninitialised; denormal garbage there would
    # slow the CPU convolutions that read them, a cost no GPU run has.
    torch.set_flush_denormal(True)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    if args.quick:
        steps = step_rows(["fractalnet20_cifar"], ("batch",), repeats)
    else:
        steps = step_rows(["fractalnet20_cifar", "fractalnet40_cifar"], repeats=repeats)
    result = dict(ops=op_rows(repeats), repeats=repeats, steps=steps)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
