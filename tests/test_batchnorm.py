"""bn_relu: the Triton kernels (interpreted on CPU) against fp64 torch BatchNorm + ReLU."""

import contextlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, DTYPES, STAT_TOLERANCES, assert_close, gradcheck, to_layout
from torch import nn

import fractal_kernels as fk
from fractal_kernels import batchnorm, reference
from fractal_kernels.channel_tiling import channel_tiling, tile_for_gpu
from fractal_kernels.testing import saved_bytes

SHAPES = [(4, 3, 5, 6), (3, 7, 5, 9), (6, 16, 2, 2), (5, 24, 1, 1), (6, 5), (2, 4, 3), (2, 3, 2, 3, 2)]
#: (shape, channels_last): channels-last is a 4-D layout.
LAYOUTS = [(shape, cl) for shape in SHAPES for cl in (False, True) if not cl or len(shape) == 4]


def make_case(shape, dtype, channels_last=False, affine=True, running=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    x = to_layout(x.to(dtype), channels_last).to(DEVICE).requires_grad_()
    # Parameters and statistics stay fp32 for low-precision activations, as under autocast.
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = {}
    if affine:
        params["weight"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE,
                                                                                        param_dtype).requires_grad_()
        params["bias"] = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.5).to(DEVICE,
                                                                                       param_dtype).requires_grad_()
    else:
        params["weight"] = params["bias"] = None
    if running:
        params["running_mean"] = torch.randn(C, generator=gen, dtype=torch.float64).to(DEVICE, param_dtype)
        params["running_var"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE, param_dtype)
    else:
        params["running_mean"] = params["running_var"] = None
    return x, params


def fp64_copy(params):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k,
            v in params.items()}


def run_both(x, params, training, relu=True, momentum=0.1):
    """The Triton op and the fp64 torch composition on the same data: outputs and gradients."""
    ref_params = fp64_copy(params)
    x64 = x.detach().double().requires_grad_()
    with fk.use_backend("triton"):
        out = fk.bn_relu(x, **params, training=training, momentum=momentum, relu=relu)
    expected = F.batch_norm(x64, ref_params["running_mean"], ref_params["running_var"], ref_params["weight"],
                            ref_params["bias"], training, momentum, 1e-5)
    expected = F.relu(expected) if relu else expected
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x] + [params[k] for k in ("weight", "bias") if params[k] is not None]
    ref_leaves = [x64] + [ref_params[k] for k in ("weight", "bias") if ref_params[k] is not None]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype).to(DEVICE))
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad)
    return out, expected, grads, expected_grads, ref_params


def check_running(params, ref_params, dtype):
    for name in ("running_mean", "running_var"):
        if params[name] is not None:
            # Statistics are fp32 for every storage dtype but fp64; the momentum is an fp32 scalar.
            atol, rtol = STAT_TOLERANCES[dtype]
            torch.testing.assert_close(params[name].double(), ref_params[name], atol=atol, rtol=rtol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,channels_last", LAYOUTS, ids=["x".join(map(str, s)) + ("-nhwc" if cl else "") for s, cl in LAYOUTS]
)
def test_matches_torch(shape, channels_last, dtype, training):
    x, params = make_case(shape, dtype, channels_last)
    out, expected, grads, expected_grads, ref_params = run_both(x, params, training)
    assert out.dtype == dtype and out.stride() == x.stride()
    scale = 4.0 if dtype in (torch.float16, torch.bfloat16) else 10.0
    assert_close(out, expected, dtype, scale)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype, scale * max(1.0, e.abs().max().item()))
    check_running(params, ref_params, dtype)


