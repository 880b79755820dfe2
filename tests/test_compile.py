"""torch.compile(fullgraph=True) of every public op and of FractalNet training steps, forward and
backward, against the fp64 reference, on the GPU's registration path (triton_op)."""

import dataclasses
import itertools

import helpers
import pytest
import torch
from helpers import DEVICE, STAT_TOLERANCES, TOLERANCES
from torch.utils._pytree import tree_flatten, tree_map

import fractal_kernels as fk
from fractalnet import FractalNet
from fractalnet.data import Split

from gpu_path import BATCH, CHANNELS, small_inputs, make_mask, make_params, make_rows

pytestmark = [pytest.mark.fake_gpu, pytest.mark.usefixtures("fresh_dynamo")]


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of every public op against the fp64 reference
# ----------------------------------------------------------------------------------------------


def fp64_copy(args):
    def copy(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().double().requires_grad_(t.requires_grad)
        return t

    return tree_map(copy, args)


def check_compiled(op, args: dict, dtype, scale=4.0):
    """``op(**args)`` compiled on the Triton backend against the reference op on an fp64 copy:
    the output, the gradient of every leaf, and every tensor argument afterwards (the running
    statistics the op updates, and the inputs it must leave alone)."""
    expected_args = fp64_copy(args)
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager", dynamic=False)
    with fk.use_backend("triton"):
        out = compiled(**args)
    with fk.use_backend("reference"):
        expected = op(**expected_args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    leaves = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    expected_leaves = [t for t in tree_flatten(expected_args)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype), allow_unused=True, materialize_grads=True)
    expected_grads = torch.autograd.grad(expected, expected_leaves, grad, allow_unused=True, materialize_grads=True)
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=atol * scale, rtol=rtol * scale)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        size = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.double(), e, atol=atol * scale * size, rtol=rtol * scale, msg=f"gradient {i}")
    atol, rtol = STAT_TOLERANCES[dtype]
    for a, e in zip(tree_flatten(args)[0], tree_flatten(expected_args)[0]):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a.detach().double(), e.detach(), atol=atol, rtol=rtol)


DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
TRAINING_IDS = {True: "train", False: "eval"}
LAYOUT_IDS = {False: "nchw", True: "nhwc"}
MODE_IDS = {False: "mean", True: "mask"}
#: Input counts: one, several in one launch, and two launches (a launch takes up to eight).
JOIN_K_IDS = {k: str(k) for k in (1, 2, 3, 4, 9)}
#: The BatchNorm joins' input counts: two and three are the four-input launch with fewer slots
#: filled, which the eager and interpreter tests cover.
BN_JOIN_K_IDS = {k: str(k) for k in (1, 4, 9)}


