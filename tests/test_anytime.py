"""fractalnet.anytime: each sub-network served with its own statistics, the budget's choice, the
cascade, save and load, extraction for deployment, the command line, and bad input refused
before anything changes."""

import contextlib
import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import command_env

import fractalnet
from fractalnet import create_model, data
from fractalnet.anytime import (
    AnytimePredictor, Calibration, SubNetwork, _latency_ms, calibrate, calibration_path, cascade_tradeoff,
    choose_threshold, extract,
)
from fractalnet.anytime_cli import main, serving_splits
from fractalnet.training import TrainConfig, reestimated

#: The reference ops on CPU tensors, no kernel: beside the fake GPU's session, which is the shorter.
pytestmark = pytest.mark.either_session


def synthetic_dataset(seed: int = 0) -> data.Dataset:
    """Three classes of 8x8 one-channel images, each brighter in its own third: small enough to
    calibrate every sub-network in a second."""
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % 3
        images = torch.randint(0, 120, (n, 1, 8, 8), generator=generator)
        for c in range(3):
            images[labels == c, :, :, c * 2:c * 2 + 3] += 120
        return data.Split(images.to(torch.uint8), labels)

    return data.Dataset("synthetic", split(48), split(24), 3, 1, 8, [0.4], [0.3])


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    dataset = synthetic_dataset()
    config = TrainConfig(dataset="synthetic", batch_size=16)
    model = create_model("fractalnet20_cifar", 3, in_channels=1, widths=(4, 8), dropout=(0.0, 0.1), columns=3)
    model.train()
    with torch.no_grad():  # running statistics that no sub-network's own match
        for x, _ in serving_splits(dataset, config, torch.device("cpu"))[0]:
            model(x)
    model.eval()
    splits = serving_splits(dataset, config, torch.device("cpu"))
    calibration = calibrate(model, splits[0], splits[1], batch_size=2, repeats=3)
    return dataset, config, model, splits, calibration


@pytest.fixture(scope="module")
def ordered(setup):
    """The calibration with errors and latencies set by hand (measured ones, of an untrained model
    on a busy CPU, order the sub-networks by chance): the Pareto front column 1, column 2,
    column 3, columns 1-3."""
    *_, calibration = setup
    chosen = {"column 1": (0.5, 1.0), "column 2": (0.4, 2.0), "column 3": (0.3, 3.0), "columns 1-2": (0.35, 4.0),
              "columns 1-3": (0.2, 5.0)}
    return dataclasses.replace(calibration, subnetworks=[
        dataclasses.replace(s, error=chosen[s.name][0], latency_ms=chosen[s.name][1]) for s in calibration.subnetworks])


def hand_calibration(rows, **fields) -> Calibration:
    """A calibration built by hand: rows of (name, error, ms per image)."""
    subnetworks = []
    for name, error, ms in rows:
        mode, k = ("column", int(name.split()[1])) if name.startswith("column ") else ("columns", int(name[-1]))
        subnetworks.append(SubNetwork(mode, k, 2 * k, error, ms, 0.9 * ms, 1.1 * ms))
    values = dict(statistics={name: {} for name, _, _ in rows}, model_digest="x", num_columns=3, device="cpu",
                  hardware="CPU", dtype="float32", batch_size=1, calibration_images=1, validation_images=100)
    return Calibration(subnetworks, **{**values, **fields})


def test_every_subnetwork_is_served_with_the_statistics_training_reestimates(setup):
    dataset, config, model, (_, validation, _), calibration = setup
    assert calibration.names() == ["column 1", "column 2", "column 3", "columns 1-2", "columns 1-3"]
    predictor = AnytimePredictor(model, calibration)
    x, _ = next(iter(validation))
    for subnetwork in calibration.subnetworks:
        expected = reestimated(model, dataset, config, torch.device("cpu"), **subnetwork.forward_arguments)
        with torch.no_grad():
            want = expected(x, **subnetwork.forward_arguments)
            running = model(x, **subnetwork.forward_arguments)
        assert torch.equal(predictor.run(x, subnetwork.name), want), subnetwork.name
        assert not torch.allclose(running, want), "the running statistics would serve as well: a weak test"
    # Served in any order: each run loads its own statistics.
    for subnetwork in reversed(calibration.subnetworks):
        want = predictor.run(x, subnetwork)
        assert torch.equal(AnytimePredictor(model, calibration).run(x, subnetwork), want)


