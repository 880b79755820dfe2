"""gather_join and gather_join_bn_relu (interpreted on CPU) against their references (the
skip_dropped model they serve is test_model.py's)."""

import helpers
import pytest
import torch
from helpers import DEVICE, DTYPES, STAT_TOLERANCES, assert_close, gradcheck

import fractal_kernels as fk
from fractal_kernels import reference

BATCH = 7


def make_rows(sizes, seed=0):
    return helpers.make_rows(sizes, BATCH, seed)


def compact_inputs(sizes, dtype, channels_last, seed=0, shape=(4, 3, 5)):
    return helpers.make_inputs(sizes, shape, dtype, channels_last, seed)


def grads(out, leaves, grad):
    return torch.autograd.grad(out, leaves, grad, allow_unused=True, materialize_grads=True)


SIZES = [(4, 7, 2), (3, 0, 5), (1, 2), (6,)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_gather_join(sizes, dtype, channels_last):
    rows = make_rows(sizes)
    xs = compact_inputs(sizes, dtype, channels_last)
    with fk.use_backend("triton"):
        out = fk.gather_join(xs, rows)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    expected = reference.gather_join(xs64, rows)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    assert out.shape == (BATCH, 4, 3, 5)
    assert_close(out, expected, dtype)
    assert torch.all(out[(rows < 0).all(0)] == 0)
    for g, e in zip(grads(out, xs, grad), grads(expected, xs64, grad.double())):
        assert g.shape == e.shape
        assert_close(g, e, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", SIZES[:3], ids=str)
def test_gather_join_bn_relu(sizes, dtype, channels_last):
    k = len(sizes)
    rows = make_rows(sizes, seed=1)
    xs = compact_inputs(sizes, dtype, channels_last, seed=1)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    ws = [(torch.rand(4, dtype=torch.float64) + 0.5).to(DEVICE, param).requires_grad_() for _ in range(k)]
    bs = [torch.randn(4, dtype=torch.float64).to(DEVICE, param).requires_grad_() for _ in range(k)]
    rms = [torch.randn(4, dtype=torch.float64).to(DEVICE, param) for _ in range(k)]
    rvs = [(torch.rand(4, dtype=torch.float64) + 0.5).to(DEVICE, param) for _ in range(k)]
    copies = [[t.detach().double().requires_grad_(t.requires_grad) for t in ts] for ts in (xs, ws, bs, rms, rvs)]
    with fk.use_backend("triton"), fk.count_launches() as launches:
        out = fk.gather_join_bn_relu(xs, rows, ws, bs, rms, rvs, True)
    assert launches[0] == 3  # statistics, combine, apply
    expected = reference.gather_join_bn_relu(copies[0], rows, *copies[1:], True)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    scale = 4.0 if dtype in (torch.float16, torch.bfloat16) else 10.0
    assert_close(out, expected, dtype, scale)
    actual_grads = grads(out, xs + ws + bs, grad)
    for g, e in zip(actual_grads, grads(expected, copies[0] + copies[1] + copies[2], grad.double())):
        assert_close(g, e, dtype, scale * max(1.0, e.abs().max().item() if e.numel() else 1.0))
    atol, rtol = STAT_TOLERANCES[dtype]
    for actual, ref in zip(rms + rvs, copies[3] + copies[4]):
        torch.testing.assert_close(actual.double(), ref, atol=atol, rtol=rtol)


def test_gather_join_bn_relu_with_dropout_equals_the_composition_with_the_same_masks():
    """Dropout of compact inputs: the mask is drawn over each input's own rows."""
    sizes, p = (4, 7, 2), 0.3
    rows = make_rows(sizes, seed=2)
    xs = compact_inputs(sizes, torch.float64, True, seed=2)
    params = [[torch.rand(4, dtype=torch.float64).to(DEVICE) + 0.5 for _ in sizes] for _ in range(4)]
    seeds = torch.tensor([3, 1, 4], device=DEVICE)
    with fk.use_backend("triton"):
        masks = [fk.dropout_mask(x, seeds[i:i + 1], p) for i, x in enumerate(xs)]
        out = fk.gather_join_bn_relu(xs, rows, *[[t.clone() for t in ts] for ts in params], True, dropout=p,
                                     seeds=seeds)
    copies = [x.detach().clone().requires_grad_() for x in xs]
    expected = reference.gather_join_bn_relu([x * m / (1 - p) for x, m in zip(copies, masks)], rows, *params, True)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, dtype=torch.float64).to(DEVICE)
    for g, e in zip(grads(out, xs, grad), grads(expected, copies, grad)):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(training):
    sizes = (2, 3, 0)
    rows = make_rows(sizes)
    xs = compact_inputs(sizes, torch.float64, False, shape=(2, 2, 1))
    ws = [torch.rand(2, dtype=torch.float64) + 0.5 for _ in sizes]
    bs = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in sizes]
    running = [torch.zeros(2, dtype=torch.float64) for _ in sizes], [torch.ones(2, dtype=torch.float64) for _ in sizes]

    def fn(*tensors):
        with fk.use_backend("triton"):
            joined = fk.gather_join(list(tensors[:3]), rows)
            normalised = fk.gather_join_bn_relu(list(tensors[:3]), rows, list(tensors[3:6]), list(tensors[6:]),
                                                *[[t.clone() for t in ts] for ts in running], training)
        return joined + normalised

    assert gradcheck(fn, (*xs, *[w.requires_grad_() for w in ws], *bs))


