"""Host time: the CPU time per op and per training step, fused beside eager in the same run.

    python -m benchmarks.host [--quick] [--instructions] --json PATH        (TRITON_INTERPRET unset)

On the fake GPU (fractal_kernels.testing.fake_gpu) the package takes its GPU path (triton_op
registration, autograd.Functions, tiling, argument lists) and every launch goes through Triton's
own launch path as on a GPU (JITFunction.run's binder, specialisation and cache key, or the
package's direct launches of the compiled variants) up to the C launcher, which only reads the
tensors' pointers. The eager ops run for real on CPU tensors so small (one channel, batch 2) that
their time is dispatch, not arithmetic; neither side includes the CUDA driver's launch of each
kernel. Both sides run the same convolutions and pools, and in a step the same drop-path
structures (the generator is seeded with the repeat's number before each side's repeat: every
repeat draws other structures). Times are the thread's CPU time (the machine may be shared: wall
time is not stable), eager and fused alternated repeat by repeat: per op the best repeat kept
(the least disturbed), per step the median over repeats and their structures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fractal_kernels.testing import fake_gpu
from fractal_kernels.testing.ops import OPS, OpInputs, OpSpec, full_table

#: Repeats of each measurement (the best is kept; --quick: fewer) and calls per repeat. This
#: machine's speed drifts over seconds: many short repeats, alternated, let both sides meet its
#: quiet spells.
REPEATS, QUICK_REPEATS, CALLS = 21, 7, 50
ROOT = Path(__file__).resolve().parent.parent


def alternated_us(fns: dict[str, Callable[[], object]], calls: int = CALLS,
                  reset: Callable[[int], object] = lambda repeat: None, repeats: int = REPEATS) -> dict[str, list]:
    """The mean microseconds of thread CPU time per call of each of ``fns`` in each of
    ``repeats`` repeats that alternate between them, after a warm-up (one call per repeat's
    reset); names starting with "fused" run in ``fused()``. ``reset(repeat)`` runs before each
    repeat of each function: the same random draws for every side in a repeat."""

    def context(name):
        return fused() if name.startswith("fused") else contextlib.nullcontext()

    for name, fn in fns.items():
        with context(name):
            for repeat in range(repeats):
                reset(repeat)
                fn()
    means: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats):
        for name, fn in fns.items():
            reset(repeat)
            with context(name):
                start = time.thread_time()
                for _ in range(calls):
                    fn()
                means[name].append((time.thread_time() - start) / calls * 1e6)
    return means


def best_us(fns: dict[str, Callable[[], object]], repeats: int = REPEATS) -> dict[str, float]:
    """The least of alternated_us's repeats of each of ``fns`` (calls without random draws)."""
    return {name: min(values) for name, values in alternated_us(fns, repeats=repeats).items()}


@contextlib.contextmanager
def fused() -> Iterator[None]:
    """The Triton backend, with launches stopped at the C launcher."""
    import fractal_kernels as fk

    with fake_gpu.stubbed_launches(), fk.use_backend("triton"):
        yield


def _op_cases(ns) -> dict[str, Callable[[], object]]:
    """Forward + backward of each op (fractal_kernels.testing.OPS) of namespace ``ns``
    (fractal_kernels or its reference) in training, on [2, 4, 1, 1] inputs: one, or three with
    a mask (or gather table) that keeps every sample."""
    cases = {}
    for spec in OPS.values():
        k = 1 if spec.single_input else 3
        inputs = OpInputs([torch.randn(2, 4, 1, 1, requires_grad=True) for _ in range(k)],
                          torch.ones(k, 2, dtype=torch.bool), full_table(k, 2))
        if spec.batch_norm:
            inputs.weights = [torch.rand(4, requires_grad=True) for _ in range(k)]
            inputs.biases = [torch.randn(4, requires_grad=True) for _ in range(k)]
            inputs.running_means = [torch.zeros(4) for _ in range(k)]
            inputs.running_vars = [torch.ones(4) for _ in range(k)]
        cases[spec.name if spec.single_input else f"{spec.name} k={k}"] = _op_case(spec, getattr(ns, spec.name), inputs)
    return cases


def _op_case(spec: OpSpec, fn: Callable, inputs: OpInputs) -> Callable[[], None]:
    return lambda: spec.call(fn, inputs).sum().backward()


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
        times = best_us({"fused": ops[name], "eager": eager[name]}, repeats)
        rows.append(dict(op=name, fused_us=times["fused"], eager_us=times["eager"],
                         fused_over_eager=times["fused"] / times["eager"], launches=launch_arguments(ops[name])))
    return rows


#: implementation -> model options.
STEP_IMPLEMENTATIONS = {"eager": dict(fused=False), "fused": {}, "fused+recompute": dict(recompute=True),
                        "fused+skip": dict(skip_dropped=True)}


