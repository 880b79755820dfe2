"""Property-based tests (hypothesis): every op against its fp64 composition over random shapes,
layouts, numbers of inputs (more than eight included), masks and gather tables with samples no
input keeps, NaN and Inf where an input is dropped, running statistics and batch counters; and
random corruptions of valid arguments, each of which must raise ValueError or TypeError before
any launch and leave every tensor as it was."""

import math

import pytest
import torch
from helpers import DEVICE, STAT_TOLERANCES, TOLERANCES, to_layout

import fractal_kernels as fk
from fractal_kernels import reference

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install -e '.[test]')")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: Each example runs the kernels in the interpreter on CPU: few, small and reproducible examples.
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPATIAL = [(), (3,), (2, 3), (1, 1), (2, 1, 2)]


@st.composite
def activations(draw, bn: bool, k_max: int = 10):
    """k inputs [N, C, *spatial] (fp32 or fp64, contiguous or channels-last) as fp64 masters."""
    k = draw(st.integers(1, k_max))
    spatial = draw(st.sampled_from(SPATIAL))
    N = draw(st.integers(2 if bn and not spatial else 1, 5))
    C = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    channels_last = len(spatial) == 2 and draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    masters = [torch.randn((N, C) + spatial, generator=gen, dtype=torch.float64) * 2 + 0.5 for _ in range(k)]
    return masters, dtype, channels_last, gen


@st.composite
def masks(draw, k: int, N: int):
    """None, or a [k, N] bool or 0/1 float mask in which some samples may keep no input."""
    if draw(st.booleans()) and k > 1:
        return None
    keep = draw(st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=k, max_size=k))
    mask = torch.tensor(keep, dtype=torch.bool)
    return mask.float() if draw(st.booleans()) else mask


def poison_dropped(masters, mask):
    """Copies of the inputs with NaN and Inf in every row the mask drops."""
    poisoned = [x.clone() for x in masters]
    if mask is not None:
        for i, x in enumerate(poisoned):
            dropped = mask[i] == 0
            x[dropped] = float("nan")
            x[dropped, ..., :1] = float("inf")
    return poisoned


def leaves(masters, dtype, channels_last):
    """The op's inputs (dtype, layout) and the fp64 composition's, both requiring grad."""
    mine = [to_layout(x.to(dtype), channels_last).to(DEVICE).requires_grad_() for x in masters]
    theirs = [x.detach().double().requires_grad_() for x in mine]
    return mine, theirs


def assert_tensors_close(actual, expected, dtype, scale=1.0, stats=False):
    atol, rtol = (STAT_TOLERANCES if stats else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol * scale,
                               equal_nan=True)


def check_gradients(out, expected, mine, theirs, dtype, gen):
    """Forward values, then the gradients of a random cotangent with respect to each pair of leaves."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_tensors_close(out, expected, dtype, scale)
    if not out.numel():
        return
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64)

    def gradients(y, xs, dy):  # None for a leaf y does not depend on (a join of empty inputs)
        return torch.autograd.grad(y, xs, dy, allow_unused=True) if y.requires_grad else [None] * len(xs)

    grads = gradients(out, mine, cotangent.to(out.dtype).to(DEVICE))
    for g, e, leaf in zip(grads, gradients(expected, theirs, cotangent), mine):
        g = torch.zeros_like(leaf) if g is None else g
        e = torch.zeros(leaf.shape, dtype=torch.float64) if e is None else e
        assert torch.isfinite(g).all()
        assert_tensors_close(g, e, dtype, 4 * max([1.0] + e.abs().flatten().tolist()))


@PROPERTY
@given(st.data())
def test_masked_join_is_its_composition(data):
    """Dropped rows hold NaN and Inf: they reach neither the output nor any gradient."""
    masters, dtype, channels_last, gen = data.draw(activations(bn=False))
    mask = data.draw(masks(len(masters), masters[0].shape[0]))
    poisoned = poison_dropped(masters, mask)
    mine, _ = leaves(poisoned, dtype, channels_last)
    _, theirs = leaves(masters, dtype, channels_last)  # the composition sees finite dropped rows
    with fk.use_backend("triton"):
        out = fk.masked_join(mine, None if mask is None else mask.to(DEVICE))
    check_gradients(out, reference.masked_join(theirs, mask), mine, theirs, dtype, gen)


@st.composite
def batchnorm_state(draw, k: int, C: int, dtype, training: bool, gen):
    """Per-input weights, biases, running statistics and counters, any of them absent (running
    statistics not in eval), and a momentum (None: the cumulative average, with counters)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    affine, running = draw(st.booleans()), draw(st.booleans()) or not training
    cumulative = training and running and draw(st.booleans())

    def channels(fill):
        return fill(C, generator=gen, dtype=torch.float64).to(param_dtype)

    state = dict(
        weights=[channels(torch.rand).add(0.5).requires_grad_() if affine else None for _ in range(k)],
        biases=[channels(torch.randn).requires_grad_() if affine else None for _ in range(k)],
        running_means=[channels(torch.randn) if running else None for _ in range(k)],
        running_vars=[channels(torch.rand).add(0.5) if running else None for _ in range(k)],
        num_batches_tracked=[torch.tensor(draw(st.integers(0, 5))) if running and training else None
                             for _ in range(k)],
    )
    return state, None if cumulative else draw(st.sampled_from([0.1, 0.0, 1.0]))