def test_a_subnetwork_keeps_only_the_batchnorms_it_runs(setup):
    *_, calibration = setup
    # Two blocks; column k has 2^(k-1) units in each, a unit's statistics 3 buffers.
    counts = {name: len(values) for name, values in calibration.statistics.items()}
    assert counts == {"column 1": 6, "column 2": 12, "column 3": 24, "columns 1-2": 18, "columns 1-3": 42}
    assert [s.depth for s in calibration.subnetworks] == [2, 4, 8, 4, 8]
    assert calibration.validation_images == 12 and calibration.calibration_images == 48
    assert all(0 < s.latency_low_ms <= s.latency_ms <= s.latency_high_ms for s in calibration.subnetworks)


def test_the_budget_picks_the_most_accurate_subnetwork_that_fits():
    calibration = hand_calibration([("column 1", 0.30, 1.0), ("column 2", 0.20, 2.0), ("column 3", 0.25, 3.0),
                                    ("columns 1-2", 0.20, 2.5), ("columns 1-3", 0.10, 5.0)])
    assert [s.name for s in calibration.pareto()] == ["column 1", "column 2", "columns 1-3"]
    assert calibration.choose(1.0).name == "column 1"
    assert calibration.choose(2.9).name == "column 2"  # columns 1-2 is as accurate, and slower
    assert calibration.choose(4.99).name == "column 2"  # column 3 fits but errs more
    assert calibration.choose(5.0).name == "columns 1-3"
    assert calibration.choose(1e9).name == "columns 1-3"
    with pytest.raises(ValueError, match=r"budget_ms=0.5: no sub-network fits; the fastest, column 1, takes 1 ms"):
        calibration.choose(0.5)


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), True, "1", None])
def test_a_budget_that_is_not_positive_milliseconds_is_refused(budget):
    calibration = hand_calibration([("column 1", 0.3, 1.0)])
    with pytest.raises(ValueError, match="budget_ms must be a positive number of milliseconds per image"):
        calibration.choose(budget)


def test_predict_answers_with_the_chosen_subnetwork(setup, ordered):
    _, _, model, (_, validation, _), _ = setup
    calibration = ordered
    predictor = AnytimePredictor(model, calibration)
    x, _ = next(iter(validation))
    for subnetwork in calibration.pareto():
        answer = predictor.predict(x, budget_ms=subnetwork.latency_ms)
        assert answer.subnetwork == subnetwork
        assert torch.equal(answer.logits, predictor.run(x, subnetwork))


def test_the_cascade_at_threshold_0_is_the_fastest_and_at_1_sends_every_sample_on(setup, ordered):
    _, _, model, (_, validation, _), _ = setup
    calibration = ordered
    predictor = AnytimePredictor(model, calibration)
    fastest, best = calibration.pareto()[0], calibration.pareto()[-1]
    x, _ = next(iter(validation))
    first = predictor.cascade(x, threshold=0)
    assert [s.name for s in first.stages] == ["column 1", "columns 1-3"]  # the fastest, the whole network
    assert torch.equal(first.logits, predictor.run(x, fastest)) and not first.stage.any()
    last = predictor.cascade(x, threshold=1)
    assert torch.equal(last.logits, predictor.run(x, best)) and last.stage.all()
    # In between, each sample is answered by the first stage sure enough of it.
    middle = predictor.cascade(x, threshold=0.4, stages=["column 1", "column 3", "columns 1-3"])
    sure = [torch.softmax(predictor.run(x, name), 1).amax(1) > 0.4 for name in ("column 1", "column 3")]
    want_stage = torch.where(sure[0], 0, torch.where(sure[1], 1, 2))
    assert torch.equal(middle.stage, want_stage)
    for index, name in enumerate(("column 1", "column 3", "columns 1-3")):
        rows = middle.stage == index
        # Rows answered later ran in a smaller batch: equal up to BatchNorm-free rounding.
        torch.testing.assert_close(middle.logits[rows], predictor.run(x, name)[rows])