def training_step(network: str, per: str, implementation: str, generator: torch.Generator) -> Callable[[], None]:
    """One training step (forward, backward, SGD step) of ``network``'s structure, one channel
    wide, batch 2, drop-path drawn per ``per`` from ``generator``, as ``implementation`` runs it."""
    from fractalnet import create_model, model_config

    size, classes = (32, 10) if "cifar" in network else (64, 1000)
    torch.manual_seed(0)
    widths = (1,) * len(model_config(network)["widths"])
    model = create_model(network, classes, in_channels=1, widths=widths, drop_path_per=per,
                         **STEP_IMPLEMENTATIONS[implementation])
    x, labels = torch.randn(2, 1, size, size), torch.randint(classes, (2,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        F.cross_entropy(model(x, generator=generator), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_rows(networks: list[str], drop_path_pers: tuple[str, ...] = ("sample", "batch"),
              repeats: int = REPEATS) -> list[dict]:
    """One training step (forward, backward, SGD step) of each network's structure, one channel
    wide, batch 2, drop-path drawn per sample and per batch: the eager model and the fused ones,
    alternated, on the same drop-path draws (one generator, seeded with the repeat's number
    before each side's repeat). A step's cost depends on the structure drawn (a per-batch step
    of one column runs its units alone), so each repeat draws other structures: 5 steps a
    repeat, the sides' times the medians over the repeats, and fused / eager the median of the
    repeats' own ratios (each of two sides timed moments apart, on the same structures)."""
    rows = []
    for network in networks:
        for per in drop_path_pers:
            generator = torch.Generator()
            steps = {implementation: training_step(network, per, implementation, generator)
                     for implementation in STEP_IMPLEMENTATIONS}
            times = alternated_us(steps, calls=5, reset=generator.manual_seed, repeats=repeats)
            ratio = statistics.median(f / e for f, e in zip(times["fused"], times["eager"]))
            rows.append(dict(network=network, batch=2, drop_path_per=per,
                             **{f"{k}_ms": statistics.median(v) / 1e3 for k, v in times.items()},
                             fused_over_eager=ratio))
    return rows


#: What a process that counts instructions sets up first: the fake GPU, as main() has it.
_CALLGRIND_SETUP = """
import contextlib, torch
from fractal_kernels.testing import fake_gpu
from fractal_kernels.testing.ops import OPS, OpInputs, OpSpec, full_table
fake_gpu.install()
torch.set_num_threads(1)
torch.set_flush_denormal(True)
from benchmarks import host
"""


def instructions(setup: str, stmt: str, calls: int) -> float:
    """Instructions per call of ``stmt`` (which makes ``calls`` calls) after ``setup``, counted
    by valgrind's callgrind (torch.utils.benchmark's collect_callgrind, denoised) in a process of
    its own: repeatable to well under 1%, where thread time on a shared machine moves 10-15%."""
    from torch.utils.benchmark import Timer

    # collect_callgrind's process runs `python` from PATH: make it this one, with this tree.
    saved = {name: os.environ.get(name) for name in ("PATH", "PYTHONPATH")}
    os.environ["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), saved["PATH"]]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    try:
        stats = Timer(stmt, setup=_CALLGRIND_SETUP + setup).collect_callgrind(number=1, collect_baseline=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return stats.counts(denoise=True) / calls


def counting_setup(fused_side: bool, build: str, warm_up: str) -> str:
    """What a counting process runs after _CALLGRIND_SETUP: ``build`` (the case), the side, and
    ``warm_up``. The fused side's context is held by a global of the process: entered and left
    unreferenced, a context manager is collected, and so exited, at once (the fused side then
    ran the reference ops)."""
    return (f"{build}\nside = contextlib.ExitStack()\n"
            f"if {fused_side}:\n    side.enter_context(host.fused())\n{warm_up}")


def op_counting(name: str, side: str, calls: int = 20) -> tuple[str, str]:
    """The setup and statement that count forward + backward of op case ``name`` (_op_cases),
    fused or eager, ``calls`` times."""
    namespace = "fractal_kernels" if side == "fused" else "fractal_kernels.reference"
    build = f"import importlib\nfn = host._op_cases(importlib.import_module({namespace!r}))[{name!r}]"
    return counting_setup(side == "fused", build, "for _ in range(3): fn()\n"), f"for _ in range({calls}): fn()"


def step_counting(network: str, per: str, implementation: str, seeds: int = 8) -> tuple[str, str]:
    """The setup and statement that count training steps (training_step) over the drop-path
    draws of ``seeds`` seeds, after the same steps as a warm-up."""
    loop = f"for seed in range({seeds}):\n    generator.manual_seed(seed)\n    step()\n"
    build = (f"generator = torch.Generator()\n"
             f"step = host.training_step({network!r}, {per!r}, {implementation!r}, generator)")
    return counting_setup(implementation != "eager", build, loop), loop


def op_instructions(name: str, side: str, calls: int = 20) -> float:
    """Instructions per forward + backward of op case ``name``, fused or eager."""
    return instructions(*op_counting(name, side, calls), calls)


def step_instructions(network: str, per: str, implementation: str, seeds: int = 8) -> float:
    """Instructions per training step of ``network``, drop-path per ``per``, over ``seeds`` draws."""
    return instructions(*step_counting(network, per, implementation, seeds), seeds)


def instruction_rows(networks: list[str], drop_path_pers: tuple[str, ...]) -> dict:
    """Fused and eager instructions per op and per training step, and their ratios."""
    import fractal_kernels as fk

    ops = []
    for name in _op_cases(fk):
        fused_count, eager_count = op_instructions(name, "fused"), op_instructions(name, "eager")
        ops.append(dict(op=name, fused=fused_count, eager=eager_count, fused_over_eager=fused_count / eager_count))
    steps = []
    for network in networks:
        for per in drop_path_pers:
            fused_count = step_instructions(network, per, "fused")
            eager_count = step_instructions(network, per, "eager")
            steps.append(dict(network=network, batch=2, drop_path_per=per, fused=fused_count, eager=eager_count,
                              fused_over_eager=fused_count / eager_count))
    return dict(ops=ops, steps=steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="FractalNet-20 only, drop-path per batch only")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with valgrind's callgrind instead of timing (needs valgrind)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.instructions:
        if shutil.which("valgrind") is None:
            parser.error("--instructions needs valgrind (Debian: apt install valgrind)")
        networks, pers = ((["fractalnet20_cifar"], ("batch",)) if args.quick else
                          (["fractalnet20_cifar", "fractalnet40_cifar"], ("sample", "batch")))
        with open(args.json, "w") as f:
            json.dump(dict(instructions=instruction_rows(networks, pers)), f, indent=1)
        return 0
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