def fp64_state(state):
    """The composition's copies: fp64 leaves for the parameters, clones of the buffers."""
    copy = {name: [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in values]
            for name, values in state.items() if name != "num_batches_tracked"}
    copy["num_batches_tracked"] = [None if t is None else t.clone() for t in state["num_batches_tracked"]]
    return copy


def check_buffers(state, expected, dtype):
    for name in ("running_means", "running_vars", "num_batches_tracked"):
        for t, e in zip(state[name], expected[name]):
            if t is not None:
                assert_tensors_close(t, e, dtype, stats=True)


@pytest.mark.slow
@PROPERTY
@given(st.data())
def test_join_bn_relu_is_its_composition(data):
    """k BatchNorm+ReLU joined by a mask (bn_relu for one input without one); in eval, NaN and
    Inf in dropped rows reach nothing (in training the statistics cover every row, as torch's)."""
    masters, dtype, channels_last, gen = data.draw(activations(bn=True))
    k, N, C = len(masters), masters[0].shape[0], masters[0].shape[1]
    training = data.draw(st.booleans())
    mask = data.draw(masks(k, N))
    state, momentum = data.draw(batchnorm_state(k, C, dtype, training, gen))
    expected_state = fp64_state(state)
    mine, _ = leaves(masters if training else poison_dropped(masters, mask), dtype, channels_last)
    _, theirs = leaves(masters, dtype, channels_last)
    with fk.use_backend("triton"):
        if k == 1 and mask is None:
            one = {name: values[0] for name, values in state.items()}
            out = fk.bn_relu(mine[0], one["weights"], one["biases"], one["running_means"], one["running_vars"],
                             training, momentum, num_batches_tracked=one["num_batches_tracked"])
        else:
            out = fk.join_bn_relu(mine, None if mask is None else mask.to(DEVICE), **state, training=training,
                                  momentum=momentum)
    expected = reference.join_bn_relu(theirs, mask, **expected_state, training=training, momentum=momentum)
    params = [t for t in state["weights"] + state["biases"] if t is not None]
    expected_params = [t for t in expected_state["weights"] + expected_state["biases"] if t is not None]
    check_gradients(out, expected, mine + params, theirs + expected_params, dtype, gen)
    check_buffers(state, expected_state, dtype)


@pytest.mark.slow
@PROPERTY
@given(st.data())
def test_gather_joins_are_their_compositions(data):
    """gather_join and gather_join_bn_relu over compact inputs of random sizes (empty ones
    included), every sample held by any subset of them."""
    masters, dtype, channels_last, gen = data.draw(activations(bn=True))
    k, B, C = len(masters), masters[0].shape[0], masters[0].shape[1]
    held = data.draw(st.lists(st.lists(st.booleans(), min_size=B, max_size=B), min_size=k, max_size=k))
    rows = torch.full((k, B), -1, dtype=torch.int64)
    compact = []
    for i, samples in enumerate(held):
        index = [b for b in range(B) if samples[b]]
        if math.prod(masters[i].shape[2:]) * len(index) == 1:
            index = []  # one value per channel has no batch statistics in training
        order = torch.randperm(len(index), generator=gen)
        rows[i, torch.tensor(index, dtype=torch.int64)[order]] = torch.arange(len(index))
        compact.append(masters[i][torch.tensor(index, dtype=torch.int64)] if index else masters[i][:0])
    mine, theirs = leaves(compact, dtype, channels_last)
    with fk.use_backend("triton"):
        out = fk.gather_join(mine, rows.to(DEVICE))
    check_gradients(out, reference.gather_join(theirs, rows), mine, theirs, dtype, gen)

    training = data.draw(st.booleans())
    state, momentum = data.draw(batchnorm_state(k, C, dtype, training, gen))
    expected_state = fp64_state(state)
    mine, theirs = leaves(compact, dtype, channels_last)
    with fk.use_backend("triton"):
        out = fk.gather_join_bn_relu(mine, rows.to(DEVICE), **state, training=training, momentum=momentum)
    expected = reference.gather_join_bn_relu(theirs, rows, **expected_state, training=training, momentum=momentum)
    params = [t for t in state["weights"] + state["biases"] if t is not None]
    expected_params = [t for t in expected_state["weights"] + expected_state["biases"] if t is not None]
    check_gradients(out, expected, mine + params, theirs + expected_params, dtype, gen)
    check_buffers(state, expected_state, dtype)