def test_the_cascade_tradeoff_counts_the_latency_of_the_samples_that_reach_each_stage(setup, ordered):
    _, _, model, (_, validation, _), _ = setup
    calibration = ordered
    predictor = AnytimePredictor(model, calibration)
    fastest, best = calibration.pareto()[0], calibration.pareto()[-1]
    rows = cascade_tradeoff(predictor, validation, [0, 0.5, 1])
    accuracy = {name: sum((predictor.run(x, name).argmax(1) == y).sum().item() for x, y in validation) / 12
                for name in (fastest.name, best.name)}
    assert rows[0]["mean_latency_ms"] == pytest.approx(fastest.latency_ms)
    assert rows[0]["accuracy"] == pytest.approx(accuracy[fastest.name])
    assert rows[-1]["mean_latency_ms"] == pytest.approx(fastest.latency_ms + best.latency_ms)
    assert rows[-1]["accuracy"] == pytest.approx(accuracy[best.name])
    assert fastest.latency_ms <= rows[1]["mean_latency_ms"] <= fastest.latency_ms + best.latency_ms
    assert choose_threshold(rows, fastest.latency_ms)["threshold"] == 0
    with pytest.raises(ValueError, match="no threshold fits"):
        choose_threshold(rows, fastest.latency_ms / 2)


def test_save_and_load_round_trip(setup, tmp_path):
    *_, calibration = setup
    path = calibration_path(tmp_path / "best.pt")
    assert path.name == "best.anytime.pt"
    calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded.subnetworks == calibration.subnetworks and loaded.versions == calibration.versions
    assert loaded.statistics.keys() == calibration.statistics.keys()
    for name, values in calibration.statistics.items():
        assert all(torch.equal(loaded.statistics[name][key], value) for key, value in values.items())
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a fractalnet anytime calibration"):
        Calibration.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="fractalnet anytime --calibrate writes it"):
        Calibration.load(tmp_path / "missing.pt")


def test_a_calibration_of_another_model_or_device_is_refused(setup):
    _, _, model, _, calibration = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = create_model("fractalnet20_cifar", 3, in_channels=1, widths=(4, 8), dropout=(0.0, 0.1), columns=2)
    with pytest.raises(ValueError, match="made for another model"):
        AnytimePredictor(other, calibration)
    retrained = create_model("fractalnet20_cifar", 3, in_channels=1, widths=(4, 8), dropout=(0.0, 0.1), columns=3)
    with pytest.raises(ValueError, match="made for another model"):
        AnytimePredictor(retrained, calibration)
    with pytest.raises(ValueError, match="measured on cuda, the model is on cpu"):
        AnytimePredictor(model, dataclasses.replace(calibration, device="cuda"))
    with pytest.raises(KeyError, match="no sub-network 'column 4'"):
        AnytimePredictor(model, calibration).run(torch.zeros(1, 1, 8, 8), "column 4")
    with pytest.raises(TypeError, match="model must be a FractalNet"):
        AnytimePredictor(torch.nn.Linear(2, 2), calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibrate_refuses_bad_arguments_and_leaves_the_model_as_it_was(setup):
    _, _, model, (calibration_batches, validation, _), _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch_size must be an integer of at least 1, got 0"):
        calibrate(model, calibration_batches, validation, batch_size=0)
    with pytest.raises(ValueError, match="repeats must be an integer of at least 3"):
        calibrate(model, calibration_batches, validation, repeats=1)
    with pytest.raises(TypeError, match="validation must be iterable more than once"):
        calibrate(model, calibration_batches, iter(list(validation)))
    with pytest.raises(TypeError, match="model must be a FractalNet"):
        calibrate(torch.nn.Linear(2, 2), calibration_batches, validation)
    calibrate(model, calibration_batches, validation, repeats=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_the_extracted_subnetwork_folds_in_its_statistics_and_exports(setup):
    _, _, model, (_, validation, _), calibration = setup
    predictor = AnytimePredictor(model, calibration)
    x, _ = next(iter(validation))
    for name in ("column 2", "columns 1-2"):
        plain = extract(model, calibration, name)
        assert isinstance(plain, torch.nn.Sequential) == (name == "column 2") and not plain.training
        with torch.no_grad():
            torch.testing.assert_close(plain(x), predictor.run(x, name))
        exported = torch.export.export(plain, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), predictor.run(x, name))
    assert sum(p.numel() for p in extract(model, calibration, "columns 1-2").parameters()) < sum(
        p.numel() for p in model.parameters())
    # Traced by torch.compile as one graph (the eager backend: the tracing, not Inductor's code).
    traced = torch.compile(extract(model, calibration, "column 1"), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), predictor.run(x, "column 1"))