@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
def test_without_affine_or_running_stats(affine, running):
    x, params = make_case((4, 6, 3, 3), torch.float64, affine=affine, running=running)
    out, expected, grads, expected_grads, _ = run_both(x, params, training=True)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bare_batch_norm(training):
    x, params = make_case((4, 6, 3, 3), torch.float64)
    out, expected, grads, expected_grads, _ = run_both(x, params, training, relu=False)
    assert (out < 0).any()
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_running_stats_over_several_steps():
    x, params = make_case((6, 4, 3, 3), torch.float32)
    ref = fp64_copy(params)
    for step in range(4):
        batch = torch.randn(x.shape, generator=torch.Generator().manual_seed(step)) * (step + 1) + step
        with fk.use_backend("triton"):
            fk.bn_relu(batch.to(DEVICE), **params, training=True, momentum=0.3)
        F.batch_norm(batch.double(), ref["running_mean"], ref["running_var"], None, None, True, 0.3, 1e-5)
    check_running(params, ref, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(training):
    x, params = make_case((3, 2, 2, 3), torch.float64)

    def fn(x, w, b):
        rm, rv = params["running_mean"].clone(), params["running_var"].clone()
        with fk.use_backend("triton"):
            return fk.bn_relu(x, w, b, rm, rv, training)

    assert gradcheck(fn, (x, params["weight"].double(), params["bias"].double()))


def test_bitwise_deterministic():
    x, params = make_case((8, 5, 6, 7), torch.float32)
    results = []
    for _ in range(2):
        p = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
        with fk.use_backend("triton"):
            out = fk.bn_relu(x, **p, training=True)
        grads = torch.autograd.grad(out.square().sum(), [x, p["weight"], p["bias"]])
        results.append([out, *grads, p["running_mean"], p["running_var"]])
    for a, b in zip(*results):
        assert torch.equal(a, b)


#: Shapes with more than SINGLE_PASS_TILES tiles per channel block when tiled for a GPU
#: (tile_for_gpu): the split kernels, over several chunks. (channels_last, shape)
SPLIT_CASES = [(False, (72, 2, 16, 16)), (True, (36, 2, 16, 16))]


@pytest.mark.parametrize("channels_last,shape", SPLIT_CASES, ids=["nchw", "nhwc"])
def test_split_kernels_over_chunks_match_torch(channels_last, shape):
    x, params = make_case(shape, torch.float32, channels_last)
    with tile_for_gpu(1):
        assert channel_tiling(x).num_chunks > 1
        with fk.count_launches() as launches:
            out, expected, grads, expected_grads, ref_params = run_both(x, params, True)
    assert launches[0] == 5  # statistics, combine, apply; gradient sums, input gradients
    assert_close(out, expected, torch.float32, 10.0)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, torch.float32, 10.0 * max(1.0, e.abs().max().item()))
    check_running(params, ref_params, torch.float32)


def test_launch_counts():
    """One chunk per channel block (small problems): one launch a pass; several: five a step."""
    small, params = make_case((4, 6, 3, 3), torch.float32)
    large, large_params = make_case(SPLIT_CASES[0][1], torch.float32)
    counts = []
    for x, p, tiling in ((small, params, contextlib.nullcontext()), (large, large_params, tile_for_gpu(1))):
        with fk.use_backend("triton"), tiling:
            with fk.count_launches() as train_forward:
                out = fk.bn_relu(x, **p, training=True)
            with fk.count_launches() as train_backward:
                out.sum().backward()
            with fk.count_launches() as eval_forward:
                fk.bn_relu(x, **p, training=False)
        counts.append((train_forward[0], train_backward[0], eval_forward[0]))
    assert counts == [(1, 1, 1), (3, 2, 1)]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["plain", "dropout"])