# ----------------------------------------------------------------------------------------------
# Corruptions of valid arguments
# ----------------------------------------------------------------------------------------------


def valid_call(op: str, k: int):
    """(function, keyword arguments) of a valid training call of ``op`` with k inputs."""
    gen = torch.Generator().manual_seed(k)
    C, B = 3, 4

    def tensor(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    inputs = [tensor(B, C, 2, 2) for _ in range(k)]
    state = dict(weights=[tensor(C) for _ in range(k)], biases=[tensor(C) for _ in range(k)],
                 running_means=[tensor(C) for _ in range(k)], running_vars=[tensor(C).abs() + 0.5 for _ in range(k)],
                 num_batches_tracked=[torch.tensor(1, device=DEVICE) for _ in range(k)])
    mask = torch.ones(k, B, dtype=torch.bool, device=DEVICE)
    rows = torch.arange(B, device=DEVICE).repeat(k, 1)
    if op == "masked_join":
        return fk.masked_join, dict(inputs=inputs, mask=mask)
    if op == "gather_join":
        return fk.gather_join, dict(inputs=inputs, rows=rows)
    if op == "bn_relu":
        one = {name: values[0] for name, values in state.items()}
        return fk.bn_relu, dict(x=inputs[0], weight=one["weights"], bias=one["biases"],
                                running_mean=one["running_means"], running_var=one["running_vars"], training=True,
                                num_batches_tracked=one["num_batches_tracked"], dropout=0.1,
                                seed=torch.tensor([7], device=DEVICE))
    seeds = torch.arange(k, device=DEVICE)
    if op == "join_bn_relu":
        return fk.join_bn_relu, dict(inputs=inputs, mask=mask, **state, training=True, dropout=0.1, seeds=seeds)
    return fk.gather_join_bn_relu, dict(inputs=inputs, rows=rows, **state, training=True, dropout=0.1, seeds=seeds)


def corruptions(name: str, value):
    """Ways to make the argument ``name`` (holding ``value``) invalid, each always an error."""
    if name in ("eps",):
        return [-1.0, "1e-5", None]
    if name == "momentum":
        return ["0.1", [0.1]]
    if name == "dropout":
        return [1.5, -0.1, "0.1", True]
    if isinstance(value, torch.Tensor):
        integer = name in ("rows", "seeds", "seed", "num_batches_tracked")
        bad = [value.to(torch.float32 if integer else torch.int32), value.to("meta"), value.tolist()]
        if name not in ("seeds", "seed", "num_batches_tracked"):  # these only need their element count
            bad.append(value.unsqueeze(0))
        if value.dim() and name != "x":  # a smaller batch is a valid bn_relu input
            bad.append(value[:-1])
        if name == "rows":
            bad += [value + value.shape[1], torch.zeros_like(value)]  # out of range; a row named twice
        return bad
    if isinstance(value, list):
        bad = [value[:-1], value + value[:1], torch.stack(value) if value[0].dim() else value[0]]
        for i, item in enumerate(value):
            for corrupt in corruptions(name, item):
                bad.append(value[:i] + [corrupt] + value[i + 1:])
        return bad
    return []


CORRUPTIBLE = {
    "masked_join": ("inputs", "mask"),
    "gather_join": ("inputs", "rows"),
    "bn_relu": ("x", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "seed", "eps",
                "momentum", "dropout"),
    "join_bn_relu": ("inputs", "mask", "weights", "biases", "running_means", "running_vars", "num_batches_tracked",
                     "seeds", "eps", "momentum", "dropout"),
    "gather_join_bn_relu": ("inputs", "rows", "weights", "biases", "running_means", "running_vars",
                            "num_batches_tracked", "seeds", "eps", "momentum", "dropout"),
}


def snapshot(kwargs):
    """Clones of every tensor in the arguments (meta tensors have no values to compare)."""
    flat = []
    for value in kwargs.values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                flat.append((t, t.clone()))
    return flat


@st.composite
def corrupted_calls(draw):
    op = draw(st.sampled_from(sorted(CORRUPTIBLE)))
    k = 1 if op == "bn_relu" else draw(st.integers(1, 10))
    fn, kwargs = valid_call(op, k)
    name = draw(st.sampled_from(CORRUPTIBLE[op]))
    if name not in kwargs:
        kwargs[name] = 1e-5 if name == "eps" else 0.1
    bad = corruptions(name, kwargs[name])
    corrupt = bad[draw(st.integers(0, len(bad) - 1))]
    return op, fn, kwargs, name, corrupt


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(corrupted_calls())
def test_corrupted_arguments_raise_before_any_launch(call):
    op, fn, kwargs, name, corrupt = call
    before = snapshot(kwargs)
    with fk.use_backend("triton"), fk.count_launches() as launches:
        with pytest.raises((ValueError, TypeError)):
            fn(**{**kwargs, name: corrupt})
    assert launches[0] == 0, (op, name)
    assert all(torch.equal(t, saved) for t, saved in before), (op, name)