def test_cuda_timing_reads_cuda_events(monkeypatch):
    """The GPU's branch on a CPU: events whose elapsed times are known."""
    times = iter(range(100))

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = next(times) * 1.5

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    median, low, high = _latency_ms(lambda: calls.append(1), torch.device("cuda"), repeats=5)
    assert len(calls) == 8 and (median, low, high) == (1.5, 1.5, 1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA-event timing of a real launch")
def test_calibration_on_a_gpu_times_with_cuda_events(setup):
    dataset, config, model, _, _ = setup
    device = torch.device("cuda")
    splits = serving_splits(dataset, config, device)
    calibration = calibrate(copy.deepcopy(model).to(device), splits[0], splits[1], repeats=3)
    assert calibration.device == "cuda" and calibration.hardware == torch.cuda.get_device_name(device)


# ----------------------------------------------------------------------------------------------
# The command line, on a checkpoint of a short digits run
# ----------------------------------------------------------------------------------------------


def command(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fractalnet", *argv], capture_output=True, text=True,
                          env=command_env(), timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("anytime") / "run"
    result = command("train", "--dataset", "digits", "--widths", "4,8", "--dropout", "0,0", "--image-size", "8",
                     "--epochs", "1", "--batch-size", "100", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "last.pt"


@pytest.mark.slow
def test_the_command_calibrates_then_serves_budgets(checkpoint):
    result = command("anytime", "--checkpoint", str(checkpoint), "--calibrate", "--repeats", "3", "--device", "cpu",
                     "--threads", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = checkpoint.parent
    assert (out / "last.anytime.pt").is_file() and (out / "anytime-pareto.png").stat().st_size > 10_000
    report = json.loads((out / "anytime-serving.json").read_text())
    assert [s["mode"] for s in report["subnetworks"]] == ["column"] * 3 + ["columns"] * 2
    assert "| sub-network | depth | error (%) |" in result.stdout and "cascade mean ms" in result.stdout
    assert [row["single"] for row in report["cascade_against_single"]] == [
        s["name"] for s in sorted(report["subnetworks"], key=lambda s: s["latency_ms"])][1:]
    assert report["test_images"] == 360 - 180

    calibration = Calibration.load(out / "last.anytime.pt")
    fastest, best = calibration.pareto()[0], calibration.pareto()[-1]
    served = command("anytime", "--checkpoint", str(checkpoint), "--budget-ms",
                     f"{fastest.latency_ms / 2},{fastest.latency_ms},{2 * best.latency_ms}", "--device", "cpu")
    assert served.returncode == 0, served.stderr[-2000:]
    lines = [line for line in served.stdout.splitlines() if line.startswith("| ") and "budget" not in line]
    assert "none fits (the fastest, " in lines[0]
    assert lines[1].split(" | ")[1] == fastest.name and lines[2].split(" | ")[1] == best.name

    too_small = command("anytime", "--checkpoint", str(checkpoint), "--budget-ms", f"{fastest.latency_ms / 2}")
    assert too_small.returncode == 2
    assert too_small.stderr.startswith("fractalnet anytime: error: --budget-ms: no budget fits; the fastest")


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "missing.pt", "--calibrate"], "--checkpoint: no checkpoint at missing.pt"),
    (["--checkpoint", "x.pt", "--budget-ms", "0"], "budgets must be positive milliseconds"),
    (["--checkpoint", "x.pt", "--budget-ms", "fast"], "expected milliseconds such as 0.5"),
    (["--checkpoint", "x.pt"], "one of the arguments --calibrate --budget-ms is required"),
    (["--checkpoint", "x.pt", "--calibrate", "--repeats", "1"], "--repeats must be at least 3, got 1"),
])
def test_the_command_refuses_bad_arguments_in_one_line(argv, message, capsys):
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    stderr = capsys.readouterr().err
    # One line of error (argparse's own come after its usage).
    assert status == 2 and message in stderr.strip().splitlines()[-1] and "Traceback" not in stderr


@pytest.mark.slow
def test_load_rebuilds_the_model_a_checkpoint_holds(checkpoint, tmp_path):
    model = fractalnet.load(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["model"]
    assert isinstance(model, fractalnet.FractalNet) and not model.training
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    (tmp_path / "not.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="path: cannot read .*not.pt: truncated or not a checkpoint"):
        fractalnet.load(tmp_path / "not.pt")