@pytest.mark.parametrize("k", [1, 3])
def test_single_pass_kernels_equal_the_split_kernels(monkeypatch, k, dropout, momentum):
    """On one tiling the single-pass kernels give the split kernels' results bit for bit: the
    outputs, the gradients, the running statistics and the counters."""
    results = []
    for split in (False, True):
        if split:
            monkeypatch.setattr(batchnorm, "single_pass", lambda *args, **kwargs: False)
        torch.manual_seed(0)
        xs = [make_case((5, 6, 3, 3), torch.float32, seed=i)[0] for i in range(k)]
        bns = [nn.BatchNorm2d(6, momentum=momentum).to(DEVICE) for _ in range(k)]
        for p in (p for bn in bns for p in bn.parameters()):
            nn.init.uniform_(p, 0.5, 1.5)
        mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)[:k].to(DEVICE)
        seeds = torch.arange(7, 7 + k, device=DEVICE)
        lists = {name: [getattr(bn, name) for bn in bns]
                 for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
        with fk.use_backend("triton"), fk.count_launches() as launches:
            out = fk.join_bn_relu(xs, mask, lists["weight"], lists["bias"], lists["running_mean"],
                                  lists["running_var"], True, momentum,
                                  num_batches_tracked=lists["num_batches_tracked"], dropout=dropout, seeds=seeds)
            grads = torch.autograd.grad(out.square().sum(), [*xs, *lists["weight"], *lists["bias"]])
        results.append((launches[0], [out, *grads, *(b for bn in bns for b in bn.buffers())]))
    (single_launches, single), (split_launches, split) = results
    assert (single_launches, split_launches) == ((4 if momentum is None else 2), 5)
    for a, b in zip(single, split):
        assert torch.equal(a, b)


def test_saves_only_the_input_and_per_channel_statistics():
    x = torch.randn(8, 16, 8, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    b = torch.zeros(16, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    with fk.use_backend("triton"):
        fused = saved_bytes(lambda: fk.bn_relu(x, w, b, rm, rv, True))
    unfused = saved_bytes(lambda: F.relu(F.batch_norm(x, rm, rv, w, b, True)))
    per_channel = 16 * 4 * 4  # weight, bias, mean, variance
    assert fused == x.numel() * 4 + per_channel
    assert unfused >= 2 * x.numel() * 4  # the input and the ReLU output at least


# ----------------------------------------------------------------------------------------------
# Dropout inside the kernels, and the batch counter
# ----------------------------------------------------------------------------------------------


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_dropout_mask_statistics_and_layouts(p):
    x = torch.randn(16, 8, 16, 16, device=DEVICE)
    with fk.use_backend("triton"):
        mask = fk.dropout_mask(x, seed_tensor(7), p)
        again = fk.dropout_mask(x, seed_tensor(7), p)
        other = fk.dropout_mask(x, seed_tensor(8), p)
        nhwc = fk.dropout_mask(x.to(memory_format=torch.channels_last), seed_tensor(7), p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01  # 32768 elements
    assert torch.equal(mask, again) and torch.equal(mask, nhwc)  # a seed's mask, in either layout
    assert (mask != other).float().mean() > 0.1
    # Independent across channels and samples (256 elements a plane: |r| ~ 0.05 by chance).
    flat = mask.float().reshape(16 * 8, -1)
    assert torch.corrcoef(flat).fill_diagonal_(0).abs().mean() < 0.08


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dropout_equals_the_composition_with_the_same_mask(channels_last, dtype, training):
    """bn_relu(x, dropout=p, seed=s) is F.relu(F.batch_norm(x * mask / (1 - p))) with the mask s
    gives, forward, backward and running statistics (statistics of the dropped tensor)."""
    p = 0.3
    x, params = make_case((6, 5, 4, 3), dtype, channels_last)
    ref_params = fp64_copy(params)
    with fk.use_backend("triton"):
        mask = fk.dropout_mask(x, seed_tensor(11), p)
        out = fk.bn_relu(x, **params, training=training, dropout=p, seed=seed_tensor(11))
    x64 = x.detach().double().requires_grad_()
    expected = F.relu(F.batch_norm(x64 * mask / (1 - p), ref_params["running_mean"], ref_params["running_var"],
                                   ref_params["weight"], ref_params["bias"], training, 0.1, 1e-5))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [x, params["weight"], params["bias"]], grad.to(out.dtype).to(DEVICE))
    expected_grads = torch.autograd.grad(expected, [x64, ref_params["weight"], ref_params["bias"]], grad)
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    assert_close(out, expected, dtype, scale)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype, scale * max(1.0, e.abs().max().item()))
    assert torch.all(grads[0][~mask] == 0)  # nothing flows back to a dropped element
    check_running(params, ref_params, dtype)


@pytest.mark.slow
def test_dropout_gradcheck_and_determinism():
    x, params = make_case((4, 2, 2, 2), torch.float64)
    params["running_mean"] = params["running_var"] = None
    w, b = params["weight"], params["bias"]

    def fn(x, w, b):
        with fk.use_backend("triton"):
            return fk.bn_relu(x, w, b, None, None, True, dropout=0.25, seed=seed_tensor(3))

    with fk.use_backend("triton"):
        assert not fk.dropout_mask(x, seed_tensor(3), 0.25).all()  # some elements dropped
    assert gradcheck(fn, (x, w, b))
    with fk.use_backend("triton"):
        assert torch.equal(fn(x, w, b), fn(x, w, b))
        torch.manual_seed(0)
        first = fk.bn_relu(x, w, b, None, None, True, dropout=0.25)  # a seed drawn from torch's generator
        torch.manual_seed(0)
        assert torch.equal(fk.bn_relu(x, w, b, None, None, True, dropout=0.25), first)
        assert not torch.equal(fk.bn_relu(x, w, b, None, None, True, dropout=0.25), first)


def test_dropout_saves_no_mask_and_adds_no_launch():
    x, params = make_case((8, 6, 4, 4), torch.float32)
    with fk.use_backend("triton"):
        plain = saved_bytes(lambda: fk.bn_relu(x, **params, training=True))
        dropped = saved_bytes(lambda: fk.bn_relu(x, **params, training=True, dropout=0.2, seed=seed_tensor(1)))
        with fk.count_launches() as plain_launches:
            fk.bn_relu(x, **params, training=True).sum().backward()
        with fk.count_launches() as launches:
            fk.bn_relu(x, **params, training=True, dropout=0.2, seed=seed_tensor(1)).sum().backward()
    assert dropped == plain + 8  # the seed
    assert launches[0] == plain_launches[0] == 2


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batch_counter_and_cumulative_average(backend, momentum):
    """num_batches_tracked counts in the statistics kernel; momentum=None is the cumulative average."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, momentum=momentum).to(DEVICE)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    xs = [torch.randn(4, 3, 2, 2, device=DEVICE) * (i + 1) + i for i in range(3)]
    for x in xs:
        plain(x)
    with fk.use_backend(backend), fk.count_launches() as launches:
        for x in xs:
            fk.bn_relu(x, None, None, state["running_mean"], state["running_var"], True, momentum,
                       num_batches_tracked=state["num_batches_tracked"])
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # The counter takes no launch of its own: one per forward, or three for the cumulative
    # average (statistics, combine, apply: the one-program combine reads the counter).
    assert launches[0] == ((3 if momentum is not None else 9) if backend == "triton" else 0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_fp64_running_statistics_match_torch_to_fp64_precision(momentum):
    """fp64 statistics move by an fp64 momentum (or 1 / num_batches_tracked): a Python float
    reaching a kernel as fp32 would leave 0.20000000298 where torch has 0.2."""
    x = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64, device=DEVICE)
    mine, plain = ({"running_mean": torch.zeros(1, dtype=torch.float64, device=DEVICE),
                    "running_var": torch.ones(1, dtype=torch.float64, device=DEVICE),
                    "num_batches_tracked": torch.tensor(2, device=DEVICE)} for _ in range(2))
    with fk.use_backend("triton"):
        fk.bn_relu(x, None, None, training=True, momentum=momentum, **mine)
    F.batch_norm(x, plain["running_mean"], plain["running_var"], None, None, True,
                 1 / 3 if momentum is None else momentum)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(mine[name], plain[name], atol=0, rtol=4e-16, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp64_eps_and_dropout_scale_are_exact(training):
    """fp64 outputs and gradients see eps and the dropout scale 1 / (1 - p) in fp64 (in fp32 they
    are off by ~1e-8 relative): a large eps on a small variance shows it."""
    x, params = make_case((6, 5, 4, 3), torch.float64)
    params["running_var"] = params["running_var"].detach() * 0.01
    with torch.no_grad():
        x.mul_(0.1)
    ref_params = fp64_copy(params)
    p, eps = 0.3, 0.1
    with fk.use_backend("triton"):
        mask = fk.dropout_mask(x, seed_tensor(5), p)
        out = fk.bn_relu(x, **params, training=training, eps=eps, dropout=p, seed=seed_tensor(5))
    x64 = x.detach().clone().requires_grad_()
    expected = F.relu(F.batch_norm(x64 * mask / (1 - p), ref_params["running_mean"], ref_params["running_var"],
                                   ref_params["weight"], ref_params["bias"], training, 0.1, eps))
    grads = torch.autograd.grad(out.sum(), [x, params["weight"], params["bias"]])
    expected_grads = torch.autograd.grad(expected.sum(), [x64, ref_params["weight"], ref_params["bias"]])
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=1e-13)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-13, rtol=1e-12)


BAD_ARGS = [
    ("rank", lambda x, p: (x[0, 0, 0], p), ValueError, "2 to 5 dimensions"),
    ("one value per channel", lambda x, p: (x[:1, :, :1, :1], p), ValueError, "more than 1 value per channel"),
    ("weight shape", lambda x, p: (x, {**p, "weight": torch.ones(5)}), ValueError, r"weight must have shape \[3\]"),
    ("bias dtype", lambda x, p: (x, {**p, "bias": torch.ones(3, dtype=torch.int32)}), TypeError,
     "bias must be a floating"),
    ("weight device", lambda x, p: (x, {**p, "weight": torch.ones(3, device="meta")}), ValueError, "weight is on"),
    ("weight type", lambda x, p: (x, {**p, "weight": [1.0, 1.0, 1.0]}), TypeError, "weight must be a tensor"),
    ("running pair", lambda x, p: (x, {**p, "running_var": None}), ValueError, "both be tensors or both be None"),
    ("running shape", lambda x, p: (x, {**p, "running_mean": torch.zeros(2)}), ValueError,
     r"running_mean must have shape"),
    ("x dtype", lambda x, p: (x.long(), p), TypeError, r"^x must have a floating dtype"),
    ("running_var dtype", lambda x, p: (x, {**p, "running_var": torch.ones(3, dtype=torch.float16)}), TypeError,
     r"running_var has dtype torch.float16, expected torch.float32"),
    ("mixed half parameters", lambda x, p: (x.half(), {**p, "weight": p["weight"].half()}), TypeError,
     "must share one dtype"),
    ("x type", lambda x, p: (x.numpy(), p), TypeError, "x must be a tensor"),
    ("dropout rate", lambda x, p: (x, {**p, "dropout": 1.5}), ValueError, r"dropout must be a probability"),
    ("seed dtype", lambda x, p: (x, {**p, "dropout": 0.1, "seed": torch.ones(1)}), TypeError, "seed must be an int64"),
    ("seed size", lambda x, p: (x, {**p, "dropout": 0.1, "seed": torch.ones(2, dtype=torch.int64)}), ValueError,
     r"seed must hold one seed per input \(1\), got 2"),
    ("seed device", lambda x, p: (x, {**p, "dropout": 0.1, "seed": torch.ones(1, dtype=torch.int64, device="meta")}),
     ValueError, "seed is on meta, expected cpu"),
    ("dropout type", lambda x, p: (x, {**p, "dropout": "0.1"}), ValueError, r"dropout must be a probability"),
    ("counter device", lambda x, p: (x, {**p, "num_batches_tracked": torch.zeros((), dtype=torch.int64,
                                                                                   device="meta")}),
     ValueError, r"num_batches_tracked\[0\] is on meta, expected cpu"),
    ("cumulative without counter", lambda x, p: (x, {**p, "momentum": None}), ValueError, "needs num_batches_tracked"),
    ("counter dtype", lambda x, p: (x, {**p, "num_batches_tracked": torch.zeros(1)}), TypeError,
     r"num_batches_tracked\[0\] must be a one-element int64"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raise_before_any_launch(case, backend):
    _, make, error, message = case
    x = torch.randn(4, 3, 5, 5)
    params = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3))
    x, params = make(x, params)
    with fk.use_backend(backend), fk.count_launches() as launches, pytest.raises(error, match=message):
        fk.bn_relu(x, **params, training=True)
    assert launches[0] == 0


DTYPES_OF_PARAMS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_parameter_dtypes_follow_torch(backend):
    """Every dtype of input, parameters and running statistics: the op refuses (a TypeError naming
    the argument, before any launch) exactly what torch's batch_norm refuses."""
    refused = []
    for x_dtype, p_dtype, r_dtype in itertools.product(DTYPES_OF_PARAMS, repeat=3):
        x = torch.randn(4, 3, 2, 2, dtype=x_dtype)

        def params():
            return dict(weight=torch.ones(3, dtype=p_dtype), bias=torch.zeros(3, dtype=p_dtype),
                        running_mean=torch.zeros(3, dtype=r_dtype), running_var=torch.ones(3, dtype=r_dtype))

        try:
            p = params()
            F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], True)
            torch_refuses = False
        except RuntimeError:
            torch_refuses = True
        with fk.use_backend(backend), fk.count_launches() as launches:
            try:
                fk.bn_relu(x, **params(), training=True)
                refuses = False
            except TypeError:
                refuses = True
                assert launches[0] == 0
        assert refuses == torch_refuses, (x_dtype, p_dtype, r_dtype)
        refused.append(refuses)
    assert any(refused) and not all(refused)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", [1e-5, 0.0, -1e-5])
