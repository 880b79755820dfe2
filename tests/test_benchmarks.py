"""The benchmark runner in its CPU mode: runs, writes its JSON and markdown, and every section it
reports holds what the fused design promises."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cases
from fractal_kernels.audit import SM_COUNT
from fractal_kernels.batchnorm import single_pass
from fractal_kernels.channel_tiling import channel_tiling, tile_for_gpu
from fractal_kernels.testing import count_kernels, fake_mode, saved_bytes
from helpers import gpu_path_env

#: The host benchmark's op cases: every op of fractal_kernels.testing.OPS.
HOST_OPS = {"masked_join k=3", "gather_join k=3", "bn_relu", "join_bn_relu k=3", "gather_join_bn_relu k=3"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    markdown = json_path.with_suffix(".md").read_text()
    return json.loads(json_path.read_text()), result.stdout, markdown


@pytest.mark.slow
def test_cpu_mode_says_so_and_reports_no_kernel_timings(report):
    data, stdout, markdown = report
    assert "No GPU used" in stdout and "No GPU used" in data["note"]
    assert "kernels_gpu" not in data and "models_gpu" not in data
    assert data["environment"]["cuda"] is None and data["environment"]["device"].startswith("CPU")
    assert data["cpu_times"] and all(t["ms"] > 0 for t in data["cpu_times"])
    for title in ("One training step", "Memory traffic", "Compile audit", "Host time"):
        assert f"## {title}" in markdown


def single_pass_on_an_h100(row: dict) -> bool:
    """Whether an H100 tiles the row's inputs in one chunk per channel block (the report counts as it tiles)."""
    layout = torch.channels_last if row["layout"] == "nhwc" else torch.contiguous_format
    x = torch.empty(row["shape"], dtype=getattr(torch, row["dtype"]), device="meta").to(memory_format=layout)
    with tile_for_gpu(SM_COUNT[90]):
        return single_pass(channel_tiling(x, row["k"]), row["k"])


@pytest.mark.slow
def test_per_op_measurements(report):
    data, _, _ = report
    rows = {r["label"]: r for r in data["kernels_cpu"]}
    assert len(rows) == sum(len(spec.ks) for spec in cases.OPS.values()) * len(cases.QUICK_SHAPES)
    for label, row in rows.items():
        fused, eager = row["fused"], row["eager"]
        assert fused["launches_forward"]["aten"] == 0 and fused["launches_backward"]["aten"] == 0, label
        # A gather join's backward launches once per input, over its own rows.
        k = row["k"]
        bn = (1, 1) if single_pass_on_an_h100(row) else (3, 2)
        expected_forward, expected_backward = {"masked_join": (1, 1), "bn_relu": bn, "join_bn_relu": bn,
                                               "gather_join": (1, k), "gather_join_bn_relu": (3, 1 + k)}[row["op"]]
        assert fused["launches_forward"]["triton"] == expected_forward, label
        assert fused["launches_backward"]["triton"] == expected_backward, label
        assert fused["saved_bytes"] < eager["saved_bytes"], label
        assert 0 < row["minimal_bytes"]["forward"] < row["minimal_bytes"]["forward+backward"], label


@pytest.mark.slow
def test_training_step_memory_launches_and_host_reads(report):
    data, _, _ = report
    (step,) = data["steps"]
    assert (step["network"], step["batch"]) == ("fractalnet20_cifar", 16)
    steps = step["implementations"]
    fused, recompute = steps["fused"], steps["fused+recompute"]
    assert recompute["saved_ratio_to_eager"] < fused["saved_ratio_to_eager"] < 1.0
    assert recompute["saved_ratio_to_eager"] <= 0.45
    assert fused["launch_ratio_to_eager"] <= 0.35  # issue 13's goal: single-pass BatchNorms
    assert all(m["host_reads"] == [] for m in steps.values())


@pytest.mark.slow
def test_traffic_occupancy_and_host_sections(report):
    data, _, _ = report
    rows = data["traffic"]["rows"]
    assert {r["op"] for r in rows} == set(cases.OPS)
    for r in rows:
        for direction in ("forward", "backward"):
            assert 1.0 <= r[direction]["counted_over_minimal"] <= 1.05, r["label"]
            assert r[direction]["eager_over_fused"] > 1.0, r["label"]
    occupancy = data["occupancy"]
    assert occupancy and all(r["flagged"] == 0 and r["spill_bytes_max"] == 0 for r in occupancy)
    host = data["host"]
    assert {r["op"] for r in host["ops"]} == HOST_OPS
    assert all(r["fused_us"] > 0 and r["eager_us"] > 0 for r in host["ops"])
    (step,) = host["steps"]
    assert step["eager_ms"] > 0 and step["fused_ms"] > 0


