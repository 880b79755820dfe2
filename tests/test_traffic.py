"""Memory traffic of the fused ops, counted in the interpreter: every op, forward and backward,
within 1.05x of the bytes its design must move (testing.traffic.minimal_bytes), and below the
eager composition's."""

import pytest
import torch
from helpers import DEVICE, to_layout

import fractal_kernels as fk
from fractal_kernels import reference
from fractal_kernels.channel_tiling import channel_tiling, tile_for_gpu
from fractal_kernels.launch import INTERPRETING
from fractal_kernels.testing import fake_mode
from fractal_kernels.testing.traffic import count_traffic, eager_traffic, minimal_bytes

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="kernel traffic is counted in the Triton interpreter")

SHAPE = (8, 32, 16, 16)


def make(op, k, dtype, channels_last, masked, dropout, seed=0):
    """The op's call on fresh inputs: (forward thunk, leaves, inputs, mask, rows)."""
    gen = torch.Generator().manual_seed(seed)
    gather = op.startswith("gather")
    sizes = [SHAPE[0] - 2 * i for i in range(k)] if gather else [SHAPE[0]] * k
    xs = [to_layout(torch.randn((n,) + SHAPE[1:], generator=gen).to(dtype), channels_last).to(DEVICE).requires_grad_()
          for n in sizes]
    mask = rows = None
    if gather:
        rows = torch.full((k, SHAPE[0]), -1, dtype=torch.int64)
        for i, n in enumerate(sizes):
            rows[i, torch.randperm(SHAPE[0], generator=gen)[:n]] = torch.arange(n)
        rows = rows.to(DEVICE)
    elif masked:
        mask = (torch.rand(k, SHAPE[0], generator=gen) < 0.7).to(DEVICE)
    C = SHAPE[1]
    params = dict(weights=[torch.rand(C, generator=gen).to(DEVICE).requires_grad_() for _ in range(k)],
                  biases=[torch.randn(C, generator=gen).to(DEVICE).requires_grad_() for _ in range(k)],
                  running_means=[torch.zeros(C, device=DEVICE) for _ in range(k)],
                  running_vars=[torch.ones(C, device=DEVICE) for _ in range(k)])
    options = dict(dropout=0.2) if dropout else {}
    if op == "masked_join":
        return (lambda: fk.masked_join(xs, mask)), xs, xs, mask, rows
    if op == "gather_join":
        return (lambda: fk.gather_join(xs, rows)), xs, xs, mask, rows
    leaves = xs + params["weights"] + params["biases"]
    if op == "bn_relu":
        p = {name: values[0] for name, values in params.items()}
        return (lambda: fk.bn_relu(xs[0], p["weights"], p["biases"], p["running_means"], p["running_vars"], True,
                                   **options)), leaves, xs, mask, rows
    if op == "join_bn_relu":
        return (lambda: fk.join_bn_relu(xs, mask, **params, training=True, **options)), leaves, xs, mask, rows
    return (lambda: fk.gather_join_bn_relu(xs, rows, **params, training=True, **options)), leaves, xs, mask, rows


CASES = [("masked_join", 3, True, False), ("masked_join", 3, False, False), ("gather_join", 3, False, False),
         ("bn_relu", 1, False, False), ("bn_relu", 1, False, True), ("join_bn_relu", 3, True, False),
         ("join_bn_relu", 3, False, True), ("gather_join_bn_relu", 3, False, True)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,k,masked,dropout", CASES,
                         ids=[f"{op}-k{k}{'-mask' if m else ''}{'-dropout' if d else ''}" for op, k, m, d in CASES])
def test_counted_traffic_is_within_5_percent_of_the_minimal_bytes(op, k, masked, dropout, dtype, channels_last):
    forward, leaves, xs, mask, rows = make(op, k, dtype, channels_last, masked, dropout)
    with fk.use_backend("triton"):
        with count_traffic() as traffic_forward:
            out = forward()
        grad = torch.randn_like(out)
        with count_traffic() as traffic_backward:
            torch.autograd.grad(out, leaves, grad, allow_unused=True)
    minimal = minimal_bytes(op.replace("gather_join_bn_relu", "join_bn_relu"), xs, mask, rows)
    for direction, counted in (("forward", traffic_forward), ("backward", traffic_backward)):
        ratio = counted.total / minimal[direction]
        assert 1.0 <= ratio <= 1.05, f"{direction}: counted {counted.total} B, minimal {minimal[direction]} B"


@pytest.mark.parametrize("op,k,masked,dropout", CASES[:2] + CASES[3:4] + CASES[5:6],
                         ids=["masked_join-mask", "masked_join", "bn_relu", "join_bn_relu-mask"])
def test_eager_composition_moves_more(op, k, masked, dropout):
    forward, leaves, xs, mask, rows = make(op, k, torch.float32, False, masked, dropout)
    with fk.use_backend("triton"), count_traffic() as fused:
        out = forward()
        torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)
    with fake_mode():
        fakes = [torch.empty(x.shape).requires_grad_() for x in xs]
        fake_mask = None if mask is None else torch.empty(mask.shape, dtype=torch.bool)
        C = SHAPE[1]

        def eager():
            if op == "masked_join":
                out = reference.masked_join(fakes, fake_mask)
            else:
                params = [[torch.ones(C) for _ in range(k)] for _ in range(4)]
                out = reference.join_bn_relu(fakes, fake_mask, *params, True)
            torch.autograd.grad(out, fakes, torch.ones_like(out))

        eager_bytes = eager_traffic(eager)
    assert eager_bytes > 1.3 * fused.total


def test_minimal_bytes_of_the_two_pass_batch_norm():
    x = torch.empty(100, 64, 32, 32)
    size = x.numel() * 4
    with tile_for_gpu(132):  # 50 tiles a channel block: the split kernels
        assert minimal_bytes("bn_relu", [x]) == {"forward": 3 * size, "backward": 5 * size,
                                                 "forward+backward": 8 * size}
    assert minimal_bytes("masked_join", [x, x]) == {"forward": 3 * size, "backward": 3 * size,
                                                     "forward+backward": 6 * size}


def test_minimal_bytes_of_the_single_pass_batch_norm():
    """One launch a pass: each input read once forward (statistics and apply), the gradient and
    each input once backward (sums and input gradients)."""
    x = torch.empty(16, 64, 8, 8)
    size = x.numel() * 4
    with tile_for_gpu(132):
        assert channel_tiling(x).num_chunks == 1
        assert minimal_bytes("bn_relu", [x]) == {"forward": 2 * size, "backward": 3 * size,
                                                 "forward+backward": 5 * size}


def test_counting_patches_the_interpreter_only_while_it_counts():
    """Importing the counter changes nothing in Triton; a count (nested counts too) wraps the
    interpreter's loads, stores and grid call and puts Triton's own back after."""
    from triton.runtime.interpreter import GridExecutor, interpreter_builder

    own = (interpreter_builder.create_masked_load, interpreter_builder.create_masked_store, GridExecutor.__call__)
    x, y = torch.randn(2, 4, 3, 2, 2, device=DEVICE)
    with fk.use_backend("triton"), count_traffic() as outer:
        assert GridExecutor.__call__ is not own[2]
        with count_traffic() as inner:
            fk.masked_join([x, y])  # two inputs read, one output written
        fk.masked_join([x, y])
    assert (interpreter_builder.create_masked_load, interpreter_builder.create_masked_store,
            GridExecutor.__call__) == own
    assert inner.launches == 1 and outer.launches == 1 and inner.total == x.numel() * 4 * 3