def test_eps_rule_follows_the_installed_torch(backend, training, eps):
    """torch 2.13 takes eps = 0 in eval, 2.11 does not: the ops refuse what the installed torch refuses."""
    x, params = torch.randn(4, 3, 2, 2), dict(weight=None, bias=None, running_mean=torch.zeros(3),
                                               running_var=torch.ones(3))
    try:
        F.batch_norm(x, params["running_mean"].clone(), params["running_var"].clone(), training=training, eps=eps)
        torch_refuses = False
    except ValueError:
        torch_refuses = True
    with fk.use_backend(backend):
        if torch_refuses:
            with pytest.raises(ValueError, match="eps must be"):
                fk.bn_relu(x, **params, training=training, eps=eps)
        else:
            fk.bn_relu(x, **params, training=training, eps=eps)


def test_eval_needs_running_statistics():
    with pytest.raises(ValueError, match="needed when training=False"):
        fk.bn_relu(torch.randn(4, 3), None, None, None, None, training=False)


@pytest.mark.slow
# The workers choose their own mode: the eager two go beside the fake GPU's session (either_session), for balance.
@pytest.mark.parametrize("mode", [pytest.param("interpreter", marks=pytest.mark.either_session),
                                  pytest.param("fake_gpu", marks=pytest.mark.either_session), "compiled"])
