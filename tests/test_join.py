"""masked_join: the Triton kernels (interpreted on CPU) against the fp64 reference."""

import subprocess
import sys

import helpers
import pytest
import torch
from helpers import DEVICE, DTYPES, assert_close, gpu_path_env, gradcheck

import fractal_kernels as fk
from fractal_kernels.testing import saved_bytes
from fractal_kernels import reference


def join_inputs(k, shape=(6, 5, 3, 4), dtype=torch.float32, channels_last=False, seed=0):
    return helpers.make_inputs([shape[0]] * k, shape[1:], dtype, channels_last, seed, spread=False)


def make_mask(k, batch, seed=0, dtype=torch.bool):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(k, batch, generator=gen) < 0.5
    mask[:, 0] = False  # a sample with no survivor
    mask[:, 1] = True  # a sample where all survive
    return mask.to(dtype).to(DEVICE)


def triton_join(xs, mask):
    with fk.use_backend("triton"):
        return fk.masked_join(xs, mask)


def reference_grads(xs, mask, grad):
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    out = reference.masked_join(xs64, mask)
    return out, torch.autograd.grad(out, xs64, grad.double())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_reference(k, channels_last, dtype):
    xs = join_inputs(k, dtype=dtype, channels_last=channels_last)
    mask = make_mask(k, xs[0].shape[0], seed=k)
    out = triton_join(xs, mask)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, xs, grad)
    expected, expected_grads = reference_grads(xs, mask, grad)
    assert out.dtype == dtype and out.stride() == xs[0].stride()
    assert_close(out, expected, dtype)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype)
    assert torch.all(out[0] == 0), "a sample with no survivor must be 0"


@pytest.mark.parametrize("k", [1, 3])
def test_plain_mean_without_mask(k):
    xs = join_inputs(k, dtype=torch.float64)
    out = triton_join(xs, None)
    torch.testing.assert_close(out, torch.stack(xs).mean(0))


def test_float_mask_equals_bool_mask():
    xs = join_inputs(3)
    mask = make_mask(3, xs[0].shape[0])
    torch.testing.assert_close(triton_join(xs, mask.float()), triton_join(xs, mask), atol=0, rtol=0)


def test_nan_and_inf_in_dropped_inputs_never_leak():
    xs = join_inputs(3, dtype=torch.float32)
    mask = make_mask(3, xs[0].shape[0])
    poisoned = []
    for i, x in enumerate(xs):
        dropped = ~mask[i]
        p = x.detach().clone()
        p[dropped] = float("nan") if i % 2 else float("inf")
        poisoned.append(p.requires_grad_())
    out = triton_join(poisoned, mask)
    grad = torch.full_like(out, float("nan"))
    grad[1:] = 1.0  # sample 0 has no survivor: even a NaN gradient must give 0
    grads = torch.autograd.grad(out, poisoned, grad)
    expected, _ = reference_grads(xs, mask, torch.ones_like(out))
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)
    for i, g in enumerate(grads):
        assert torch.all(g[~mask[i]] == 0)
        assert torch.isfinite(g[1:]).all()


def test_reference_semantics_for_dropped_nan_and_zero_survivors():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bad = torch.full((4, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = reference.masked_join([x, bad], mask)
    out.sum().backward()
    torch.testing.assert_close(out[:2], x[:2].detach())
    assert torch.all(out[2:] == 0)
    assert torch.all(bad.grad == 0) and torch.all(x.grad[2:] == 0)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 11), (2, 3, 1, 1), (3, 2, 2, 2, 2)], ids=str)
def test_any_rank(shape):
    xs = join_inputs(3, shape=shape, dtype=torch.float64)
    mask = make_mask(3, shape[0])
    torch.testing.assert_close(triton_join(xs, mask), reference.masked_join(xs, mask))


def test_mixed_and_strided_layouts_are_copied():
    xs = join_inputs(3, dtype=torch.float64)
    xs[1] = xs[1].detach().to(memory_format=torch.channels_last).requires_grad_()
    xs[2] = xs[2].detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    mask = make_mask(3, xs[0].shape[0])
    out = triton_join(xs, mask)
    torch.testing.assert_close(out, reference.masked_join(xs, mask))
    expected_grads = torch.autograd.grad(reference.masked_join(xs, mask).sum(), xs)
    for g, e in zip(torch.autograd.grad(out.sum(), xs), expected_grads):
        torch.testing.assert_close(g, e)


def test_gradcheck_fp64():
    xs = join_inputs(3, shape=(4, 2, 3), dtype=torch.float64)
    mask = make_mask(3, 4)
    assert gradcheck(lambda *t: triton_join(list(t), mask), tuple(xs))


