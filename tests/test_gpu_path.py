"""The path every GPU user runs, checked on a GPU or on the fake GPU (FRACTAL_KERNELS_FAKE_GPU=1,
the second half of `make test`): ops registered with triton_op, torch.compile(fullgraph=True)
forward and backward against the reference, torch's own kernel-mutation analysis on every launch
the package makes, the kernels torch.library finds for each op, and direct eager launches."""

import contextlib
import itertools
import re

import helpers
import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, GPU_PATH, STAT_TOLERANCES, TOLERANCES, requires_gpu_path
from torch.utils._pytree import tree_flatten, tree_map
from torch_compat import fake_tensor_updater, written_arguments

import fractal_kernels as fk
from fractal_kernels import kernel_op, launch
from fractal_kernels.testing import fake_gpu
from fractal_kernels.audit import QUICK_SHAPES, SM_COUNT
from fractal_kernels.channel_tiling import tile_for_gpu
from fractalnet import FractalNet

pytestmark = requires_gpu_path


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles anew (the cases share code objects, so caches would hit recompile limits)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of every public op against the fp64 reference
# ----------------------------------------------------------------------------------------------

BATCH, CHANNELS = 5, 3


def make_inputs(k, dtype, channels_last, sizes=None, seed=0):
    return helpers.make_inputs(sizes or [BATCH] * k, (CHANNELS, 3, 4), dtype, channels_last, seed)