def test_synchronised_statistics_across_two_processes(tmp_path, mode):
    """Two gloo ranks, each with part of the batch, against one process on the whole batch:
    bn_relu, and join_bn_relu of two inputs with a drop-path mask; neither reads a device value
    on the host (the workers run under no_host_reads). ``compiled``: on the fake GPU under
    torch.compile(fullgraph=True), the collectives traced (the worker checks that it compiles
    once, and compiles a FractalNet training step with synchronised BatchNorm)."""
    worker = Path(__file__).with_name("sync_bn_worker.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "WORLD_SIZE": "2", "FRACTAL_KERNELS_BACKEND": "triton"}
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(tmp_path), mode], env={**env, "RANK": str(rank)})
        for rank in range(2)
    ]
    assert all(p.wait(timeout=600) == 0 for p in procs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = ranks[0]["data"]
    x, y = (torch.cat(data[name]).requires_grad_() for name in ("x", "y"))
    w, b = (data[name].clone().requires_grad_() for name in ("weight", "bias"))
    running = [torch.zeros(4, dtype=torch.float64) if i % 2 == 0 else torch.ones(4,
                                                                                 dtype=torch.float64) for i in range(6)]
    out = F.relu(F.batch_norm(x, running[0], running[1], w, b, True, 0.1, 1e-5))
    joined = reference.join_bn_relu([x, y], torch.cat(data["mask"], 1), [w, None], [b, b], [running[2], running[4]],
                                    [running[3], running[5]], True, 0.1, 1e-5)
    grad = torch.cat(data["g"])
    grads = torch.autograd.grad([out, joined], [x, y, w, b], [grad, grad])
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out)
    torch.testing.assert_close(torch.cat([r["joined"] for r in ranks]), joined)
    for i in range(2):  # input gradients: each rank's shard
        torch.testing.assert_close(torch.cat([r["grads"][i] for r in ranks]), grads[i])
    for i in range(2, 4):  # parameter gradients stay local: DDP sums them
        torch.testing.assert_close(ranks[0]["grads"][i] + ranks[1]["grads"][i], grads[i])
    for r in ranks:
        for actual, expected in zip(r["running"], running):
            torch.testing.assert_close(actual, expected, atol=1e-7, rtol=1e-6)