BAD = [
    ("rows dtype", lambda xs, rows: (xs, rows.float()), TypeError, "int32 or int64"),
    ("rows shape", lambda xs, rows: (xs, rows[:1]), ValueError, r"\[num_inputs, batch\]"),
    ("row out of range", lambda xs, rows: (xs, rows + 10), ValueError, "must be -1 or a row"),
    ("trailing shape", lambda xs, rows: ([xs[0], xs[1][:, :2]], rows), ValueError, r"inputs\[1\] has shape"),
]


BAD_BN = [
    ("weights count", lambda p: {**p, "weights": p["weights"][:1]}, ValueError,
     r"weights must have one entry per input \(2\), got 1"),
    ("running_vars shape", lambda p: {**p, "running_vars": [torch.ones(3, device=DEVICE)] * 2}, ValueError,
     r"running_vars\[0\]"),
    ("momentum None", lambda p: {**p, "momentum": None}, ValueError, "needs num_batches_tracked"),
    ("eps", lambda p: {**p, "eps": 0.0}, ValueError, "eps"),
    ("dropout", lambda p: {**p, "dropout": 1.5}, ValueError, r"dropout must be a probability in \[0, 1\]"),
    ("seeds", lambda p: {**p, "dropout": 0.5, "seeds": torch.zeros(1, dtype=torch.int64, device=DEVICE)}, ValueError,
     r"seeds must hold one seed per input \(2\), got 1"),
    ("one row of a channel", lambda p: {**p, "inputs": [p["inputs"][0][:1], p["inputs"][1]],
                                        "rows": make_rows((1, 5))}, ValueError, "more than 1 value per channel"),
]


def gather_bn_arguments():
    return dict(inputs=[torch.randn(3, 4, 1, 1, device=DEVICE), torch.randn(5, 4, 1, 1, device=DEVICE)],
                rows=make_rows((3, 5)), weights=[torch.ones(4, device=DEVICE)] * 2,
                biases=[torch.zeros(4, device=DEVICE)] * 2, running_means=[torch.zeros(4, device=DEVICE)] * 2,
                running_vars=[torch.ones(4, device=DEVICE)] * 2, training=True)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments(case, backend):
    _, change, error, message = case
    xs, rows = change([torch.randn(3, 4, 2, 2, device=DEVICE), torch.randn(5, 4, 2, 2, device=DEVICE)], make_rows((3,
                                                                                                                   5)))
    params = {**gather_bn_arguments(), "inputs": xs, "rows": rows}
    for op, args in ((fk.gather_join, dict(inputs=xs, rows=rows)), (fk.gather_join_bn_relu, params)):
        with fk.use_backend(backend), fk.count_launches() as launches, pytest.raises(error, match=message):
            op(**args)
        assert launches[0] == 0, op.__name__


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD_BN, ids=[c[0] for c in BAD_BN])
def test_bad_batchnorm_arguments(case, backend):
    _, change, error, message = case
    with fk.use_backend(backend), fk.count_launches() as launches, pytest.raises(error, match=message):
        fk.gather_join_bn_relu(**change(gather_bn_arguments()))
    assert launches[0] == 0


def test_fake_tensors_skip_the_value_checks():
    """On fake CPU tensors (a memory estimator, a FLOP counter) the gather table has no values to
    validate (these zeros would name a row twice): the ops run on shapes alone."""
    from fractal_kernels.testing import fake_mode

    with fake_mode():
        args = gather_bn_arguments()
        args["rows"] = torch.zeros(2, 5, dtype=torch.int64, device=DEVICE)
        out = fk.gather_join_bn_relu(**args)
        assert out.shape == (5, 4, 1, 1)
        assert fk.gather_join(args["inputs"], args["rows"]).shape == (5, 4, 1, 1)
