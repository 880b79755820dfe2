"""fractalnet.experiments: a tiny run of each experiment writes its table, its JSON and its plot,
every number is present and in range, and a finished run is not trained again. No claim of the
paper is asserted here: one epoch of two columns decides nothing."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import command_env

from fractalnet import experiments


TINY = ["--dataset", "digits", "--epochs", "1", "--columns", "2", "--image-size", "8", "--device", "cpu"]


def _percent(value):
    return isinstance(value, float) and 0.0 <= value <= 100.0


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    assert experiments.main(["all", "--out", str(out), *TINY]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_each_experiment_writes_table_json_and_plot(finished, name):
    result = json.loads((finished / f"{name}.json").read_text())
    table = (finished / f"{name}.md").read_text()
    assert (finished / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["experiment"] == name and result["dataset"] == "digits" and result["seeds"] == [0]
    assert result["recipe"]["epochs"] == 1 and result["wall_seconds"] > 0
    assert {"device", "torch", "triton", "python"} <= result["environment"].keys()
    # One table row per result row, and no cell left empty or undefined.
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(result["rows"]) + 1
    assert "nan" not in table and "| |" not in table


def test_depth_numbers(finished):
    rows = json.loads((finished / "depth.json").read_text())["rows"]
    blocks = json.loads((finished / "depth.json").read_text())["blocks"]
    assert [(r["columns"], r["depth"]) for r in rows] == [(1, blocks), (2, 2 * blocks)]
    for r in rows:
        for key in ("fractal_error", "deepest_column_error", "plain_error"):
            assert len(r[key]) == 1 and _percent(r[key][0]), (key, r)
        for key in ("fractal_train_loss", "plain_train_loss"):
            assert math.isfinite(r[key][0]) and r[key][0] >= 0, (key, r)
    # One column has no join and no drop-path: trained as a FractalNet or alone, the same network.
    assert rows[0]["fractal_train_loss"] == rows[0]["plain_train_loss"]


def test_depth_records_the_deepest_networks_learning_curves(finished):
    rows = json.loads((finished / "depth.json").read_text())["rows"]
    assert "curves" not in rows[0]
    (curves,) = rows[-1]["curves"]  # one seed
    assert sorted(curves) == ["deepest column", "fractal", "plain"]
    for points in curves.values():
        assert len(points) == 1  # one epoch
        assert math.isfinite(points[0]["train_loss"]) and points[0]["train_loss"] >= 0
        assert _percent(points[0]["test_error"])
    assert (finished / "depth-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_curves_leave_training_as_it_was(tmp_path):
    """The curves' evaluations draw no random numbers and touch no trained state: a run that
    records them trains the same parameters and statistics as one that does not."""
    runner = experiments.Runner(experiments.parser().parse_args(["depth", "--out", str(tmp_path), *TINY]))
    name, build = runner.fractal(2)
    plain_model, _ = runner.train(name, 0, build)
    runner.out = tmp_path / "with-curves"
    curved_model, result = runner.train(name, 0, build, {"fractal": {}, "deepest column": {"column": 2}})
    assert {"fractal", "deepest column"} <= result["history"][0].keys()
    for (key, a), (_, b) in zip(plain_model.state_dict().items(), curved_model.state_dict().items()):
        assert torch.equal(a, b), key


def test_drop_path_numbers(finished):
    result = json.loads((finished / "drop-path.json").read_text())
    assert [r["variant"] for r in result["rows"]] == [label for label, *_ in experiments.DROP_PATH]
    for r in result["rows"]:
        assert math.isfinite(r["train_loss"][0]) and r["train_loss"][0] >= 0
        for errors in (r["error"], r["column_error"]["1"], r["column_error"]["2"]):  # JSON keys
            assert _percent(errors["running"][0]) and _percent(errors["reestimated"][0]), r


def test_anytime_numbers(finished):
    rows = json.loads((finished / "anytime.json").read_text())["rows"]
    assert sorted((r["mode"], r["k"]) for r in rows) == [("column", 1), ("column", 2), ("columns", 1), ("columns", 2)]
    for r in rows:
        assert _percent(r["error"]) and r["ms_per_image"] > 0 and r["depth"] >= 1 and r["conv_units"] >= r["depth"]


def test_deepest_numbers(finished):
    result = json.loads((finished / "deepest.json").read_text())
    rows = result["rows"]
    assert [r["global_columns"] for r in rows] == ["uniform", "by-depth"]
    for r in rows:
        assert 0 <= r["solo_steps"] <= r["steps"] and r["plain_matched_epoch"] == 1  # one epoch
        assert _percent(r["fractal_error"]) and all(_percent(e) for e in r["column_error"].values()), r
        assert len(r["curve"]) == 1 and math.isfinite(r["column_train_loss"])
    # The uniform run is the depth experiment's deepest FractalNet: the same run, the same numbers.
    depth = json.loads((finished / "depth.json").read_text())["rows"][-1]
    assert rows[0]["fractal_error"] == depth["fractal_error"][0]
    assert rows[0]["column_error"]["reestimated"] == depth["deepest_column_error"][0]


@pytest.mark.slow
def test_deepest_reuses_depth_runs_without_curves(tmp_path):
    """The depth experiment records learning curves for its first seed only; deepest then reuses
    the later seeds' runs as they are: their curve-read cells say so, every other number is there."""
    assert experiments.main(["depth", "--seeds", "2", "--out", str(tmp_path), *TINY]) == 0
    assert experiments.main(["deepest", "--seeds", "2", "--out", str(tmp_path), *TINY]) == 0
    rows = json.loads((tmp_path / "deepest.json").read_text())["rows"]
    assert [(r["seed"], r["curve"] is None) for r in rows] == [(0, False), (0, False), (1, True), (1, False)]
    assert rows[2]["plain_matched_error"] is None and _percent(rows[3]["column_error"]["reestimated"])
    for r in rows:
        assert math.isfinite(r["column_train_loss"]) and _percent(r["plain_error"]), r
    assert (tmp_path / "deepest.md").read_text().count("no curve") == 2 * 2  # seed 1: two rows, error and loss


