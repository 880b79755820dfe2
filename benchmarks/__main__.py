"""python -m benchmarks [--quick] [--gpu-only] [--out DIR]

With a GPU: kernel benchmarks (eager reference, torch.compile of it and the fused Triton op, side
by side, on the copy-bandwidth roofline), whole-model training steps and anytime inference. On
any machine, what a CPU measures exactly: bytes saved for backward, kernel launches and
device-to-host reads per op and per training step (fake and meta tensors), memory traffic counted
in the Triton interpreter against each op's minimal bytes, the compile audit's registers and
occupancy, and the host time the package adds (launches stubbed) beside the eager model's.
Writes <out>/<device>-<date>.json and .md (and .png plots on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from tqdm import tqdm

from . import cases, kernels, models, report
from .measure import device_name

RESULTS = Path(__file__).resolve().parent / "results"

NO_GPU_NOTE = (
    "No GPU used in this run: the tables hold what a CPU measures exactly (bytes saved for backward, "
    "kernel launches, minimal bytes) and CPU wall times of the eager reference, labelled CPU. "
    "No Triton timing is reported: the interpreter is not a performance measure."
)

#: Shapes whose eager reference a CPU run times, forward and backward: FractalNet-20's first and
#: last blocks at batch 100 (--quick: the last).
CPU_TIMED_SHAPES = [(100, 64, 32, 32), (100, 512, 2, 2)]
#: (network, batch) of the per-step memory and launch measurements.
STEPS = [("fractalnet20_cifar", 16), ("fractalnet20_cifar", 100), ("fractalnet34_imagenet", 32)]


def environment(device) -> dict:
    return dict(
        device=device_name(device), date=datetime.date.today().isoformat(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda if device is not None else None,
        python=platform.python_version(),
    )


def run(quick: bool, out: Path, cpu: bool = False, gpu_only: bool = False) -> dict:
    """Every measurement (``gpu_only``: only the GPU timings, which the CPU reports cannot hold).
    The report is written as the GPU rows come (the training steps first), so a run stopped
    part-way keeps what it measured."""
    device = torch.device("cuda") if torch.cuda.is_available() and not cpu else None
    result = dict(environment=environment(device), quick=quick, gpu_only=gpu_only)
    if device is None:
        print(NO_GPU_NOTE, flush=True)  # also with --cpu
        result["note"] = NO_GPU_NOTE
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", ("cpu" if device is None else result["environment"]["device"]).lower()).strip("-")
    stem = out / f"{slug}-{result['environment']['date']}{'-quick' if quick else ''}"

    def checkpoint():
        report.write_json(result, stem.with_suffix(".json"))

    if not gpu_only:
        _cpu_measurements(result, quick, device)
    if device is not None:
        model_cases = [
            models.ModelCase(network, implementation, dtype, channels_last)
            for network in (["fractalnet20_cifar"] if quick else models.BENCHMARKED)
            for implementation in models.IMPLEMENTATIONS
            for dtype in ((torch.bfloat16,) if quick else (torch.float32, torch.bfloat16))
            for channels_last in (False, True)
        ]
        result["models_gpu"] = []
        for case in tqdm(model_cases, desc="models"):
            result["models_gpu"].append(models.gpu_training_row(case, device))
            checkpoint()
        result["anytime_gpu"] = [
            row for network in (["fractalnet20_cifar"] if quick else models.BENCHMARKED)
            for row in models.gpu_anytime_rows(network, device, torch.bfloat16)
        ]
        result["kernels_gpu"] = []
        for case in tqdm(cases.op_cases(quick), desc="kernels"):
            result["kernels_gpu"].append(kernels.gpu_row(case, device))
            checkpoint()
        result["goals"] = report.goal_rows(result["kernels_gpu"])

    checkpoint()
    stem.with_suffix(".md").write_text(report.markdown(result))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md"), *report.plots(result, stem)]
    print("wrote " + ", ".join(str(p) for p in written))
    return result


def _cpu_measurements(result: dict, quick: bool, device) -> None:
    """What a CPU measures exactly (saved bytes, launches, traffic, the compile audit, host time)."""
    exact_cases = cases.op_cases(quick, dtypes=(torch.float32,))
    exact_cases = [c for c in exact_cases if not c.channels_last]
    timed_shapes = [] if device is not None else CPU_TIMED_SHAPES[-1:] if quick else CPU_TIMED_SHAPES
    result["kernels_cpu"] = [
        kernels.cpu_row(case, time_reference=case.shape in timed_shapes)
        for case in tqdm(exact_cases, desc="ops: saved bytes and launches")
    ]
    steps = STEPS[:1] if quick else STEPS
    result["steps"] = [
        dict(network=network, batch=batch, implementations=models.step_measurements(network, batch))
        for network, batch in tqdm(steps, desc="training steps: saved bytes and launches")
    ]
    result["cpu_times"] = [
        dict(what=f"eager {r['label']} forward+backward", **r["eager"]["cpu_forward_backward_ms"])
        for r in result["kernels_cpu"]
        if "cpu_forward_backward_ms" in r["eager"]
    ]
    if timed_shapes:
        step = models.cpu_eager_step_ms("fractalnet20_cifar", 4 if quick else 16)
        result["cpu_times"].append(dict(what=f"eager fractalnet20_cifar training step, batch {step['batch']}", **step))
    print("traffic (interpreter), compile audit and host time run in subprocesses", flush=True)
    result["traffic"] = _subprocess_json(["benchmarks.traffic"], quick, interpret=True)
    audit = _subprocess_json(["fractal_kernels.audit", "--arch", "90", *([] if quick else ["80"])], quick,
                             interpret=False)
    result["occupancy"] = report.occupancy_rows(audit)
    result["host"] = _subprocess_json(["benchmarks.host"], quick, interpret=False)
    if not quick:
        # Work skipped by skip_dropped: a real measurement on whatever device this is.
        result["skip"] = [
            models.skip_measurements(network, 64, 3, device or torch.device("cpu"))
            for network in tqdm(("fractalnet20_cifar", "fractalnet40_cifar"), desc="skip_dropped")
        ]


def _subprocess_json(module_and_args: list[str], quick: bool, interpret: bool):
    """Runs ``python -m module args [--quick] --json PATH`` (with or without the Triton
    interpreter, which must be chosen before triton is imported) and returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        command = [sys.executable, "-m", *module_and_args, *(["--quick"] if quick else []), "--json", str(path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if not path.exists():
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of the shapes, dtypes and models")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    parser.add_argument("--cpu", action="store_true", help="the CPU measurements only, even with a GPU present")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU timings (none without a GPU); the CPU-exact sections are the CPU reports'")
    args = parser.parse_args(argv)
    run(args.quick, args.out, args.cpu, args.gpu_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
