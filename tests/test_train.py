"""The training CLI: a short digits run, exact resume, a two-process gloo run, and the errors."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from fractalnet import train, training
from helpers import gpu_path_env


TINY = ["--dataset", "digits", "--widths", "8,16", "--dropout", "0,0.1", "--columns", "2", "--image-size", "8",
        "--batch-size", "100", "--lr", "0.05", "--device", "cpu"]


def epoch_setup(*options: str, lr: float = 0.05):
    """What train_epoch takes for a one-epoch TINY run with ``options``: (config, dataset,
    device, model, optimizer, generators), on the CPU."""
    config, _ = train.resolve(TINY + ["--epochs", "1", *options])
    dataset, config = training.load_dataset(config)
    device = torch.device("cpu")
    model = training.build_model(config, dataset, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generators = {"data": torch.Generator().manual_seed(0), "augment": torch.Generator().manual_seed(1),
                  "drop_path": torch.Generator().manual_seed(2)}
    return config, dataset, device, model, optimizer, generators


@pytest.mark.slow
def test_short_run_writes_checkpoints_metrics_and_plots(tmp_path, capsys):
    assert train.main(TINY + ["--epochs", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "anytime prediction" in printed
    for name in ("last.pt", "best.pt", "metrics.json", "curves.png", "anytime.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert {(r["mode"], r["k"]) for r in metrics["anytime"]} == {("column", 1), ("column", 2), ("columns", 1),
                                                                 ("columns", 2)}
    assert 0 <= metrics["final_accuracy"] <= 1 and metrics["images_per_s"] > 0 and metrics["peak_memory_bytes"] > 0
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and {"torch", "data", "augment"} <= set(checkpoint["rng"])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = TINY + ["--epochs", "2", "--augment", "plus"]
    assert train.main(common + ["--out", str(straight)]) == 0
    assert train.main(common + ["--out", str(resumed), "--stop-after", "1"]) == 0
    assert torch.load(resumed / "last.pt", weights_only=False)["epoch"] == 1
    assert train.main(["--resume", str(resumed / "last.pt"), "--out", str(resumed)]) == 0
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


@pytest.mark.parametrize("sync_bn, per", [(False, "sample"), (False, "batch"), (True, "batch")],
                         ids=["ddp-per-sample", "ddp-per-batch", "ddp-sync-bn-per-batch"])
@pytest.mark.slow
@pytest.mark.either_session  # subprocesses with an environment of their own
def test_two_processes_on_gloo_end_with_identical_weights(tmp_path, sync_bn, per):
    """Drawn per batch, both ranks draw the same (a global batch runs the same column on each,
    so DDP and synchronised BatchNorm see the same parameters and collectives). The running
    statistics are training's own (no re-estimation, which would give every rank the same)."""
    env = gpu_path_env()
    options = ["--drop-path-per", per, "--no-reestimate-bn"]
    if sync_bn:  # synchronised statistics run on the Triton kernels: interpreted on CPU
        env.update(TRITON_INTERPRET="1", FRACTAL_KERNELS_BACKEND="triton")
        options.append("--sync-bn")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29700 + os.getpid() % 200 * 3 + 2 * sync_bn + (per == "batch")), "-m", "fractalnet.train", *TINY,
               "--epochs", "1", "--out", str(tmp_path), *options]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {rank: (weights, buffers) for rank, weights, buffers
               in re.findall(r"rank (\d): weights sha256 ([0-9a-f]{16}) buffers sha256 ([0-9a-f]{16})", result.stdout)}
    assert set(digests) == {"0", "1"} and digests["0"][0] == digests["1"][0]
    # Running statistics agree only when the ranks normalise with global batch statistics. (DDP
    # broadcasts rank 0's buffers at every forward: without --sync-bn they part only in the last
    # step, which drawn per batch may be a global batch that updates none.)
    if sync_bn or per == "sample":
        assert (digests["0"][1] == digests["1"][1]) == sync_bn
    assert (tmp_path / "last.pt").exists()


def run_failing(argv, capsys):
    try:
        code = train.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_unknown_model_and_dataset_list_the_valid_ones(capsys):
    assert "fractalnet20_cifar" in run_failing(["--model", "resnet50"], capsys)
    assert "cifar10" in run_failing(["--dataset", "mnist"], capsys)