@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_forward_and_backward(masked):
    xs = join_inputs(2, shape=(0, 3))
    mask = torch.ones(2, 0, dtype=torch.bool, device=DEVICE) if masked else None
    with fk.count_launches() as launches:
        out = triton_join(xs, mask)
        grads = torch.autograd.grad(out.sum(), xs)
    assert out.shape == (0, 3) and [g.shape for g in grads] == [(0, 3), (0, 3)]
    assert launches[0] == 0  # nothing to compute: no kernel is launched on an empty grid


@pytest.mark.parametrize("k,launches", [(3, 1), (8, 1), (9, 2)])
def test_launch_counts(k, launches):
    xs = join_inputs(k, shape=(4, 3))
    mask = make_mask(k, 4)
    with fk.count_launches() as forward:
        out = triton_join(xs, mask)
    with fk.count_launches() as backward:
        out.sum().backward()
    assert (forward[0], backward[0]) == (launches, launches)


def test_saves_only_the_mask():
    xs = join_inputs(3, shape=(8, 4, 4, 4))
    mask = make_mask(3, 8)
    assert saved_bytes(lambda: triton_join(xs, mask)) == mask.numel() * mask.element_size()
    assert saved_bytes(lambda: triton_join(xs, None)) == 0


def test_auto_backend_runs_triton_on_cuda_and_the_reference_on_cpu():
    assert fk.get_backend() == "auto"
    for device in {"cpu", DEVICE}:
        xs = [torch.randn(2, 3, device=device) for _ in range(2)]
        with fk.count_launches() as launches:
            fk.masked_join(xs)
        assert launches[0] == (1 if device == "cuda" else 0)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="auto, triton, reference"):
        with fk.use_backend("cuda"):
            pass


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=gpu_path_env(**env))


@pytest.mark.slow
def test_environment_variable_selects_the_backend():
    result = _run_python("import fractal_kernels as fk; print(fk.get_backend())", FRACTAL_KERNELS_BACKEND="reference")
    assert result.stdout.strip() == "reference"
    result = _run_python("import fractal_kernels", FRACTAL_KERNELS_BACKEND="fast")
    assert result.returncode != 0 and "FRACTAL_KERNELS_BACKEND must be one of auto, triton, reference" in result.stderr


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU machine CPU tensors are a different case")
def test_triton_backend_on_cpu_without_interpreter_says_how_to_fix():
    code = (
        "import torch, fractal_kernels as fk\n"
        "with fk.use_backend('triton'):\n"
        "    fk.masked_join([torch.ones(2, 2)])\n"
    )
    result = _run_python(code)
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


BAD_INPUTS = [
    ("empty", lambda x: ([], None), ValueError, "at least one tensor"),
    ("tensor not list", lambda x: (x, None), TypeError, "list or tuple"),
    ("not tensors", lambda x: ([x, 3.0], None), TypeError, r"inputs\[1\] must be a tensor"),
    ("shape", lambda x: ([x, x[:, :2]], None), ValueError, r"inputs\[1\] has shape"),
    ("dtype", lambda x: ([x, x.half()], None), TypeError, r"inputs\[1\] has dtype"),
    ("integer dtype", lambda x: ([x.long()], None), TypeError, "floating dtype"),
    ("device", lambda x: ([x, x.to("meta")], None), ValueError, r"inputs\[1\] is on"),
    ("scalar", lambda x: ([x[0, 0]], None), ValueError, "batch dimension"),
    ("mask shape", lambda x: ([x, x], torch.ones(2, 3, dtype=torch.bool)), ValueError, "mask must have shape"),
    ("mask dtype", lambda x: ([x, x], torch.ones(2, 4, dtype=torch.int64)), TypeError, "mask must be bool"),
    ("mask device", lambda x: ([x, x], torch.ones(2, 4, dtype=torch.bool, device="meta")), ValueError, "mask is on"),
    ("mask type", lambda x: ([x, x], [[1, 1, 1, 1]] * 2), TypeError, "mask must be a tensor"),
    ("mask weights", lambda x: ([x, x], torch.full((2, 4), 0.5, device=x.device)), ValueError,
     "mask must hold only 0 and 1"),
    ("mask value", lambda x: ([x, x], torch.tensor([[1.0, 0, 1, 2], [1, 1, 0, 1]], device=x.device)), ValueError,
     "mask must hold only 0 and 1"),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_launch(case, backend):
    _, make_args, error, message = case
    x = torch.randn(4, 3, device=DEVICE)
    inputs, mask = make_args(x)
    with fk.use_backend(backend), fk.count_launches() as launches, pytest.raises(error, match=message):
        fk.masked_join(inputs, mask)
    assert launches[0] == 0
