"""One command for a GPU machine: correctness on the compiled kernels, the benchmarks, a summary.

    python -m benchmarks.gpu_check --out DIR            (make gpu-check GPU_CHECK_OUT=DIR)
    python -m benchmarks.gpu_check --out DIR --dry-run  (no GPU: the same phases at tiny sizes,
                                                         the kernels in the Triton interpreter)

The phases run one after another, each in its own process under its own time limit (together
8 minutes on a GPU, compilation included); each phase's result is merged into DIR/gpu-check.json
and DIR/gpu-check.md as soon as it ends, so a phase that fails, hangs or kills its process costs
only itself:

  environment  GPU, driver, torch, triton, CUDA, Python
  ops          every op x dtype x layout x join kind (and training/eval) against the fp64
               reference, forward and backward, on shapes that fill the GPU: fresh random
               inputs, the allocator's free memory poisoned with NaN first so that an output
               element left unwritten shows
  model        the fused FractalNet-20 training step against the eager one (same weights and
               drop-path draws): output, gradients, running statistics
  compile      torch.compile(fullgraph=True) with Inductor (aot_eager in a dry run) of the ops
               and of a training step, against eager; then, drawn per batch, the compiled step
               of each structure (and with mode reduce-overhead) against the eager one
  graphs       fractalnet.graphs on the paper's recipe, batch 32 and 100: replays against the
               structure-forced eager steps, step time and host time, graphed against eager
  sanitizer    compute-sanitizer memcheck of a short ops run, where the machine has it
  benchmarks   python -m benchmarks --quick --gpu-only (the training steps first, then the
               kernels; its report is written row by row)

DIR then holds at most 7 files: gpu-check.md (the summary table, also printed last),
gpu-check.json (every number and version), gpu-check.log (every phase's output), and the
benchmark report (<device>-<date>-quick.json and .md, and two plots). Triton's and Inductor's
caches go to DIR's parent, so a second call on the same machine does not compile again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import gpu_check_phases as phases

ROOT = Path(__file__).resolve().parent.parent
#: Test hook: "phase=fail|hang|crash,..." makes those phases fail, hang or kill their process.
FAULTS_VARIABLE = "FRACTAL_KERNELS_GPU_CHECK_FAULTS"


@dataclass(frozen=True)
class Phase:
    name: str
    #: Seconds on a GPU, and in a dry run (2 CPU cores, the interpreter).
    limit_s: int
    dry_limit_s: int
    what: str


PHASES = [
    Phase("environment", 15, 60, "GPU, driver and versions"),
    Phase("ops", 170, 300, "every op x dtype x layout x join kind vs the fp64 reference, forward and backward"),
    Phase("model", 40, 120, "fused FractalNet-20 training step vs the eager one"),
    Phase("compile", 80, 300, "torch.compile(fullgraph=True) of the ops and a training step vs eager"),
    Phase("graphs", 40, 300, "fractalnet.graphs: replays vs eager steps, step and host time"),
    Phase("sanitizer", 40, 60, "compute-sanitizer memcheck of a short ops run"),
    Phase("benchmarks", 95, 300, "python -m benchmarks --quick --gpu-only"),
]


# ----------------------------------------------------------------------------------------------
# The driver: one process per phase, results merged as they come
# ----------------------------------------------------------------------------------------------


def run_phases(out: Path, dry_run: bool, names: list[str], limits: dict[str, int]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu-check.log"
    log_path.write_text("")
    report = dict(command=" ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]), dry_run=dry_run, phases={})
    env = _phase_environment(out, dry_run)
    chosen = [phase for phase in PHASES if phase.name in names]
    limit_of = {phase.name: limits.get(phase.name, phase.dry_limit_s if dry_run else phase.limit_s)
                for phase in chosen}
    for number, phase in enumerate(chosen, 1):
        limit = limit_of[phase.name]
        step = f"[gpu-check {number}/{len(chosen)}] {phase.name}"
        print(f"{step}: {phase.what} (limit {limit} s)", flush=True)
        entry = _run_phase(phase, out, dry_run, limit, env, log_path)
        report["phases"][phase.name] = entry
        if phase.name == "environment" and entry.get("details"):
            report["environment"] = entry["details"]
        _write(report, out)
        # What is left is bounded by the limits of the phases to come (each usually ends well before).
        left = sum(limit_of[later.name] for later in chosen[number:])
        print(f"{step}: {entry['status']} in {entry['seconds']:.0f} s: {entry['summary']} "
              f"(at most {left} s left)", flush=True)
    print(summary_markdown(report), flush=True)
    return report


def _phase_environment(out: Path, dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # Caches beside DIR (not in it): a second call on the same machine reuses the compiled kernels.
    env.setdefault("TRITON_CACHE_DIR", str(out.resolve().parent / "gpu-check-triton-cache"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out.resolve().parent / "gpu-check-inductor-cache"))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
        # One thread a phase: on a shared CPU (make test runs two sessions) more would spin.
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _run_phase(phase: Phase, out: Path, dry_run: bool, limit: int, env: dict, log_path: Path) -> dict:
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "a") as log:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--phase", phase.name, "--out", str(out),
                   "--result", str(result_path), "--limit", f"{phase.name}={limit}",
                   *(["--dry-run"] if dry_run else [])]
        log.write(f"\n===== {phase.name}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the phase and anything it started
            process.wait()
            returncode = None
        seconds = time.monotonic() - start
        if returncode is None:  # what it had checkpointed, if anything, is kept
            partial = json.loads(result_path.read_text()) if result_path.exists() else {}
            so_far = f"; so far {partial['summary']}" if partial else ""
            entry = dict(partial, status="timeout", summary=f"stopped at its {limit} s limit{so_far}")
        elif result_path.exists():
            entry = json.loads(result_path.read_text())
        else:
            entry = dict(status="crashed", summary=f"exited with status {returncode} before writing a result")
        if returncode not in (0, None) and entry["status"] == "passed":
            entry = dict(entry, status="failed", summary=f"exited with status {returncode}: {entry['summary']}")
    return dict(entry, seconds=seconds, limit_s=limit, what=phase.what)


def _write(report: dict, out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu-check.md").write_text(summary_markdown(report) + "\n" + details_markdown(report))


def summary_markdown(report: dict) -> str:
    env = report.get("environment", {})
    title = f"# GPU check: {env.get('device', 'unknown device')}" + (" (dry run)" if report["dry_run"] else "")
    versions = ", ".join(f"{k} {env[k]}" for k in ("driver", "cuda", "torch", "triton", "python") if env.get(k))
    lines = [title, "", f"`{report['command']}`" + (f"; {versions}." if versions else "."), "",
             "| phase | status | seconds (limit) | result |", "|---|---|---|---|"]
    for name, entry in report["phases"].items():
        seconds = f"{entry['seconds']:.0f} ({entry['limit_s']})"
        lines.append(f"| {name} | {entry['status']} | {seconds} | {entry['summary']} |")
    return "\n".join(lines) + "\n"


def details_markdown(report: dict) -> str:
    lines = []
    for name, entry in report["phases"].items():
        rows = entry.get("rows") or []
        if not rows:
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def run_one(name: str, dry_run: bool, out: Path, limit: int, small: bool,
            checkpoint: Callable[[dict], None]) -> dict:
    faults = dict(item.split("=") for item in os.environ.get(FAULTS_VARIABLE, "").split(",") if item)
    fault = faults.get(name)
    if fault == "hang":
        time.sleep(3600)
    if fault == "crash":
        os._exit(3)
    if fault == "fail":
        raise RuntimeError(f"fault injected into phase {name} ({FAULTS_VARIABLE})")
    if name == "environment":
        return phases.environment(dry_run, out)
    if name == "ops":
        return phases.ops(dry_run, out, checkpoint, small)
    if name == "sanitizer":
        return phases.sanitize(dry_run, out, limit)
    if name == "benchmarks":
        return phases.benchmarks(dry_run, out, limit)
    if name == "compile":
        return phases.compile_phase(dry_run, out, checkpoint)
    return {"model": phases.model, "graphs": phases.graphs}[name](dry_run, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="output folder (default: gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, the kernels in the Triton interpreter")
    parser.add_argument("--phases", default=",".join(p.name for p in PHASES), help="a comma-separated subset")
    parser.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS",
                        help="another time limit for a phase (repeatable)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # one phase, in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's ops run
    args = parser.parse_args(argv)
    known = {p.name for p in PHASES}
    names = [n for n in args.phases.split(",") if n]
    limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in known or not seconds.isdigit():
            parser.error(f"--limit takes PHASE=SECONDS with PHASE one of {', '.join(sorted(known))}, got {item!r}")
        limits[name] = int(seconds)
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in PHASES)}")
    if args.phase:
        def checkpoint(partial: dict) -> None:
            if args.result:
                args.result.write_text(json.dumps(partial, default=str))

        try:
            result = run_one(args.phase, args.dry_run, args.out, limits.get(args.phase, 60), args.small, checkpoint)
        except Exception as error:
            traceback.print_exc()
            result = dict(status="failed", summary=f"{type(error).__name__}: {error}"[:300])
        checkpoint(result)
        return 0 if result["status"] in ("passed", "skipped") else 1
    report = run_phases(args.out, args.dry_run, names, limits)
    return 0 if all(e["status"] in ("passed", "skipped") for e in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
