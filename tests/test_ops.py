"""torch.library registration: opcheck, torch.compile(fullgraph=True) without graph breaks, autocast."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE

import fractal_kernels as fk
from fractal_kernels import batchnorm, join, reference
from fractal_kernels.join_modes import Join
from fractal_kernels.testing import fake_gpu

pytestmark = pytest.mark.both_sessions

ops = torch.ops.fractal_kernels
#: Inductor, but under the fake GPU, where it cannot build user Triton kernels for CPU tensors.
COMPILE_BACKEND = "aot_eager" if fake_gpu.installed() else "inductor"


def block_inputs(dtype=torch.float64, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, 4, 4, generator=gen,
                      dtype=dtype).to(DEVICE).requires_grad_(requires_grad) for _ in range(3)]
    ws = [(torch.rand(3, generator=gen, dtype=dtype) + 0.5).to(DEVICE).requires_grad_(requires_grad) for _ in range(3)]
    bs = [torch.randn(3, generator=gen, dtype=dtype).to(DEVICE).requires_grad_(requires_grad) for _ in range(3)]
    mask = torch.tensor([[True, False, True, False], [True, True, False, False], [False, True, True, False]],
                        device=DEVICE)
    return xs, ws, bs, mask


def running(n=3, dtype=torch.float64):
    return [torch.zeros(3, dtype=dtype, device=DEVICE) for _ in range(n)], [torch.ones(3, dtype=dtype,
                                                                                       device=DEVICE) for _ in range(n)]


def test_opcheck_joins():
    """The kernel ops, as torch traces them (their autograd is JoinFunction's)."""
    xs, _, _, mask = block_inputs()
    xs = [x.detach() for x in xs]
    rows = torch.tensor([[0, -1, 1, 2], [2, 0, -1, 1], [-1, -1, 0, 1]], device=DEVICE)
    compact = [x[:4 - i] for i, x in enumerate(xs)]
    for inputs, joined in ((xs, Join.of(xs, mask)), (xs, Join.of(xs)), (compact, Join.of(compact, rows=rows))):
        torch.library.opcheck(join.join_forward.op, join.join_forward.op_args(inputs, joined))
        torch.library.opcheck(join.join_backward.op, join.join_backward.op_args(xs[0], joined))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_bn_relu(training):
    xs, ws, bs, _ = block_inputs()
    rms, rvs = running(1)
    torch.library.opcheck(ops.bn_relu.default, (xs[0], ws[0], bs[0], rms[0], rvs[0], training, 0.1, 1e-5, True))
    torch.library.opcheck(ops.bn_relu.default, (xs[0], None, None, None if training else rms[0],
                                                None if training else rvs[0], training, 0.1, 1e-5, False))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_join_bn_relu(training):
    xs, ws, bs, mask = block_inputs()
    rms, rvs = running()
    torch.library.opcheck(ops.join_bn_relu.default, (xs, mask, ws, bs, rms, rvs, training, 0.1, 1e-5))
    rms[1] = rvs[1] = None
    if training:
        torch.library.opcheck(ops.join_bn_relu.default, (xs, None, [None, ws[1], None], bs, rms, rvs, True, 0.1, 1e-5))


@pytest.mark.slow
def test_opcheck_primitives():
    """The kernel ops, as torch traces them: schemas, fakes and mutation annotations."""
    xs, ws, bs, mask = block_inputs()
    detached = [x.detach() for x in xs]
    rms, rvs = running()
    counters = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in range(3)]
    seeds = torch.tensor([1, 2, 3], device=DEVICE)
    for drop_seeds, momentum, dropout in ((None, 0.1, 0.0), (seeds, None, 0.2)):
        stats_args = batchnorm.bn_stats.op_args(detached, rms, rvs, counters, drop_seeds)
        torch.library.opcheck(batchnorm.bn_stats.op, stats_args, dict(momentum=momentum, dropout=dropout))
    stats = batchnorm.bn_stats.traced(detached, rms, rvs, counters, None, momentum=0.1, dropout=0.0)
    means, variances = list(stats[0]), list(stats[1])
    params = [[t.detach() for t in ts] for ts in (ws, bs)]
    grad = xs[0].detach()
    joined = Join.of(detached, mask)
    for drop_seeds, dropout in ((None, 0.0), (seeds, 0.2)):
        options = dict(eps=1e-5, relu=True, batch_stats=True, dropout=dropout)
        tensors = (detached, joined, *params, means, variances, drop_seeds)
        torch.library.opcheck(batchnorm.bn_apply.op, batchnorm.bn_apply.op_args(*tensors), options)
        torch.library.opcheck(batchnorm.bn_backward_sums.op, batchnorm.bn_backward_sums.op_args(grad, *tensors),
                              options)
        sums = batchnorm.bn_backward_sums.traced(grad, *tensors, **options)
        for count, param_grads in ((None, True), (1, False)):
            torch.library.opcheck(batchnorm.bn_backward_dx.op, batchnorm.bn_backward_dx.op_args(grad, *tensors, sums),
                                  dict(options, count=count, param_grads=param_grads))
        # The single-pass ops: the training forward, and the backward from its [2k, C] statistics
        # or from per-input ones (eval).
        forward_stats = detached[0].new_empty(2 * len(detached), detached[0].shape[1])
        torch.library.opcheck(batchnorm.bn_forward.op,
                              batchnorm.bn_forward.op_args(detached, joined, *params, rms, rvs, counters, forward_stats,
                                                           drop_seeds),
                              dict(momentum=0.1, eps=1e-5, relu=True, dropout=dropout))
        # The backward reads its statistics: the [2k, C] of these means and variances, not an
        # uninitialised buffer (whose NaNs would differ from run to run).
        backward = batchnorm.bn_backward
        torch.library.opcheck(backward.op, backward.op_args(grad, detached, joined, *params, means, variances,
                                                            torch.stack([*means, *variances]), drop_seeds), options)
        torch.library.opcheck(backward.op, backward.op_args(grad, detached, joined, *params, means, variances, None,
                                                            drop_seeds), dict(options, batch_stats=False))


