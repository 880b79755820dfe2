"""benchmarks.gpu_check, the one command a GPU machine runs: every phase as a dry run (tiny sizes,
the kernels in the interpreter), so that it cannot rot before a GPU comes; and a phase that
fails, hangs or crashes leaves the other phases' results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import FAULTS_VARIABLE, PHASES

pytestmark = pytest.mark.either_session

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(out: Path, *args: str, faults: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", FAULTS_VARIABLE)}
    if faults:
        env[FAULTS_VARIABLE] = faults
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    result = gpu_check(out)
    return out, result


@pytest.mark.slow
def test_dry_run_runs_every_phase(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert list(report["phases"]) == [p.name for p in PHASES]
    statuses = {name: entry["status"] for name, entry in report["phases"].items()}
    # Without a GPU the sanitizer says so; everything else ran (the graphs with the capture a
    # plain call) and passed.
    assert statuses == {**{p.name: "passed" for p in PHASES}, "sanitizer": "skipped"}
    assert report["phases"]["sanitizer"]["summary"] == "needs a CUDA GPU"
    assert report["phases"]["graphs"]["summary"].startswith("replays match eager steps")
    assert report["phases"]["ops"]["cases"] == 112
    assert report["environment"]["torch"] and report["environment"]["triton"]
    # The summary table is printed last, and kept with the details.
    assert result.stdout.rstrip().endswith("|"), result.stdout[-500:]
    assert "| ops | passed |" in result.stdout and "| ops | passed |" in (out / "gpu-check.md").read_text()


@pytest.mark.slow
def test_dry_run_output_fits_a_commit(dry_run):
    out, _ = dry_run
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20 for f in files)
    names = {f.name for f in files}
    assert {"gpu-check.md", "gpu-check.json", "gpu-check.log"} <= names
    assert any(name.endswith("-quick.json") for name in names)  # the benchmark report
    log = (out / "gpu-check.log").read_text()
    assert all(f"===== {p.name}:" in log for p in PHASES)


@pytest.mark.slow
def test_failing_hanging_and_crashing_phases_leave_the_others(tmp_path):
    out = tmp_path / "out"
    result = gpu_check(out, "--phases", "environment,ops,model,graphs,benchmarks", "--limit", "model=5",
                       "--limit", "ops=5", faults="environment=fail,model=hang,graphs=crash")
    assert result.returncode == 1
    phases = json.loads((out / "gpu-check.json").read_text())["phases"]
    assert {name: entry["status"] for name, entry in phases.items()} == {
        "environment": "failed", "ops": "timeout", "model": "timeout", "graphs": "crashed", "benchmarks": "passed"}
    assert "fault injected" in phases["environment"]["summary"]
    assert phases["model"]["seconds"] < 60 and phases["model"]["limit_s"] == 5
    # A phase stopped at its limit keeps the cases it checked before (0 if it was still importing).
    assert phases["ops"]["summary"].startswith("stopped at its 5 s limit")
    assert phases["ops"].get("cases", 0) < 112
    summary = (out / "gpu-check.md").read_text()
    assert "| model | timeout |" in summary and "| benchmarks | passed |" in summary
    # Progress: each phase numbered as it starts, and when it ends the time the rest may take at
    # most (the sum of their limits).
    limits = {p.name: p.dry_limit_s for p in PHASES} | {"model": 5, "ops": 5}
    names = list(phases)
    for number, name in enumerate(names, 1):
        left = sum(limits[later] for later in names[number:])
        assert f"[gpu-check {number}/5] {name}: " in result.stdout
        assert f"(at most {left} s left)" in result.stdout.split(f"[gpu-check {number}/5] {name}: ")[2]


def test_bad_arguments_are_refused(tmp_path):
    for args, message in ((["--phases", "ops,nope"], "unknown phase"), (["--limit", "ops=soon"], "PHASE=SECONDS")):
        result = gpu_check(tmp_path, *args)
        assert result.returncode == 2 and message in result.stderr
