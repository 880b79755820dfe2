"""join_bn_relu: the fused column-end op (interpreted on CPU) against the fp64 reference composition."""

import pytest
import torch
from helpers import DEVICE, DTYPES, STAT_TOLERANCES, assert_close, gradcheck, to_layout

import fractal_kernels as fk
from fractal_kernels.channel_tiling import channel_tiling, tile_for_gpu
from fractal_kernels.testing import saved_bytes
from fractal_kernels import reference


def make_case(k, shape=(6, 4, 3, 5), dtype=torch.float32, channels_last=False, seed=0, all_params=False):
    """k inputs with their BN parameters; without ``all_params`` some weights, biases and running
    statistics are None, as the contract allows."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xs = [
        to_layout((torch.randn(shape, generator=gen, dtype=torch.float64) * (i + 1) + i).to(dtype), channels_last)
        .to(DEVICE).requires_grad_()
        for i in range(k)
    ]

    def vector(offset, spread):
        return (torch.rand(C, generator=gen, dtype=torch.float64) * spread + offset).to(DEVICE, param_dtype)

    weights = [vector(0.5, 1).requires_grad_() if all_params or i % 3 != 1 else None for i in range(k)]
    biases = [vector(-0.5, 1).requires_grad_() if all_params or i % 3 != 2 else None for i in range(k)]
    running = [all_params or i % 2 == 0 for i in range(k)]
    running_means = [vector(-1, 2) if r else None for r in running]
    running_vars = [vector(0.5, 1) if r else None for r in running]
    mask = torch.rand(k, shape[0], generator=gen) < 0.6
    mask[:, 0] = False  # no survivor
    mask[:, 1] = True
    return xs, mask.to(DEVICE), weights, biases, running_means, running_vars


def leaves(xs, weights, biases):
    return list(xs) + [t for t in (*weights, *biases) if t is not None]


def run_both(case, training, momentum=0.1):
    xs, mask, weights, biases, running_means, running_vars = case

    def fp64(t, grad=False):
        return None if t is None else t.detach().double().requires_grad_(grad)

    xs64 = [fp64(x, True) for x in xs]
    weights64 = [fp64(w, True) for w in weights]
    biases64 = [fp64(b, True) for b in biases]
    running64 = ([fp64(t) for t in running_means], [fp64(t) for t in running_vars])
    with fk.use_backend("triton"):
        out = fk.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, training, momentum)
    expected = reference.join_bn_relu(xs64, mask, weights64, biases64, *running64, training, momentum)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, leaves(xs, weights, biases), grad.to(out.dtype).to(DEVICE))
    expected_grads = torch.autograd.grad(expected, leaves(xs64, weights64, biases64), grad)
    return out, expected, grads, expected_grads, running64


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_reference_composition(k, dtype, channels_last, training):
    case = make_case(k, dtype=dtype, channels_last=channels_last, all_params=not training)
    out, expected, grads, expected_grads, (means64, vars64) = run_both(case, training)
    assert out.dtype == dtype and out.stride() == case[0][0].stride()
    scale = 4.0 if dtype in (torch.float16, torch.bfloat16) else 10.0
    assert_close(out, expected, dtype, scale)
    assert torch.all(out[0] == 0), "a sample with no survivor must be 0"
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype, scale * max(1.0, e.abs().max().item()))
    atol, rtol = STAT_TOLERANCES[dtype]
    for actual, ref in zip((*case[4], *case[5]), (*means64, *vars64)):
        if actual is not None:
            torch.testing.assert_close(actual.double(), ref, atol=atol, rtol=rtol)


def test_more_than_eight_inputs():
    case = make_case(9, shape=(5, 3, 2, 3), dtype=torch.float64, all_params=True)
    out, expected, grads, expected_grads, _ = run_both(case, training=True)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_nan_in_dropped_rows_reaches_no_gradient_in_eval():
    """With running statistics, NaN and Inf in the rows a mask drops reach neither the output nor
    any gradient, the weight and bias gradients included; torch's composition of bn_relu and the
    join gives NaN there (0 * NaN in the BatchNorm backward of the dropped rows)."""
    xs, mask, weights, biases, running_means, running_vars = make_case(3, dtype=torch.float64, all_params=True)
    mask[1, :3] = False
    xs = [x.detach().clone() for x in xs]
    xs[1][:3] = float("nan")
    xs[1][1, 0] = float("inf")
    xs = [x.requires_grad_() for x in xs]
    state = (weights, biases, running_means, running_vars, False)

    def forward_backward(op, inputs):
        out = op(inputs, mask, *state)
        return out, torch.autograd.grad(out.sum(), inputs + weights + biases)

    with fk.use_backend("triton"):
        out, grads = forward_backward(fk.join_bn_relu, xs)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    composed, composed_grads = forward_backward(reference.join_bn_relu, xs)
    torch.testing.assert_close(out, composed)
    assert composed_grads[3 + 1].isnan().any()  # the weight of input 1
    expected, expected_grads = forward_backward(reference.join_bn_relu,
                                                [x.detach().nan_to_num(0.0, 0.0, 0.0).requires_grad_() for x in xs])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_without_mask_is_the_plain_mean():
    xs, _, weights, biases, running_means, running_vars = make_case(3, dtype=torch.float64)
    out, expected, grads, expected_grads, _ = run_both((xs, None, weights, biases, running_means, running_vars), True)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(training):
    # Four samples (none kept, all kept, two drawn), two channels, two positions: each input
    # element and parameter costs the numerical Jacobian two interpreted forward launches.
    xs, mask, weights, biases, running_means, running_vars = make_case(
        3, shape=(4, 2, 1, 2), dtype=torch.float64, all_params=True
    )

    def fn(*tensors):
        with fk.use_backend("triton"):
            return fk.join_bn_relu(
                list(tensors[:3]), mask, list(tensors[3:6]), list(tensors[6:]),
                [t.clone() for t in running_means], [t.clone() for t in running_vars], training,
            )

    assert gradcheck(fn, (*xs, *weights, *biases))


def test_launch_counts():
    """One launch a pass where each channel block is one chunk (small problems)."""
    xs, mask, weights, biases, running_means, running_vars = make_case(3, all_params=True)
    with fk.use_backend("triton"):
        with fk.count_launches() as train_forward:
            out = fk.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, True)
        with fk.count_launches() as train_backward:
            out.sum().backward()
        with fk.count_launches() as eval_forward:
            fk.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, False)
    assert (train_forward[0], train_backward[0], eval_forward[0]) == (1, 1, 1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_split_kernels_over_chunks(channels_last):
    """Tiled as a GPU tiles more than SINGLE_PASS_TILES tiles a channel block: the split kernels
    over several chunks, five launches, the reference's results."""
    case = make_case(3, shape=(72 if not channels_last else 36, 2, 16, 16), channels_last=channels_last,
                     all_params=True)
    with tile_for_gpu(1):
        assert channel_tiling(case[0][0], 3).num_chunks > 1
        with fk.count_launches() as launches:
            out, expected, grads, expected_grads, (means64, vars64) = run_both(case, True)
    assert launches[0] == 5
    assert_close(out, expected, torch.float32, 10.0)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, torch.float32, 10.0 * max(1.0, e.abs().max().item()))
    atol, rtol = STAT_TOLERANCES[torch.float32]
    for actual, ref in zip((*case[4], *case[5]), (*means64, *vars64)):
        torch.testing.assert_close(actual.double(), ref, atol=atol, rtol=rtol)