class Block(torch.nn.Module):
    """A small fractal-style block that uses all three ops."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 3, 3, padding=1, bias=False) for _ in range(3))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(3) for _ in range(4))

    def forward(self, x, mask):
        bn = self.bns[0]
        y = fk.bn_relu(self.convs[0](x), bn.weight, bn.bias, bn.running_mean, bn.running_var, self.training)
        outs = [self.convs[1](y), self.convs[2](x)]
        joined = fk.join_bn_relu(
            outs, mask, [b.weight for b in self.bns[1:3]], [b.bias for b in self.bns[1:3]],
            [b.running_mean for b in self.bns[1:3]], [b.running_var for b in self.bns[1:3]], self.training,
        )
        return fk.masked_join([joined, y], mask)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph_forward_and_backward(backend):
    torch.manual_seed(0)
    block = Block().to(DEVICE)
    twin = Block().to(DEVICE)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    mask = torch.tensor([[True, False, True, True], [False, False, True, True]], device=DEVICE)
    with fk.use_backend(backend):
        expected = block(x, mask)
        expected.square().sum().backward()
        compiled = torch.compile(twin, fullgraph=True, backend=COMPILE_BACKEND)
        out = compiled(x, mask)
        out.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    for a, b in zip(block.buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_behaves_like_the_unfused_composition(backend, dtype):
    device = DEVICE
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    w = torch.rand(4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]], device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype), fk.use_backend(backend):
        h = conv(x)
        fused = fk.join_bn_relu([h, h * 2], mask, [w, w], [b, b], [rm, None], [rv, None], True)
        single = fk.bn_relu(h, w, b, None, None, True)
        joined = fk.masked_join([h, h], mask)
        unfused = reference.masked_join(
            [F.relu(F.batch_norm(h, rm2, rv2, w, b, True)), F.relu(F.batch_norm(h * 2, None, None, w, b, True))], mask
        )
    assert h.dtype == dtype
    assert fused.dtype == single.dtype == joined.dtype == unfused.dtype == dtype
    assert rm.dtype == torch.float32 and w.dtype == torch.float32
    # Values: each op against the unfused composition on the same low-precision conv output.
    tolerance = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fused.float(), unfused.float(), **tolerance)
    torch.testing.assert_close(single.float(), F.relu(F.batch_norm(h.float(), None, None, w, b, True)), **tolerance)
    torch.testing.assert_close(joined.float(), reference.masked_join([h.float(), h.float()], mask), **tolerance)
    torch.testing.assert_close(rm, rm2, atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(fused.float().sum(), (w, b))
    expected = torch.autograd.grad(unfused.float().sum(), (w, b))
    for grad, want in zip(grads, expected):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, want, atol=5e-2 * max(1.0, want.abs().max().item()), rtol=5e-2)