def test_missing_or_malformed_data_folder_shows_the_layout(tmp_path, capsys):
    err = run_failing(["--dataset", "cifar10", "--data", str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in err and "cifar-10-batches-py" in err
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    err = run_failing(["--dataset", "cifar10", "--data", str(tmp_path)], capsys)
    assert "cannot read" in err and "data_batch_1" in err
    err = run_failing(["--dataset", "imagefolder", "--data", str(tmp_path)], capsys)
    assert "train" in err and "<class>" in err


@pytest.mark.slow
def test_cifar_pickles_are_read(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": torch.randint(0, 256, (20, 3072), generator=gen, dtype=torch.uint8).numpy(),
                 b"labels": torch.randint(0, 10, (20,), generator=gen).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    argv = ["--dataset", "cifar10", "--data", str(tmp_path), "--widths", "4,8", "--dropout", "0,0", "--columns", "2",
            "--batch-size", "25", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert "test acc" in capsys.readouterr().out


def test_truncated_and_foreign_checkpoints(tmp_path, capsys):
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in run_failing(["--resume", str(tmp_path / "truncated.pt")], capsys)
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "not a fractalnet train checkpoint" in run_failing(["--resume", str(tmp_path / "foreign.pt")], capsys)
    assert "no checkpoint" in run_failing(["--resume", str(tmp_path / "missing.pt")], capsys)
    assert "other model" in run_failing(["--resume", str(tmp_path / "last.pt"), "--model", "fractalnet40_cifar"],
                                        capsys)


def test_batch_size_the_data_cannot_fill(capsys):
    assert "cannot be filled" in run_failing(TINY + ["--batch-size", "5000"], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("per", ["sample", "batch"])
def test_an_epoch_reads_its_loss_and_accuracy_once(per, monkeypatch):
    """Loss and accuracy stay on the device during an epoch: the host reads them once, at its end,
    whatever its number of steps (on a GPU each read would make the host wait for the step)."""
    reads = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, original=original, method=method: reads.append(method) or original(self))
    counts = {}
    for batch_size in (100, 25):
        config, dataset, device, model, optimizer, generators = epoch_setup(
            "--batch-size", str(batch_size), "--drop-path-per", per, lr=0.01)
        reads.clear()
        stats = training.train_epoch(0, model, optimizer, None, dataset, config, device, generators, 0, 1,
                                     verbose=False)
        counts[batch_size] = list(reads)
        assert 0 < stats["train_accuracy"] <= 1 and stats["train_loss"] > 0
    assert counts[100] == counts[25] == ["tolist"]


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True])
def test_batches_reach_the_device_through_pinned_copies(graphs, monkeypatch):
    """Every batch the training and test loops send to the device goes through copy_to_device,
    which a GPU run turns into a pinned, asynchronous copy: each is a real host tensor, for which
    its pinning decision (the branch a CPU run cannot take) says pin when bound for a GPU."""
    from fractalnet.drop_path import copy_to_device, pinned_copy

    copied = []
    monkeypatch.setattr(training, "copy_to_device", lambda t, device: copied.append(t) or copy_to_device(t, device))
    config, dataset, device, model, optimizer, generators = epoch_setup("--batch-size", "50")
    graphed = (training.graphed_step(model, optimizer, dataset, config, device, generators, capture=lambda step: step)
               if graphs else None)
    copied.clear()
    training.train_epoch(0, model, optimizer, None, dataset, config, device, generators, 0, 1, verbose=False,
                      graphed=graphed)
    steps = len(dataset.train) // 50
    assert len(copied) == 2 * steps  # images and labels of every step
    training.evaluate(model, dataset, config, device)
    assert len(copied) == 2 * steps + 2 * -(-len(dataset.test) // 500)
    assert all(pinned_copy(t, torch.device("cuda")) for t in copied)


@pytest.mark.parametrize("given, mode", [([], None), (["--compile"], None), (["--compile", "reduce-overhead"],
                                                                             "reduce-overhead")])
@pytest.mark.slow
def test_compile_takes_torch_compiles_modes(given, mode, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path), *given]) == 0
    assert calls == ([dict(mode=mode)] if given else [])


def test_cuda_graphs_needs_a_gpu_and_refuses_what_it_cannot_capture(capsys):
    assert "--cuda-graphs needs a CUDA device" in run_failing(TINY + ["--epochs", "1", "--cuda-graphs"], capsys)
    cuda = torch.device("cuda")  # only its type is read
    for extra, option in ((["--skip-dropped"], "--skip-dropped"), (["--compile"], "--compile"),
                          (["--amp", "bf16"], "--amp"), (["--sync-bn"], "--sync-bn"), (["--no-fused"], "--no-fused")):
        config, _ = train.resolve(TINY + ["--epochs", "1", "--cuda-graphs", *extra])
        with pytest.raises(training.ConfigError, match=f"does not combine with {option}"):
            train.check_cuda_graphs(config, cuda, 1)
    config, _ = train.resolve(TINY + ["--epochs", "1", "--cuda-graphs"])
    with pytest.raises(training.ConfigError, match="several processes"):
        train.check_cuda_graphs(config, cuda, 2)
    train.check_cuda_graphs(config, cuda, 1)


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_a_graphed_epoch_runs_the_graphed_step(per, monkeypatch):
    """The --cuda-graphs epoch loop, its capture replaced by a plain call (no GPU here): every
    step goes through the graphed step, and the epoch's totals are its device sums."""
    config, dataset, device, model, optimizer, generators = epoch_setup("--batch-size", "50", "--drop-path-per", per)
    graphed = training.graphed_step(model, optimizer, dataset, config, device, generators, capture=lambda step: step)
    calls = []
    original = type(graphed).__call__
    monkeypatch.setattr(type(graphed), "__call__", lambda self, x, y: calls.append(x.shape[0]) or original(self, x, y))
    stats = training.train_epoch(0, model, optimizer, None, dataset, config, device, generators, 0, 1, verbose=False,
                              graphed=graphed)
    steps = len(dataset.train) // 50
    assert calls == [50] * steps
    assert stats["train_loss"] > 0 and 0 < stats["train_accuracy"] <= 1


@pytest.mark.slow
def test_a_run_without_out_says_what_it_runs_and_writes_under_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(TINY + ["--epochs", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[:4]
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"fractalnet20_cifar-\d{8}-\d{6}", folders[0].name)
    assert (folders[0] / "metrics.json").exists() and (folders[0] / "last.pt").exists()
    assert re.match(r"fractalnet train: fractalnet20_cifar, [\d,]+ parameters, on cpu$", header[0])
    assert header[1].strip().startswith("data    digits: 1,437 training and 360 test images, 8x8, 10 classes")
    assert header[2].strip().startswith("recipe  1 epochs, batch 100, lr 0.05")
    assert header[3].strip().startswith(f"output  {os.path.join('runs', folders[0].name)}/")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (["--widths", "4,4,4,4,4", "--dropout", "0,0,0,0,0"],
     "5 blocks need images of at least 32x32 (each block pools by 2), got 8x8"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    (["--device", "cuda:0"], "--device cuda:0: this machine has no CUDA GPU"),
    (["--device", "gpu"], "--device: 'gpu' is not a device"),
    (["--device", "meta"], "only cpu and cuda devices are supported"),
])
def test_options_the_run_cannot_take_are_one_line_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = run_failing(TINY + argv, capsys)
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_device_cuda_takes_this_process_gpu(monkeypatch):
    """--device cuda on a GPU machine (the CUDA branch, on a CPU): the device gets this process's
    index before torch.cuda.set_device sees it (a bare "cuda" has none and set_device refuses it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for name, index in (("cuda", 1), ("cuda:0", 0), (None, 1)):
        config, _ = train.resolve(TINY[:-2] + ([] if name is None else ["--device", name]))
        assert train.distributed_setup(config)[2] == torch.device("cuda", index)
        assert selected.pop() == torch.device("cuda", index)
    config, _ = train.resolve(TINY[:-2] + ["--device", "cuda:2"])
    with pytest.raises(training.ConfigError, match="there is no GPU 2 \\(this machine has 2\\)"):
        train.distributed_setup(config)


@pytest.mark.parametrize("argv, device, warning", [
    (["--sync-bn"], "cpu", "--sync-bn in a single process changes nothing: run under torchrun"),
    (["--amp", "fp16"], "cpu", "--amp fp16 on a CPU"),
])
def test_options_that_would_do_nothing_warn(argv, device, warning):
    config, _ = train.resolve(TINY + argv)
    with pytest.warns(UserWarning, match=re.escape(warning)):
        train.warn_of_no_effect(config, torch.device(device), world=1)


def test_options_that_do_something_do_not_warn(recwarn):
    config, _ = train.resolve(TINY + ["--sync-bn", "--amp", "fp16"])
    train.warn_of_no_effect(config, torch.device("cuda", 0), world=2)
    assert not recwarn.list