def test_saves_raw_inputs_mask_and_per_channel_statistics():
    k, C = 3, 8
    xs, mask, weights, biases, running_means, running_vars = make_case(k, shape=(8, C, 4, 4), all_params=True)
    with fk.use_backend("triton"):
        fused = saved_bytes(lambda: fk.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, True))
    unfused = saved_bytes(lambda: reference.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, True))
    inputs = sum(x.numel() * x.element_size() for x in xs)
    per_channel = 4 * k * C * 4  # weight, bias, mean, variance of each input
    assert fused == inputs + mask.numel() + per_channel
    assert unfused > 2 * inputs


BAD_ARGS = [
    ("weights length", lambda a: {**a, "weights": a["weights"][:2]}, ValueError,
     "weights must have one entry per input"),
    ("biases type", lambda a: {**a, "biases": None}, TypeError, "biases must be a list or tuple"),
    ("weight shape", lambda a: {**a, "weights": [None, torch.ones(7), None]}, ValueError,
     r"weights\[1\] must have shape"),
    ("running pair", lambda a: {**a, "running_vars": [None] * 3}, ValueError,
     r"running_means\[0\] and running_vars\[0\]"),
    ("mask shape", lambda a: {**a, "mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "mask must have shape"),
    ("mask weights", lambda a: {**a, "mask": torch.full((3, 6), 0.3)}, ValueError, "mask must hold only 0 and 1"),
    ("input shape", lambda a: {**a, "inputs": [a["inputs"][0], a["inputs"][1][:, :2], a["inputs"][2]]}, ValueError,
     r"inputs\[1\] has shape"),
    ("eval without running",
     lambda a: {**a, "running_means": [None] * 3, "running_vars": [None] * 3, "training": False},
     ValueError, "needed when training=False"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raise_before_any_launch(case, backend):
    _, change, error, message = case
    xs = [torch.randn(6, 4, 3, 3) for _ in range(3)]
    args = dict(inputs=xs, mask=None, weights=[None] * 3, biases=[None] * 3,
                running_means=[torch.zeros(4)] * 3, running_vars=[torch.ones(4)] * 3, training=True)
    with fk.use_backend(backend), fk.count_launches() as launches, pytest.raises(error, match=message):
        fk.join_bn_relu(**change(args))
    assert launches[0] == 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dropout_per_input_equals_the_composition_with_the_same_masks(channels_last):
    """Each input has its own dropout seed; with the masks those seeds give, the fused op is the
    reference composition on the dropped inputs (statistics over the dropped tensors)."""
    p = 0.25
    xs, mask, weights, biases, running_means, running_vars = make_case(3, dtype=torch.float64,
                                                                       channels_last=channels_last, all_params=True)
    seeds = torch.tensor([5, 6, 7], device=DEVICE)
    copies = [[t.detach().clone().requires_grad_(t.requires_grad) for t in ts]
              for ts in (xs, weights, biases, running_means, running_vars)]
    with fk.use_backend("triton"):
        masks = [fk.dropout_mask(x, seeds[i:i + 1], p) for i, x in enumerate(xs)]
        out = fk.join_bn_relu(xs, mask, weights, biases, running_means, running_vars, True, dropout=p, seeds=seeds)
    dropped = [x * m / (1 - p) for x, m in zip(copies[0], masks)]
    expected = reference.join_bn_relu(dropped, mask, *copies[1:], True)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    actual = torch.autograd.grad(out, leaves(xs, weights, biases), grad)
    wanted = torch.autograd.grad(expected, leaves(copies[0], copies[1], copies[2]), grad)
    for a, e in zip(actual, wanted):
        torch.testing.assert_close(a, e)
    for a, e in zip(running_means + running_vars, copies[3] + copies[4]):
        torch.testing.assert_close(a, e)
    assert not torch.equal(masks[0], masks[1])
