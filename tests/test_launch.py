"""Kernel, the one launch wrapper: direct launches of compiled variants against JITFunction.run,
its gate (recording, hooks, devices, tracing), eager launches, and the launch sequences a CUDA
graph of a training step depends on."""

import contextlib
import itertools

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE

import fractal_kernels as fk
from fractal_kernels import kernel_op, launch
from fractal_kernels.testing import fake_gpu
from fractalnet import FractalNet

from gpu_path import LAUNCHES, small_inputs, make_mask, make_params, materialised

pytestmark = [pytest.mark.fake_gpu, pytest.mark.usefixtures("fresh_dynamo")]


# ----------------------------------------------------------------------------------------------
# Direct launches: the variant JITFunction.run would pick, with the arguments it would pass
# ----------------------------------------------------------------------------------------------

requires_fake_gpu = pytest.mark.skipif(not fake_gpu.installed(),
                                       reason="reads the launcher calls of the fake GPU's compiled kernels")


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
    chain = triton.knobs.runtime.launch_exit_hook  # Triton 3.6's HookChain: a hook once it holds a call
    chain.add(hook := lambda metadata: None)
    try:
        kernel[record.grid](*args, **record.kwargs)
    finally:
        chain.remove(hook)
    kernel[record.grid](*args, **record.kwargs)  # empty again: direct
    assert len(runs) == 3
    # Variants belong to a device: another current device finds none of this one's.
    with monkeypatch.context() as other_device:
        other_device.setattr(triton.runtime.driver.active, "get_current_device", lambda: 1)
        kernel[record.grid](*args, **record.kwargs)
        kernel[record.grid](*args, **record.kwargs)
    assert len(runs) == 4
    kernel[record.grid](args[0].half(), *args[1:], **record.kwargs)
    assert len(runs) == 5


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
    direct.launch(record.grid, *args, **record.kwargs)
    direct.launch(record.grid, *args, **record.kwargs)  # direct
    monkeypatch.setattr(launch, "DIRECT", False)
    runs = counted_runs(record.kernel, monkeypatch)
    fallback = launch.Kernel(record.kernel)
    fallback.launch(record.grid, *args, **record.kwargs)
    fallback.launch(record.grid, *args, **record.kwargs)
    assert len(runs) == 2 and not fallback.compiled_variants()
    (direct_variant, direct_call), (run_variant, run_call) = calls[1], calls[3]
    assert direct_variant is run_variant
    assert same_arguments(direct_call[:4], run_call[:4]) and same_arguments(direct_call[9:], run_call[9:])


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
    x, mask = small_inputs(3, torch.float32, False), make_mask(3)
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


@pytest.mark.parametrize("op", ["bn_relu", "join_bn_relu"])
def test_nan_input_gives_nan_output(op):
    """F.relu keeps NaN; a plain max would turn it into 0 on the GPU (the interpreter keeps it)."""
    xs = small_inputs(2, torch.float32, False)
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_run_on_the_device_of_their_tensors():
    """Triton launches on the current device: with tensors on cuda:1 while cuda:0 is current,
    an unguarded launch reads an illegal address."""
    torch.cuda.set_device(0)
    xs = [t.to("cuda:1") for t in small_inputs(2, torch.float32, False)]
    params = {name: [t.to("cuda:1") for t in ts] for name, ts in make_params(2, torch.float32).items()}
    with fk.use_backend("triton"):
        joined = fk.masked_join(xs, None)
        normalised = fk.join_bn_relu(xs, None, **params, training=True)
        normalised.sum().backward()
    torch.testing.assert_close(joined, (xs[0] + xs[1]) / 2)
