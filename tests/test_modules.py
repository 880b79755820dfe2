"""The drop-in modules: FusedBatchNormReLU2d against PyTorch's own BatchNorm2d test inputs,
fuse_batchnorm_relu on models written the usual way (and on pytorchcv's FractalNet), MaskedJoin."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, STAT_TOLERANCES, to_layout
from torch import nn

import fractal_kernels as fk

BACKENDS = ["reference", "triton"]

# ----------------------------------------------------------------------------------------------
# FusedBatchNormReLU2d on PyTorch's ModuleInfo inputs for nn.BatchNorm2d
# ----------------------------------------------------------------------------------------------


def module_info():
    common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                         reason="PyTorch's module_db needs expecttest and torch's test utilities")
    return next(m for m in common_modules.module_db if m.module_cls is nn.BatchNorm2d)


def module_inputs(dtype, training):
    info = module_info()
    return list(info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True, training=training))


def module_input_ids():
    try:
        return [m.desc or "default" for m in module_inputs(torch.float32, True)]
    except pytest.skip.Exception:
        return []


def twins(module_input, dtype):
    """nn.Sequential(nn.BatchNorm2d(args), nn.ReLU()) and FusedBatchNormReLU2d(args), same state."""
    ctor = module_input.constructor_input
    torch.manual_seed(0)
    plain = nn.Sequential(nn.BatchNorm2d(*ctor.args, **ctor.kwargs), nn.ReLU()).to(DEVICE, dtype)
    if plain[0].weight is not None:
        nn.init.uniform_(plain[0].weight, 0.5, 1.5)
    if plain[0].bias is not None:
        nn.init.uniform_(plain[0].bias, -0.5, 0.5)
    fused = fk.FusedBatchNormReLU2d(*ctor.args, **ctor.kwargs).to(DEVICE, dtype)
    fused.load_state_dict(plain[0].state_dict())
    return plain, fused


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(module_input_ids())), ids=module_input_ids())
def test_module_db_inputs_match_batchnorm_relu(case, backend, dtype, channels_last):
    """Every ModuleInfo input of nn.BatchNorm2d, three training steps then eval: outputs, input,
    weight and bias gradients, running statistics and num_batches_tracked."""
    module_input = module_inputs(dtype, True)[case]
    plain, fused = twins(module_input, dtype)
    shape = module_input.forward_input.args[0].shape
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    for step in range(4):
        if step == 3:
            plain.eval(), fused.eval()
        x = to_layout(torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(step)) * 2 + step,
                      channels_last).to(DEVICE)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        expected = plain(xs[0])
        with fk.use_backend(backend):
            out = fused(xs[1])
        # Eval normalises with the running statistics, which the kernels update with an fp32 momentum.
        out_tolerance = atol if step < 3 else STAT_TOLERANCES[dtype][0]
        torch.testing.assert_close(out, expected, atol=out_tolerance, rtol=out_tolerance)
        grad = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(10 + step)).to(DEVICE)
        expected.backward(grad)
        out.backward(grad)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=out_tolerance * 10, rtol=out_tolerance * 10)
        for name in ("weight", "bias"):
            ours, theirs = getattr(fused, name), getattr(plain[0], name)
            assert (ours is None) == (theirs is None), name
            if theirs is not None:
                torch.testing.assert_close(ours.grad, theirs.grad, atol=out_tolerance * 10, rtol=out_tolerance * 10)
        stat_atol, stat_rtol = STAT_TOLERANCES[dtype]  # the kernels take the momentum as an fp32 scalar
        for key, value in plain[0].state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], value, atol=stat_atol, rtol=stat_rtol, msg=key)


def error_inputs(training):
    info = module_info()
    return list(info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32, requires_grad=True,
                                              training=training))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_db_error_inputs_raise_what_batchnorm_raises(backend, training):
    cases = error_inputs(training)
    assert cases
    for error_input in cases:
        module_input = error_input.module_error_input
        ctor, forward = module_input.constructor_input, module_input.forward_input
        plain = nn.BatchNorm2d(*ctor.args, **ctor.kwargs).to(DEVICE).train(training)
        fused = fk.FusedBatchNormReLU2d(*ctor.args, **ctor.kwargs).to(DEVICE).train(training)
        try:
            plain(*forward.args, **forward.kwargs)
            expected = None
        except Exception as error:  # torch's own behaviour is the specification
            expected = type(error)
        with fk.use_backend(backend), fk.count_launches() as launches:
            if expected is None:
                fused(*forward.args, **forward.kwargs)
            else:
                with pytest.raises(expected):
                    fused(*forward.args, **forward.kwargs)
        assert expected is None or launches[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["one value per channel", "eps"])
def test_failed_call_counts_no_batch(backend, bad):
    """Where nn.BatchNorm2d has already counted the batch (and moved nothing else) before it
    raises, a failed fused call leaves num_batches_tracked and the running statistics as they
    were: the checks run before any launch."""
    plain = nn.BatchNorm2d(3).to(DEVICE)
    fused = fk.FusedBatchNormReLU2d(3).to(DEVICE)
    x = torch.randn(1, 3, 1, 1, device=DEVICE) if bad == "one value per channel" else torch.randn(4, 3, 2, 2,
                                                                                                  device=DEVICE)
    if bad == "eps":
        plain.eps = fused.eps = -1.0
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(ValueError):
        plain(x)
    assert plain.num_batches_tracked.item() == 1  # torch counted the failed batch
    with fk.use_backend(backend), pytest.raises(ValueError):
        fused(x)
    for key, value in fused.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_module_matches_batchnorm_relu_over_steps():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.BatchNorm2d(6, momentum=None), nn.ReLU()).to(DEVICE)
    nn.init.uniform_(plain[0].weight, 0.5, 1.5)
    nn.init.uniform_(plain[0].bias, -0.5, 0.5)
    fused = fk.FusedBatchNormReLU2d(6, momentum=None).to(DEVICE)
    fused.load_state_dict(plain[0].state_dict())
    with fk.use_backend("triton"):
        for step in range(3):
            x = torch.randn(4, 6, 3, 3, device=DEVICE) + step
            torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
        fused.eval(), plain.eval()
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
    for key, value in plain[0].state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    assert int(fused.num_batches_tracked) == 3


def test_module_state_dict_round_trip_keeps_values():
    torch.manual_seed(0)
    fused = fk.FusedBatchNormReLU2d(5)
    with fk.use_backend("triton"):
        fused(torch.randn(4, 5, 3, 3) * 2 + 1)
    assert isinstance(fused, nn.BatchNorm2d)
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(fused.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    again = fk.FusedBatchNormReLU2d(5)
    again.load_state_dict(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert int(again.num_batches_tracked) == 1 and not torch.equal(again.running_mean, torch.zeros(5))


def test_module_without_tracking_uses_batch_statistics_in_eval():
    fused = fk.FusedBatchNormReLU2d(4, affine=False, track_running_stats=False).eval()
    x = torch.randn(3, 4, 2, 2) * 3 + 1
    with fk.use_backend("triton"):
        torch.testing.assert_close(fused(x), F.relu(F.batch_norm(x, None, None, training=True)), atol=1e-5, rtol=1e-5)


def test_module_reads_a_parametrized_weight():
    """batchnorm_arguments reads parameters from the module's own tables (no nn.Module.__getattr__):
    a parametrized weight, which lives elsewhere, must still be the one used."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    fused, plain = fk.FusedBatchNormReLU2d(4), nn.BatchNorm2d(4)
    for module in (fused, plain):
        parametrize.register_parametrization(module, "weight", Doubled())
    x = torch.randn(3, 4, 2, 2)
    assert fk.batchnorm_arguments(fused)["weight"] is not None
    with fk.use_backend("triton"):
        torch.testing.assert_close(fused(x), F.relu(plain(x)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# fuse_batchnorm_relu
# ----------------------------------------------------------------------------------------------


def test_fuse_without_an_example_swaps_sequential_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
        nn.BatchNorm2d(4),  # not followed by ReLU: kept
    )
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    keys = set(model.state_dict())
    weight = model[1].weight
    report = fk.fuse_batchnorm_relu(model)
    assert report.swapped == ["1", "3.1"]
    assert isinstance(model[1], fk.FusedBatchNormReLU2d) and isinstance(model[2], nn.Identity)
    assert isinstance(model[3][1], fk.FusedBatchNormReLU2d) and type(model[4]) is nn.BatchNorm2d
    assert model[1].weight is weight and set(model.state_dict()) == keys
    with fk.use_backend("triton"):
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class ConvBlock(nn.Module):
    """The usual way: conv, Dropout2d and bn as attributes, ReLU applied in forward."""

    def __init__(self, cin, cout, p, relu):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.dropout = nn.Dropout2d(p)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        return self.relu(self.bn(self.dropout(self.conv(x))))


class PeerFractal(nn.Module):
    """A two-column fractal block written as the public PyTorch ports write it: blocks in a
    ModuleList, joins by torch.stack and a per-sample drop mask from numpy, ReLU as F.relu_,
    torch.relu and a shared nn.ReLU module, and one BatchNorm whose output also feeds a
    residual add (so it must stay)."""

    def __init__(self, join=None):
        super().__init__()
        shared = nn.ReLU(inplace=True)
        self.blocks = nn.ModuleList([ConvBlock(3, 8, 0.1, F.relu_), ConvBlock(8, 8, 0.1, torch.relu),
                                     ConvBlock(3, 8, 0.1, shared), ConvBlock(8, 8, 0.0, shared)])
        self.extra = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        self.join = join

    def forward(self, x):
        deep = self.blocks[1](self.blocks[0](x))
        shallow = self.blocks[2](x)
        outs = torch.stack([deep, shallow])
        if self.training:
            mask = torch.from_numpy((np.random.rand(2, x.shape[0]) > 0.15).astype(np.float32)).to(x.device)
            mask[0, mask.sum(0) == 0] = 1.0
        else:
            mask = torch.ones(2, x.shape[0], device=x.device)
        if self.join is not None:
            joined = self.join(outs, mask)
        else:
            weights = mask[:, :, None, None, None]
            joined = (outs * weights).sum(0) / weights.sum(0).clamp(min=1)
        h = self.blocks[3](joined)
        normalised = self.extra(h)
        h = F.relu(normalised) + normalised  # extra's output feeds the ReLU and the add: kept
        return self.head(h.mean((2, 3)))


def seeded_step(model, x, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_steps_match(model, original, x, backend, seed, modes):
    """The fused ``model`` on ``backend`` and the ``original`` agree in each mode, step after step:
    outputs, parameter gradients and buffers."""
    for mode in modes:
        getattr(model, mode)(), getattr(original, mode)()
        with fk.use_backend(backend):
            out, grads = seeded_step(model, x, seed)
        expected, expected_grads = seeded_step(original, x, seed)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for name, g in expected_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-4, rtol=1e-4, msg=name)
        for (name, a), b in zip(model.named_buffers(), original.buffers()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_finds_pairs_wherever_the_modules_live(backend):
    torch.manual_seed(0)
    model = PeerFractal().to(DEVICE)
    original = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, device=DEVICE)
    weight = model.blocks[0].bn.weight
    report = fk.fuse_batchnorm_relu(model, x)
    assert sorted(report.swapped) == [f"blocks.{i}.bn" for i in range(4)]
    assert report.skipped == [("extra", "its output also feeds add")]
    assert str(report).startswith("swapped 4 of 5 BatchNorm2d -> ReLU pairs")
    assert all(isinstance(b.bn, fk.FusedBatchNormReLU2d) for b in model.blocks) and type(model.extra) is nn.BatchNorm2d
    assert model.blocks[0].bn.weight is weight
    assert isinstance(model.blocks[2].relu, nn.Identity) and model.blocks[2].relu is model.blocks[3].relu  # shared
    assert set(model.state_dict()) == set(original.state_dict())
    assert_steps_match(model, original, x, backend, seed=3, modes=("train", "eval"))


def test_masked_join_module_replaces_a_stacked_join():
    torch.manual_seed(0)
    model = PeerFractal().to(DEVICE)
    joined = PeerFractal(join=fk.MaskedJoin()).to(DEVICE)
    joined.load_state_dict(model.state_dict())
    x = torch.randn(6, 3, 8, 8, device=DEVICE)
    with fk.use_backend("triton"):
        out, grads = seeded_step(joined, x, 4)
    expected, expected_grads = seeded_step(model, x, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_masked_join_module_draws_local_drop_path():
    join = fk.MaskedJoin(local_drop=0.3, generator=torch.Generator().manual_seed(0))
    inputs = [torch.full((4000, 1), float(i)) for i in range(3)]
    mask = join.draw_mask(3, 4000, torch.device("cpu"))
    assert mask.any(0).all()
    assert abs(mask.float().mean().item() - (0.7 + 0.3**3 / 3)) < 0.02
    with fk.use_backend("reference"):
        assert torch.equal(join.eval()(inputs), torch.full((4000, 1), 1.0))
        trained = join.train()(torch.stack(inputs))
    assert trained.shape == (4000, 1) and not torch.equal(trained, torch.full((4000, 1), 1.0))
    with pytest.raises(ValueError, match="local_drop"):
        fk.MaskedJoin(local_drop=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuse_pytorchcv_fractalnet(backend):
    """An independent FractalNet (pytorchcv's CIFAR FractalNet, C = 3 here): every BatchNorm ->
    ReLU pair found and swapped, eval and training steps equal to the original."""
    pytorchcv = pytest.importorskip("pytorchcv.models.fractalnet_cifar", reason="pytorchcv is an optional test package")
    torch.manual_seed(0)
    model = pytorchcv.CIFARFractalNet(channels=[8, 16], num_columns=3, dropout_probs=[0.0, 0.1], loc_drop_prob=0.15,
                                      glob_drop_ratio=0.5, in_size=(8, 8)).to(DEVICE)
    model.output = nn.Linear(16 * 2 * 2, 10).to(DEVICE)
    original = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, device=DEVICE)
    report = fk.fuse_batchnorm_relu(model, x)
    batchnorms = [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(report.swapped) == sorted(batchnorms) and not report.skipped
    assert all(isinstance(m, nn.Identity) for n, m in model.named_modules() if n.endswith(".activ"))
    assert_steps_match(model, original, x, backend, seed=5, modes=("eval", "train"))


class MixedNormalisations(nn.Module):
    """A pair inside an nn.Sequential, a pair through F.relu, and normalisation layers of other kinds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.bn = nn.BatchNorm2d(8)
        self.group = nn.GroupNorm(2, 8)
        self.head = nn.BatchNorm1d(8)
        self.volume = nn.BatchNorm3d(8)

    def forward(self, x):
        return self.head(self.group(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


def test_fusion_report_names_what_it_left_and_why():
    not_fused = [("group", "GroupNorm (only nn.BatchNorm2d is fused)"),
                 ("head", "BatchNorm1d (only nn.BatchNorm2d is fused)"),
                 ("volume", "BatchNorm3d (only nn.BatchNorm2d is fused)")]
    report = fk.fuse_batchnorm_relu(MixedNormalisations())
    assert report.swapped == ["stem.1"] and not report.traced
    assert report.skipped == [("bn", "not followed by an nn.ReLU inside an nn.Sequential")]
    assert report.not_fused == not_fused
    text = str(report)
    assert text.startswith("swapped 1 of 2 BatchNorm2d -> ReLU pairs")
    assert "not fused head: BatchNorm1d" in text and "pass an example input" in text
    traced = fk.fuse_batchnorm_relu(MixedNormalisations(), torch.randn(2, 3, 4, 4))
    assert sorted(traced.swapped) == ["bn", "stem.1"] and not traced.skipped and traced.not_fused == not_fused
    assert "pass an example input" not in str(traced)
    plain = fk.fuse_batchnorm_relu(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert str(plain) == ("swapped 0 of 0 BatchNorm2d -> ReLU pairs\n"
                          "  not fused 1: BatchNorm1d (only nn.BatchNorm2d is fused)")