def pairwise(*factors: dict) -> list:
    """Parameters (factors: value -> id dicts) covering every pair of values of two factors at
    least once, chosen greedily from their product: each compiled case is a graph of its own
    (Dynamo, AOT autograd, a kernel-mutation analysis per launch), and what a factor changes in
    the graph (an input count's launches, the mask argument, the running-statistics updates, a
    dtype's casts, a layout's strides) does not depend on a third factor. Every combination runs
    eagerly, in the interpreter (test_join.py, test_join_bn_relu.py, test_gather.py) and on the
    fake GPU's launch path (test_launch.py)."""
    product = list(itertools.product(*factors))

    def pairs(case):
        return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(case), 2)}

    uncovered = set().union(*map(pairs, product))
    chosen = []
    while uncovered:
        best = max(product, key=lambda case: len(pairs(case) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return [pytest.param(*case, id="-".join(f[v] for f, v in zip(factors, case))) for case in chosen]


@pytest.mark.slow
@pytest.mark.parametrize("k, masked, dtype, channels_last", pairwise(JOIN_K_IDS, MODE_IDS, DTYPE_IDS, LAYOUT_IDS))
def test_compiled_masked_join(k, masked, dtype, channels_last):
    args = dict(inputs=small_inputs(k, dtype, channels_last), mask=make_mask(k) if masked else None)
    check_compiled(fk.masked_join, args, dtype, scale=1.0)


@pytest.mark.parametrize("dtype, channels_last, training", pairwise(DTYPE_IDS, LAYOUT_IDS, TRAINING_IDS))
def test_compiled_bn_relu(dtype, channels_last, training):
    (x,) = small_inputs(1, dtype, channels_last)
    params = make_params(1, dtype)
    args = dict(x=x, weight=params["weights"][0], bias=params["biases"][0], running_mean=params["running_means"][0],
                running_var=params["running_vars"][0], training=training)
    check_compiled(fk.bn_relu, args, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("k, masked, dtype, channels_last, training",
                         pairwise(BN_JOIN_K_IDS, MODE_IDS, DTYPE_IDS, LAYOUT_IDS, TRAINING_IDS))
def test_compiled_join_bn_relu(k, masked, dtype, channels_last, training):
    args = dict(inputs=small_inputs(k, dtype, channels_last), mask=make_mask(k) if masked else None,
                **make_params(k, dtype), training=training)
    check_compiled(fk.join_bn_relu, args, dtype)


def test_compiled_join_bn_relu_with_dynamic_shapes():
    """Compiled with symbolic sizes, the BatchNorm joins take the split ops (whether a tiling is
    single-pass needs numbers): at two batch sizes, the output and running statistics of torch's
    composition."""
    compiled = torch.compile(fk.join_bn_relu, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (BATCH, BATCH + 3):
        xs = helpers.make_inputs([batch] * 2, (CHANNELS, 3, 4), torch.float32, False, 0)
        params = make_params(2, torch.float32)
        expected_params = fp64_copy(params)
        with fk.use_backend("triton"):
            out = compiled(xs, None, **params, training=True)
        with fk.use_backend("reference"):
            expected = fk.join_bn_relu(fp64_copy(xs), None, **expected_params, training=True)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        for a, e in zip(params["running_means"] + params["running_vars"],
                        expected_params["running_means"] + expected_params["running_vars"]):
            torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6)


def gather_sizes(k):
    return [(BATCH - i) % (BATCH + 1) or 2 for i in range(k)]


@pytest.mark.slow
@pytest.mark.parametrize("k, dtype, channels_last", pairwise(JOIN_K_IDS, DTYPE_IDS, LAYOUT_IDS))
def test_compiled_gather_join(k, dtype, channels_last):
    sizes = gather_sizes(k)
    args = dict(inputs=small_inputs(k, dtype, channels_last, sizes), rows=make_rows(sizes))
    check_compiled(fk.gather_join, args, dtype, scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("k, dtype, channels_last, training",
                         pairwise(BN_JOIN_K_IDS, DTYPE_IDS, LAYOUT_IDS, TRAINING_IDS))
def test_compiled_gather_join_bn_relu(k, dtype, channels_last, training):
    sizes = gather_sizes(k)
    args = dict(inputs=small_inputs(k, dtype, channels_last, sizes), rows=make_rows(sizes), **make_params(k, dtype),
                training=training)
    check_compiled(fk.gather_join_bn_relu, args, dtype)


# ----------------------------------------------------------------------------------------------
# A compiled FractalNet training step against the eager reference model
# ----------------------------------------------------------------------------------------------


def compiled_and_eager_steps(config: dict, seed: int, prepare=lambda model: None, **options):
    """The fused model (``options``) compiled with fullgraph and the eager reference model, the
    same weights after ``prepare``: each runs one forward and backward from torch seed ``seed``.
    Checks that the outputs and gradients agree (zeros where eager has none) and returns both models."""
    torch.manual_seed(0)
    model = FractalNet(10, **config, fused=True, **options).to(DEVICE)
    reference = FractalNet(10, **config, fused=False).to(DEVICE)
    prepare(model)
    reference.load_state_dict(model.state_dict())
    for mine, theirs in zip(model.modules(), reference.modules()):
        theirs.train(mine.training)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with fk.use_backend("triton"):
        torch.manual_seed(seed)
        out = compiled(x)
        out.square().mean().backward()
    torch.manual_seed(seed)
    expected = reference(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        want = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(p.grad, want, atol=1e-4, rtol=1e-3, msg=name)
    return model, reference


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fused", "recompute"])
def test_compiled_training_step(variant):
    config = dict(widths=(4, 8), columns=3, dropout=(0.0, 0.0), drop_path_per="sample")
    model, reference = compiled_and_eager_steps(config, 5, recompute=variant == "recompute")
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("per", ["sample", "batch"])
def test_compiled_training_step_with_frozen_batchnorm(per):
    """A training model whose BatchNorms are frozen (eval()), compiled: they normalise by their
    running statistics and leave them unchanged, global batch or not."""

    buffers = {}

    def frozen(model):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
        helpers.freeze_batchnorm(model)
        buffers.update((k, v.clone()) for k, v in model.state_dict().items())

    config = dict(widths=(4, 8), columns=3, dropout=(0.0, 0.0), drop_path_per=per, global_ratio=1.0)
    model, _ = compiled_and_eager_steps(config, 3, prepare=frozen)
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def trained_by_the_training_loop(compile: bool, monkeypatch) -> tuple:
    """A small FractalNet (drop-path per batch, dropout on) after one epoch of fit, eager or
    compiled (aot_eager: what the fake GPU can run), the structures its steps drew, and the
    number of frames compiled."""
    import functools

    from torch._dynamo.testing import CompileCounterWithBackend

    from fractalnet import training

    # Two epochs stopped after one: no anytime table at the end, only the epoch and its test.
    config = training.TrainConfig(dataset="digits", image_size=8, epochs=2, batch_size=90, columns=3, widths=(4, 8),
                                  dropout=(0.1, 0.2), compile=compile, reestimate_bn=False, weight_decay=1e-3,
                                  stop_after=1, seed=75)
    dataset, config = training.load_dataset(config)
    # Half the images (the same eight steps, 90 images each) and a test pass of one batch.
    dataset = dataclasses.replace(dataset, train=Split(dataset.train.images[:720], dataset.train.labels[:720]),
                                  test=Split(dataset.test.images[:90], dataset.test.labels[:90]))
    torch.manual_seed(0)
    model = training.build_model(config, dataset, torch.device(DEVICE))
    structures = []
    draw = FractalNet.draw_structure
    counter = CompileCounterWithBackend("aot_eager")
    with monkeypatch.context() as patch, fk.use_backend("triton"):
        patch.setattr(FractalNet, "draw_structure",
                      lambda self, *a, **k: structures.append(draw(self, *a, **k)) or structures[-1])
        patch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
        training.fit(model, dataset, config, torch.device(DEVICE), verbose=False)
    return model, structures, counter.frame_count


@pytest.mark.slow
def test_compiled_training_loop_trains_what_eager_trains(monkeypatch):
    """fit compiled (fractalnet train --compile) against eager: the loop draws each step's structure on the host
    and passes it in, so a compiled step (one graph per structure) is eager's step: a global
    batch trains its column alone and leaves every running statistic unchanged, and every
    parameter gets a gradient (zeros outside the column), so that momentum and weight decay move
    it. After an epoch of local and global batches: the same parameters and statistics. The eight
    steps' draws (seed 75) reach each of the four structures twice: one graph each, compiled once."""
    eager, structures, _ = trained_by_the_training_loop(False, monkeypatch)
    torch._dynamo.reset()
    compiled, compiled_structures, frames = trained_by_the_training_loop(True, monkeypatch)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled_structures == structures and all(structures.count(s) == 2 for s in ("local", 1, 2, 3))
    assert frames == 4, structures


@pytest.mark.slow
def test_a_per_sample_training_step_compiles_once():
    """Training steps of the default recipe drawn per sample as the loop runs them (its drop-path
    arguments, SGD with momentum), compiled with fullgraph: one graph, which sees new draws every
    step, and no recompilation in three steps (per batch, one graph per structure:
    test_compiled_training_loop_trains_what_eager_trains)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fractalnet import training

    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.0, 0.1), drop_path_per="sample").to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training.give_every_parameter_a_gradient(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    arguments = training.drop_path_arguments(model, {"drop_path": torch.Generator().manual_seed(3)})
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with fk.use_backend("triton"):
        for _ in range(3):
            kwargs = arguments()
            assert kwargs.get("structure") is None
            optimizer.zero_grad(set_to_none=False)
            compiled(x, **kwargs).square().mean().backward()
            optimizer.step()
    assert counter.frame_count == 1