def test_solo_steps_replay_the_runs_structures():
    """solo_steps replays the structures fit draws: the same generator, two draws a step."""
    from fractalnet import FractalNet, training

    model = FractalNet(10, widths=(4,), columns=2, dropout=(0.0,))
    config = training.TrainConfig(dataset="digits", epochs=3, seed=5)
    generator = training.drop_path_generator(config)
    drawn = [model.draw_structure(generator) for _ in range(3 * 7)]
    assert experiments.solo_steps(model, config, 7, 2) == drawn.count(2) > 0


def test_finished_runs_are_not_trained_again(finished):
    runs = sorted(finished.glob("runs/**/result.json"))
    before = {path: path.stat().st_mtime_ns for path in runs}
    # 4 depth runs (fractal and plain, C = 1, 2), the drop-path variants, one of which is the
    # depth experiment's C = 2 FractalNet, and deepest's by-depth FractalNet; anytime trains
    # nothing of its own.
    assert len(runs) == 4 + len(experiments.DROP_PATH) - 1 + 1
    assert experiments.main(["depth", "--out", str(finished), *TINY]) == 0
    assert {path: path.stat().st_mtime_ns for path in runs} == before


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    args = ["depth", *TINY, "--columns", "1", "--epochs", "2"]
    assert experiments.main([*args, "--out", str(tmp_path / "whole")]) == 0
    fit = experiments.fit

    def interrupted(model, dataset, config, device, **kwargs):
        fit(model, dataset, config.replace(stop_after=1), device, **kwargs)
        raise KeyboardInterrupt  # after the first epoch's checkpoint

    monkeypatch.setattr(experiments, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiments.main([*args, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(experiments, "fit", fit)
    (run,) = (tmp_path / "resumed" / "runs").glob("fractal-C1-*/seed0")
    assert not (run / "result.json").exists() and (run / "last.pt").exists()
    assert experiments.main([*args, "--out", str(tmp_path / "resumed")]) == 0

    def history(root):
        (result,) = (json.loads(path.read_text()) for path in root.glob("runs/fractal-C1-*/seed0/result.json"))
        return [{k: v for k, v in h.items() if k not in ("images_per_s", "epoch_seconds")} for h in result["history"]]

    assert len(history(tmp_path / "resumed")) == 2
    assert history(tmp_path / "resumed") == history(tmp_path / "whole")


def test_bad_options_fail_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fractalnet.experiments", "depth", "--out", str(tmp_path),
                          "--dataset", "cifar10", "--data", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=command_env())
    assert run.returncode == 2
    assert "fractalnet experiments: error:" in run.stderr and "Traceback" not in run.stderr


def test_every_long_loop_shows_a_bar_with_the_time_left(tmp_path, monkeypatch):
    """An experiment's bar over its runs, one per run over its epochs, one per epoch over its
    steps: each a tqdm bar (which shows the time left), in a terminal only."""
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append((kwargs.get("desc"), kwargs.get("total"), kwargs.get("disable")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    assert experiments.main(["depth", *TINY, "--columns", "1", "--epochs", "2", "--out", str(tmp_path)]) == 0
    descriptions = [desc for desc, _, _ in bars]
    assert descriptions[0] == "depth"
    run = next((desc, total) for desc, total, _ in bars if desc.endswith("seed 0"))
    assert run[1] == 2  # the run's bar counts its epochs
    assert "epoch 1/2" in descriptions and "epoch 2/2" in descriptions
    assert all(disable is None for desc, _, disable in bars if not desc.startswith("epoch"))