def make_params(k, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    param = torch.float64 if dtype == torch.float64 else torch.float32

    def vector(offset, spread, grad=False):
        t = torch.rand(CHANNELS, generator=gen, dtype=torch.float64) * spread + offset
        return t.to(DEVICE, param).requires_grad_(grad)

    return dict(
        weights=[vector(0.5, 1, True) for _ in range(k)], biases=[vector(-0.5, 1, True) for _ in range(k)],
        running_means=[vector(-1, 2) for _ in range(k)], running_vars=[vector(0.5, 1) for _ in range(k)],
    )


def make_mask(k, seed=2):
    mask = torch.rand(k, BATCH, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[:, 0] = False  # a sample without a survivor
    mask[:, 1] = True
    return mask.to(DEVICE)


def make_rows(sizes, seed=3):
    return helpers.make_rows(sizes, BATCH, seed)


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
KS = [1, 2, 3, 4, 9]
#: The BatchNorm joins, compiled: one input, the most one launch tiles at full size (4), and two
#: groups of inputs (9). Two and three inputs are the four-input path with fewer slots filled,
#: which the eager and interpreter tests cover; dropping them keeps `make test` in its time.
BN_KS = [1, 4, 9]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPE_IDS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masked", [False, True], ids=["mean", "mask"])
@pytest.mark.parametrize("k", KS)
def test_compiled_masked_join(k, masked, dtype, channels_last):
    args = dict(inputs=make_inputs(k, dtype, channels_last), mask=make_mask(k) if masked else None)
    check_compiled(fk.masked_join, args, dtype, scale=1.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPE_IDS, ids=DTYPE_IDS.get)
def test_compiled_bn_relu(dtype, channels_last, training):
    (x,) = make_inputs(1, dtype, channels_last)
    params = make_params(1, dtype)
    args = dict(x=x, weight=params["weights"][0], bias=params["biases"][0], running_mean=params["running_means"][0],
                running_var=params["running_vars"][0], training=training)
    check_compiled(fk.bn_relu, args, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPE_IDS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masked", [False, True], ids=["mean", "mask"])
@pytest.mark.parametrize("k", BN_KS)
def test_compiled_join_bn_relu(k, masked, dtype, channels_last, training):
    args = dict(inputs=make_inputs(k, dtype, channels_last), mask=make_mask(k) if masked else None,
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
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPE_IDS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", KS)
def test_compiled_gather_join(k, dtype, channels_last):
    sizes = gather_sizes(k)
    args = dict(inputs=make_inputs(k, dtype, channels_last, sizes), rows=make_rows(sizes))
    check_compiled(fk.gather_join, args, dtype, scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPE_IDS, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", BN_KS)
def test_compiled_gather_join_bn_relu(k, dtype, channels_last, training):
    sizes = gather_sizes(k)
    args = dict(inputs=make_inputs(k, dtype, channels_last, sizes), rows=make_rows(sizes), **make_params(k, dtype),
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
@pytest.mark.parametrize("seed", [1, 2])  # a local batch, a global batch of column 3
def test_compiled_training_step_drawn_per_batch(seed):
    """Drawn per batch, a global batch runs its column alone in eager mode; compiled in one graph,
    the masks drop the other columns instead: the same output and the same gradients (zeros
    where eager has none)."""
    compiled_and_eager_steps(dict(widths=(4, 8), columns=3, dropout=(0.0, 0.0), drop_path_per="batch"), seed)


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
    compiled (aot_eager: what the fake GPU can run), and the structures its steps drew."""
    import functools

    from fractalnet import training

    # Two epochs stopped after one: no anytime table at the end, only the epoch and its test.
    config = training.TrainConfig(dataset="digits", image_size=8, epochs=2, batch_size=180, columns=3, widths=(4, 8),
                                  dropout=(0.1, 0.2), compile=compile, reestimate_bn=False, weight_decay=1e-3,
                                  stop_after=1)
    dataset, config = training.load_dataset(config)
    torch.manual_seed(0)
    model = training.build_model(config, dataset, torch.device(DEVICE))
    structures = []
    draw = FractalNet.draw_structure
    with monkeypatch.context() as patch, fk.use_backend("triton"):
        patch.setattr(FractalNet, "draw_structure",
                      lambda self, *a, **k: structures.append(draw(self, *a, **k)) or structures[-1])
        patch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        training.fit(model, dataset, config, torch.device(DEVICE), verbose=False)
    return model, structures


@pytest.mark.slow
def test_compiled_training_loop_trains_what_eager_trains(monkeypatch):
    """fit compiled (fractalnet train --compile) against eager: the loop draws each step's structure on the host
    and passes it in, so a compiled step (one graph per structure) is eager's step: a global
    batch trains its column alone and leaves every running statistic unchanged, and every
    parameter gets a gradient (zeros outside the column), so that momentum and weight decay move
    it. After an epoch of local and global batches: the same parameters and statistics."""
    eager, structures = trained_by_the_training_loop(False, monkeypatch)
    torch._dynamo.reset()
    compiled, compiled_structures = trained_by_the_training_loop(True, monkeypatch)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled_structures == structures and "local" in structures and len(set(structures)) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("per", ["batch", "sample"])
def test_training_steps_compile_once_per_structure(per):
    """Twenty training steps of the default recipe as the loop runs them (its drop-path
    arguments, SGD with momentum), compiled with fullgraph: one graph per structure drawn (per
    sample, one), and no recompilation after."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fractalnet import training

    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.0, 0.1), drop_path_per=per).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training.give_every_parameter_a_gradient(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    arguments = training.drop_path_arguments(model, {"drop_path": torch.Generator().manual_seed(4)})
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    structures = []
    with fk.use_backend("triton"):
        for _ in range(20):
            kwargs = arguments()
            structures.append(kwargs.get("structure"))
            optimizer.zero_grad(set_to_none=False)
            compiled(x, **kwargs).square().mean().backward()
            optimizer.step()
    assert counter.frame_count == len(set(structures)), structures
    assert len(set(structures)) >= 3 if per == "batch" else structures == [None] * 20, structures


# ----------------------------------------------------------------------------------------------
# What a CUDA graph of a training step depends on (the fake GPU cannot replay one)
# ----------------------------------------------------------------------------------------------


def launch_sequence(step) -> list[tuple]:
    """The Triton launches of ``step()``: each kernel, its grid and every non-tensor argument (a
    graph replays them as captured), tensors only by dtype."""
    with launch.record_launches(run=True) as records:
        step()

    def value(a):
        return ("tensor", a.dtype) if isinstance(a, torch.Tensor) else a

    return [(r.kernel.fn.__name__, tuple(r.grid), tuple(map(value, r.args)), tuple(sorted(r.kwargs.items())))
            for r in records]


class RandomDraws(torch.utils._python_dispatch.TorchDispatchMode):
    """The random ops run inside the block, with the generator each was given (None: the
    default generator of its device, which a CUDA graph registers)."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.draws.append((func.__name__, kwargs.get("generator")))
        return func(*args, **kwargs)


def small_training_step(per: str):
    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.1, 0.2), drop_path_per=per).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    generator = torch.Generator().manual_seed(2)

    def step():
        optimizer.zero_grad(set_to_none=False)
        with fk.use_backend("triton"):
            model(x, generator=generator if per == "batch" else None).square().mean().backward()
        optimizer.step()

    return model, step


@pytest.mark.slow
def test_per_sample_step_launches_the_same_kernels_and_draws_on_the_device():
    """Drawn per sample, every step is one graph: the same launches with the same non-tensor
    arguments step after step, and every random number (drop-path masks, dropout seeds) from
    the device's default generator, inside the step (that it reads nothing back is
    test_model.py's test_training_step_reads_nothing_back_from_the_device, on meta tensors)."""
    model, step = small_training_step("sample")
    step()  # the first step creates the gradients and the momentum buffers
    sequences = [launch_sequence(step) for _ in range(3)]
    assert sequences[0] and sequences[0] == sequences[1] == sequences[2]
    with RandomDraws() as random:
        step()
    assert random.draws and all(generator is None for _, generator in random.draws)


@pytest.mark.slow
def test_per_batch_steps_of_one_structure_launch_the_same_kernels():
    """Drawn per batch, a step's launches depend only on its structure (local, or the global
    column): one graph per structure serves every step of it."""
    model, step = small_training_step("batch")
    step()
    by_structure = {}
    for _ in range(12):
        sequence = launch_sequence(step)
        by_structure.setdefault(model.last_drop_path.batch_column, []).append(sequence)
    assert None in by_structure and len(by_structure) >= 3  # local batches and two or more columns
    for structure, sequences in by_structure.items():
        assert all(s == sequences[0] for s in sequences), structure
    assert len({tuple(map(str, s[0])) for s in by_structure.values()}) == len(by_structure)


# ----------------------------------------------------------------------------------------------
# torch's kernel-mutation analysis on every launch the package makes
# ----------------------------------------------------------------------------------------------

#: The parameters each kernel writes (a name, or a slot prefix followed by the slot's digit).
WRITTEN = {
    "join_forward_kernel": ("out_ptr",),
    "join_backward_kernel": ("dx",),
    "bn_stats_kernel": ("partials_ptr",),
    "bn_combine_kernel": ("stats_ptr", "running_mean", "running_var", "num_batches_tracked"),
    "bn_apply_kernel": ("out_ptr",),
    "bn_backward_sums_kernel": ("sums_ptr",),
    "bn_backward_dx_kernel": ("dx", "param_grads_ptr"),
    "bn_forward_kernel": ("out_ptr", "running_mean", "running_var", "num_batches_tracked", "stats_ptr"),
    "bn_backward_kernel": ("dx", "param_grads_ptr"),
}


def recorded_launches():
    """One launch of every distinct configuration (kernel, constexprs, absent slots) the
    compile audit's cases make."""
    from fractal_kernels.audit_cases import AUDIT_CASES

    distinct = {}
    kinds = [(shape, dtype, channels_last) for shape in QUICK_SHAPES for dtype in (torch.float32, torch.bfloat16)
             for channels_last in (False, True)]
    for cases, (shape, dtype, channels_last) in itertools.product(AUDIT_CASES, kinds):
        for label, thunk in cases(shape, dtype, channels_last, False):
            # Tiled as the audit tiles them: the large shapes take the split kernels.
            with tile_for_gpu(SM_COUNT[90]), launch.record_launches() as records:
                thunk()
            for record in records:
                kwargs = launch_kwargs(record)
                constexprs = tuple((n, v) for n, v in kwargs.items() if n.isupper())
                absent = tuple(n for n, v in kwargs.items() if v is None)
                distinct.setdefault((record.kernel.fn.__name__, constexprs, absent), (label, record, kwargs))
    return list(distinct.values())


def launch_kwargs(record) -> dict:
    options = {"num_warps", "num_stages", "maxnreg"}
    kwargs = dict(zip(record.kernel.arg_names, record.args))
    kwargs.update((k, v) for k, v in record.kwargs.items() if k not in options)
    return kwargs


def written_by_contract(kernel: str, kwargs: dict) -> set:
    return {
        name for name, value in kwargs.items()
        if isinstance(value, torch.Tensor) and any(re.fullmatch(re.escape(p) + r"\d?", name) for p in WRITTEN[kernel])
    }


LAUNCHES = recorded_launches() if GPU_PATH else []


def test_every_kernel_is_analysed():
    assert {record.kernel.fn.__name__ for _, record, _ in LAUNCHES} == set(WRITTEN)


@pytest.mark.parametrize("label,record,kwargs", LAUNCHES,
                         ids=[f"{r.kernel.fn.__name__}-{i}" for i, (_, r, _) in enumerate(LAUNCHES)])
def test_mutation_analysis_of_each_launch(label, record, kwargs):
    name = record.kernel.fn.__name__
    written = written_arguments(record.kernel, kwargs)
    # Exactly what the kernel writes: a read-only argument reported as written would be cloned
    # and copied back around every launch under torch.compile.
    assert written == written_by_contract(name, kwargs), label
    tensors = {n: v for n, v in kwargs.items() if isinstance(v, torch.Tensor)}
    for arg in written:
        t = tensors[arg]
        # Whole tensors: functionalization clones a written argument, so a written view would
        # lose whatever the kernel writes beyond it.
        assert t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes(), (label, arg)
        others = [n for n, v in tensors.items()
                  if n != arg and v.numel() and v.untyped_storage()._cdata == t.untyped_storage()._cdata]
        assert not others, f"{label}: {arg} shares its memory with {others}"


# ----------------------------------------------------------------------------------------------
# Direct launches: the variant JITFunction.run would pick, with the arguments it would pass
# ----------------------------------------------------------------------------------------------

requires_fake_gpu = pytest.mark.skipif(not fake_gpu.installed(),
                                       reason="reads the launcher calls of the fake GPU's compiled kernels")


def materialised(value, misaligned: bool):
    """A tensor of value's shape, strides and dtype with data (fake-GPU memory), 16-byte aligned
    or one element off; other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    offset = 1 if misaligned else 0
    size = offset + sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1 if value.numel() else offset
    storage = torch.empty(max(size, 1), dtype=value.dtype, device=DEVICE)
    return storage.as_strided(value.shape, value.stride(), offset)


def launcher_calls(kernel, grid, args, kwargs, monkeypatch, direct=None) -> list:
    """(compiled variant, launcher arguments) of a direct launch after its variant is compiled,
    and of JITFunction.run's own launch of the same arguments. ``direct``: the Kernel to
    launch through (a new one when None), which may hold the variants of other arguments."""
    calls = []
    monkeypatch.setattr(fake_gpu.FakeCompiledKernel, "run", lambda self, *call: calls.append((self, call)))
    direct = direct or launch.Kernel(kernel)
    before = len(direct.compiled_variants())
    # Past the gate (whose tests are below), on device 0: the sweep's first argument may be None.
    direct.launch_direct(0, grid, args, dict(kwargs))  # compiles (or finds) the variant through run
    direct.launch_direct(0, grid, args, dict(kwargs))
    # At most one variant more, and the second launch found a variant: it was direct.
    assert len(direct.compiled_variants()) - before in (0, 1)
    kernel.run(*args, grid=grid, warmup=False, **kwargs)
    assert len(calls) == 3
    return calls[1:]


def same_arguments(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b))


@requires_fake_gpu
@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("label,record,kwargs", LAUNCHES,
                         ids=[f"{r.kernel.fn.__name__}-{i}" for i, (_, r, _) in enumerate(LAUNCHES)])
def test_direct_launch_is_what_jit_run_launches(label, record, kwargs, misaligned, monkeypatch):
    """For every launch configuration the package makes, aligned and not: the direct path
    launches the variant Triton's binder and cache key pick (the same compiled kernel), with
    the same grid, stream and arguments."""
    args = tuple(materialised(a, misaligned) for a in record.args)
    (direct, direct_call), (run, run_call) = launcher_calls(record.kernel, record.grid, args, record.kwargs,
                                                            monkeypatch)
    assert direct is run, label
    assert same_arguments(direct_call[:4], run_call[:4]) and same_arguments(direct_call[9:], run_call[9:]), label


if not launch.INTERPRETING:
    @triton.jit(do_not_specialize=["m", "q_ptr"])
    def specialised_kernel(x_ptr, q_ptr, n, m, scale, flag, BLOCK: tl.constexpr):
        pass


@requires_fake_gpu
def test_direct_launch_keys_are_at_least_as_fine_as_triton_specialisation(monkeypatch):
    """Over pointers of several dtypes, aligned or not, and integers Triton specialises (1,
    multiples of 16, widths) or not (do_not_specialize), every direct launch reuses the variant
    JITFunction.run picks for the same arguments: the guard key never merges two of Triton's."""
    base = torch.empty(64, device=DEVICE)
    pointers = [base[:8], base[1:9], base.to(torch.float16)[:8], base.to(torch.float16)[1:9], None]
    ints = [1, 0, 16, 17, -3, 2**31, 2**33 + 16, 2**63]
    seen = set()
    # One Kernel over the whole sweep: each launch must pass by the guards of every variant
    # compiled before it and find its own.
    shared = launch.Kernel(specialised_kernel)
    for x, q, n, m, flag in itertools.product(pointers, pointers[:2] + [None], ints, ints[:3] + [2**40], [True, False]):
        args = (x, q, n, m, 0.5, flag)
        (direct, direct_call), (run, run_call) = launcher_calls(specialised_kernel, (1,), args, {"BLOCK": 16},
                                                                monkeypatch, shared)
        assert direct is run, args
        assert same_arguments(direct_call[9:], run_call[9:]), args
        seen.add(run.key)
    # The sweep reaches every class: x 5 (two dtypes, aligned or not, None), q 2, n 5 (1, i32
    # divisible by 16 or not, i64, u64), m 2 (widths only).
    assert len(seen) == 5 * 2 * 5 * 2


def counted_runs(kernel, monkeypatch) -> list:
    """The launches a Kernel hands to JITFunction.run (appended to the list returned)."""
    runs = []
    run = kernel.run

    def counted(*args, **kwargs):
        runs.append(args)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counted)
    return runs


@requires_fake_gpu
def test_kernel_hands_to_run_what_it_does_not_launch_itself(monkeypatch):
    """A variant's first launch, recording, a launch hook, another current device and an fp16
    output (another variant) all go through JITFunction.run; launches of a compiled variant do
    not, and each launch is counted once."""
    _, record, _ = LAUNCHES[0]
    args = tuple(materialised(a, False) for a in record.args)
    monkeypatch.setattr(fake_gpu.FakeCompiledKernel, "run", lambda self, *call: None)
    runs = counted_runs(record.kernel, monkeypatch)
    kernel = launch.Kernel(record.kernel)
    with launch.count_launches() as launches:
        kernel[record.grid](*args, **record.kwargs)
        kernel[record.grid](*args, **record.kwargs)
    assert launches[0] == 2 and len(runs) == 1
    with launch.record_launches() as records:
        kernel[record.grid](*args, **record.kwargs)
    assert len(records) == 1 and len(runs) == 1  # recorded, not run
    with launch.record_launches(run=True) as records:
        kernel[record.grid](*args, **record.kwargs)
    assert len(records) == 1 and len(runs) == 1  # recorded and launched directly
    with monkeypatch.context() as hooked:
        hooked.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
        kernel[record.grid](*args, **record.kwargs)
    assert len(runs) == 2
    # Variants belong to a device: another current device finds none of this one's.
    with monkeypatch.context() as other_device:
        other_device.setattr(triton.runtime.driver.active, "get_current_device", lambda: 1)
        kernel[record.grid](*args, **record.kwargs)
        kernel[record.grid](*args, **record.kwargs)
    assert len(runs) == 3
    kernel[record.grid](args[0].half(), *args[1:], **record.kwargs)
    assert len(runs) == 4


@requires_fake_gpu
def test_a_triton_that_launches_otherwise_takes_its_own_launch_path(monkeypatch):
    """Where JITFunction.run no longer calls its launcher as the direct launches do (another
    Triton), the package warns and launches every kernel through run: the same compiled variant
    with the same arguments as the direct launch, run after run."""
    import inspect

    monkeypatch.setattr(inspect, "getsource", lambda obj: "def run(self, *args, **kwargs): launch_somehow(args)")
    with pytest.warns(UserWarning, match="launches kernels differently"):
        assert not launch._direct_path_supported()
    _, record, _ = LAUNCHES[0]
    args = tuple(materialised(a, False) for a in record.args)
    calls = []
    monkeypatch.setattr(fake_gpu.FakeCompiledKernel, "run", lambda self, *call: calls.append((self, call)))
    direct = launch.Kernel(record.kernel)
    direct.launch(record.grid, args, dict(record.kwargs))
    direct.launch(record.grid, args, dict(record.kwargs))  # direct
    monkeypatch.setattr(launch, "DIRECT", False)
    runs = counted_runs(record.kernel, monkeypatch)
    fallback = launch.Kernel(record.kernel)
    fallback.launch(record.grid, args, dict(record.kwargs))
    fallback.launch(record.grid, args, dict(record.kwargs))
    assert len(runs) == 2 and not fallback.compiled_variants()
    (direct_variant, direct_call), (run_variant, run_call) = calls[1], calls[3]
    assert direct_variant is run_variant
    assert same_arguments(direct_call[:4], run_call[:4]) and same_arguments(direct_call[9:], run_call[9:])


# ----------------------------------------------------------------------------------------------
# The kernels torch.library finds for each op, and eager launches
# ----------------------------------------------------------------------------------------------

OP_KERNELS = {
    "fractal_kernels::join_forward": {"join_forward_kernel"},
    "fractal_kernels::join_backward": {"join_backward_kernel"},
    "fractal_kernels::bn_stats": {"bn_stats_kernel", "bn_combine_kernel"},
    "fractal_kernels::bn_apply": {"bn_apply_kernel"},
    "fractal_kernels::bn_backward_sums": {"bn_backward_sums_kernel"},
    "fractal_kernels::bn_backward_dx": {"bn_backward_dx_kernel"},
    "fractal_kernels::bn_forward": {"bn_forward_kernel"},
    "fractal_kernels::bn_backward": {"bn_backward_kernel"},
}


@pytest.mark.parametrize("op", OP_KERNELS)
def test_torch_library_finds_the_kernels_of_each_op(op):
    """AOT autograd's compile cache keys on the source of these kernels: an op whose kernels are
    not found could be served stale code from the cache after a kernel is edited."""
    from torch._library.triton import get_triton_kernels_for_op

    found = {kernel.fn.__name__ for kernel in get_triton_kernels_for_op(op)}
    assert found == OP_KERNELS[op]


def side_table_size() -> int:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return len(kernel_side_table.id_to_kernel) + len(kernel_side_table.constant_args)


def test_eager_apply_refuses_a_function_with_setup_context():
    """The C-level apply skips Function.apply's prologue, which a setup_context needs."""

    class WithSetupContext(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    with pytest.raises(TypeError, match="setup_context"):
        kernel_op.eager_apply(WithSetupContext)
    x = torch.randn(3, requires_grad=True)
    assert kernel_op.eager_apply(ClonedFunction)(x).grad_fn is not None


class ClonedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.slow
def test_eager_launches_are_direct():
    """In eager mode a launch goes straight to the kernel: no higher-order-op dispatch, and
    nothing added to torch's kernel side table, which would otherwise grow without bound."""
    x, mask = make_inputs(3, torch.float32, False), make_mask(3)
    params = make_params(3, torch.float32)
    with fk.use_backend("triton"):
        fk.join_bn_relu(x, mask, **params, training=True).sum().backward()
        before = side_table_size()
        for _ in range(200):
            fk.masked_join([t.detach() for t in x], mask)
        with launch.count_launches() as launches:
            out = fk.join_bn_relu(x, mask, **params, training=True)
            out.sum().backward()
    assert launches[0] == 2  # single-pass forward and backward
    assert side_table_size() == before


def test_direct_launches_compare_no_tensor_with_none(monkeypatch):
    """The guards of the direct launches test empty slots by identity: ``tensor == None`` (in a
    tuple comparison too) raises and catches a C++ exception inside torch, about 10 us a launch.
    A global batch first (no running statistics: None slots), then a local one (tensors there):
    each launch of the local step passes by the global step's guards first."""
    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), dropout=(0.0, 0.1), columns=4).to(DEVICE)
    x = torch.randn(6, 3, 8, 8, device=DEVICE)

    def steps():
        for structure in (2, "local"):
            model(x, structure=structure).sum().backward()

    with fk.use_backend("triton"), fake_gpu.stubbed_launches() if fake_gpu.installed() else contextlib.nullcontext():
        steps()  # compiles each variant: the guards exist from here on
        compared = []
        equal = torch.Tensor.__eq__

        def recording_eq(self, other):
            compared.append(other is None)
            return equal(self, other)

        monkeypatch.setattr(torch.Tensor, "__eq__", recording_eq)
        with launch.count_launches() as launches:
            steps()
    assert launches[0] > 0 and not any(compared), f"{sum(compared)} comparisons of a tensor with None"


@pytest.mark.parametrize("op", ["bn_relu", "join_bn_relu"])
def test_nan_input_gives_nan_output(op):
    """F.relu keeps NaN; a plain max would turn it into 0 on the GPU (the interpreter keeps it)."""
    xs = make_inputs(2, torch.float32, False)
    x = [t.detach().clone() for t in xs]
    for t in x:
        t[1, 0, 0, 0] = float("nan")
    params = make_params(2, torch.float32)
    for backend in ("reference", "triton"):
        with fk.use_backend(backend), torch.no_grad():
            if op == "bn_relu":
                out = fk.bn_relu(x[0], params["weights"][0], params["biases"][0], params["running_means"][0],
                                 params["running_vars"][0], training=False)
            else:
                out = fk.join_bn_relu(x, None, **params, training=False)
        assert torch.isnan(out[1, 0, 0, 0]), backend
        assert torch.isfinite(out[0]).all(), backend


@pytest.mark.slow
def test_inductor_reinplacing_leaves_no_copy_around_kernels():
    """Inductor's reinplace pass, run on the AOT graphs of a training step, removes every clone
    that functionalization put around the kernels: no kernel argument is cloned, and no clone or
    copy consumes or feeds a kernel node."""
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._higher_order_ops.triton_kernel_wrap import (
        triton_kernel_wrapper_functional,
        triton_kernel_wrapper_mutation,
    )
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._guards import detect_fake_mode
    from torch._inductor.virtualized import V

    graphs = []

    def reinplaced(gm, example_inputs):
        with V.set_fake_mode(detect_fake_mode(example_inputs)):
            reinplace_inplaceable_ops(fake_tensor_updater(gm), gm.graph)
        gm.recompile()
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=reinplaced, bw_compiler=reinplaced,
                                     keep_inference_input_mutations=True)

    torch.manual_seed(0)
    model = FractalNet(10, widths=(4, 8), columns=3, dropout=(0.0, 0.0)).to(DEVICE)
    with fk.use_backend("triton"):
        torch.compile(model, fullgraph=True, backend=backend)(torch.randn(6, 3, 8, 8, device=DEVICE)).sum().backward()
    assert len(graphs) == 2  # forward and backward
    kernel_ops = (triton_kernel_wrapper_functional, triton_kernel_wrapper_mutation)
    copy_ops = {"aten.clone.default", "aten.copy_.default", "aten.copy.default"}
    for gm in graphs:
        kernels = {n for n in gm.graph.nodes if n.target in kernel_ops}
        assert kernels
        cloned = [n.name for n in kernels
                  if n.target is triton_kernel_wrapper_functional and n.kwargs["tensors_to_clone"]]
        assert not cloned
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target) in copy_ops:
                assert not (set(node.all_input_nodes) | set(node.users)) & kernels, node.format_node()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_run_on_the_device_of_their_tensors():
    """Triton launches on the current device: with tensors on cuda:1 while cuda:0 is current,
    an unguarded launch reads an illegal address."""
    torch.cuda.set_device(0)
    xs = [t.to("cuda:1") for t in make_inputs(2, torch.float32, False)]
    params = {name: [t.to("cuda:1") for t in ts] for name, ts in make_params(2, torch.float32).items()}
    with fk.use_backend("triton"):
        joined = fk.masked_join(xs, None)
        normalised = fk.join_bn_relu(xs, None, **params, training=True)
        normalised.sum().backward()
    torch.testing.assert_close(joined, (xs[0] + xs[1]) / 2)
    with fk.use_backend("reference"):
        expected = fk.join_bn_relu([x.detach() for x in xs], None, **make_params(2, torch.float32), training=True)
    torch.testing.assert_close(normalised, expected.to("cuda:1"), atol=1e-5, rtol=1e-5)