def test_host_repeats_alternate_the_sides_on_the_same_draws():
    """Each repeat resets the draws with its own number before each side: the sides of a repeat
    meet the same structures, and every repeat other ones."""
    from benchmarks import host

    seen, state = [], {}
    fns = {name: (lambda name=name: seen.append((name, state["repeat"]))) for name in ("eager", "other")}
    times = host.alternated_us(fns, calls=2, reset=lambda repeat: state.update(repeat=repeat), repeats=3)
    assert {name: len(values) for name, values in times.items()} == {"eager": 3, "other": 3}
    warm_up, timed = seen[:6], seen[6:]
    assert warm_up == [(name, repeat) for name in ("eager", "other") for repeat in range(3)]
    assert timed == [(name, repeat) for repeat in range(3) for name in ("eager", "other") for _ in range(2)]


def test_instruction_mode_counts_each_side_in_a_process_of_its_own(monkeypatch, tmp_path):
    """--instructions: every op and step counted fused and eager (collect_callgrind stands in:
    a real count takes about 1.5 minutes a process under valgrind), the ratios from the counts,
    and the environment put back."""
    from benchmarks import host

    counted = []

    def instructions(setup, stmt, calls):
        counted.append(setup)
        return 200.0 if "if True:" in setup else 100.0

    monkeypatch.setattr(host, "instructions", instructions)
    monkeypatch.setattr(host.shutil, "which", lambda name: "/usr/bin/valgrind")
    path = os.environ.get("PATH")
    assert host.main(["--quick", "--instructions", "--json", str(tmp_path / "counts.json")]) == 0
    result = json.loads((tmp_path / "counts.json").read_text())["instructions"]
    assert {row["op"] for row in result["ops"]} == HOST_OPS
    assert [(row["network"], row["drop_path_per"]) for row in result["steps"]] == [("fractalnet20_cifar", "batch")]
    assert all(row["fused"] == 200 and row["eager"] == 100 and row["fused_over_eager"] == 2
               for row in result["ops"] + result["steps"])
    assert len(counted) == 2 * len(HOST_OPS) + 2 and os.environ.get("PATH") == path
    # Each setup builds what it counts: compiled as Python, it names the case.
    for setup in counted:
        compile(host._CALLGRIND_SETUP + setup, "<setup>", "exec")


#: Runs counting processes' setups and statements without valgrind, each pair in a namespace of
#: its own, and prints the launches each statement makes: argv holds setup, statement, setup, ...
_COUNT_LAUNCHES = """
import sys
from benchmarks import host
from fractal_kernels.launch import count_launches
for setup, stmt in zip(sys.argv[1::2], sys.argv[2::2]):
    namespace = {}
    exec(host._CALLGRIND_SETUP + setup, namespace)
    with count_launches() as launches:
        exec(stmt, namespace)
    print(launches[0])
"""


@pytest.mark.slow
def test_instruction_counts_run_the_side_they_name():
    """The fused side's counted statements launch the Triton kernels (stubbed) and the eager
    side's none: each side counts the implementation it reports (each side's cases in a process
    of its own, one after another)."""
    from benchmarks import host

    launches = {}
    for side in ("fused", "eager"):
        pairs = [host.op_counting(case, side, calls=2) for case in ("bn_relu", "join_bn_relu k=3")]
        pairs.append(host.step_counting("fractalnet20_cifar", "batch", side, seeds=2))
        result = subprocess.run([sys.executable, "-c", _COUNT_LAUNCHES, *[part for pair in pairs for part in pair]],
                                capture_output=True, text=True, cwd=host.ROOT, env=gpu_path_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        launches[side] = [int(line) for line in result.stdout.split()[-3:]]
    assert all(n > 0 for n in launches["fused"]) and launches["eager"] == [0, 0, 0], launches


def test_instruction_mode_without_valgrind_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from benchmarks import host

    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        host.main(["--instructions", "--json", str(tmp_path / "counts.json")])
    assert "--instructions needs valgrind" in capsys.readouterr().err


def test_minimal_bytes_of_the_bn_relu_two_pass_design():
    case = cases.OpCase("bn_relu", 1, "fractalnet20_cifar", (100, 64, 32, 32), torch.float32, False)
    size = 100 * 64 * 32 * 32 * 4
    with tile_for_gpu(132):  # 50 tiles a channel block: the split kernels
        assert case.minimal_bytes("forward", None) == 3 * size
        assert case.minimal_bytes("backward", None) == 5 * size


def test_saved_bytes_and_kernel_counts_on_fake_tensors():
    with fake_mode():
        x = torch.randn(8, 4, 16, 16, requires_grad=True)
        w = torch.randn(4, requires_grad=True)
        counts = count_kernels(lambda: torch.nn.functional.relu(x * 2).sum())
        saved = saved_bytes(lambda: torch.nn.functional.relu(x * w[None, :, None, None]), exclude=[w])
    assert counts == {"triton": 0, "aten": 3}
    assert saved == 2 * x.numel() * 4  # x (for w's gradient) and the ReLU output
