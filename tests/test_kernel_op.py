"""KernelOp: one object per pass, its launcher (eager) and the torch.library op registered from it
(traced): the schema read from the launcher's signature, and the arguments converted both ways."""

import pytest
import torch
from helpers import DEVICE

from fractal_kernels import batchnorm, join
from fractal_kernels.channel_tiling import channel_tiling
from fractal_kernels.join_modes import JOIN_GATHER, JOIN_MASK, JOIN_MEAN, Join
from fractal_kernels.kernel_op import kernel_op, runs_eagerly
from fractal_kernels.testing import fake_mode

pytestmark = pytest.mark.both_sessions


def schema(op) -> str:
    return str(op.op._opoverload._schema)


def test_schema_is_the_launchers_signature():
    """The Join field by field; placeholders (plain Tensor[]) only in the mutated lists; the
    other optional lists stay Tensor?[]; no tiling; keyword-only scalars stay keyword-only."""
    forward = schema(batchnorm.bn_forward)
    assert "SymInt join_mode, Tensor? join_table, SymInt[] join_sizes" in forward
    assert "Tensor?[] weights, Tensor?[] biases, Tensor(a6!)[] running_means" in forward
    assert "Tensor(a9!) stats" in forward and "tiling" not in forward
    assert "*, float momentum, float eps, bool relu, float dropout) -> Tensor" in forward
    assert "Tensor?[] means, Tensor?[] variances" in schema(batchnorm.bn_backward)
    assert schema(join.join_backward).endswith(
        "join_backward(Tensor grad, SymInt join_mode, Tensor? join_table, SymInt[] join_sizes) -> Tensor[]")


def test_op_arguments_convert_both_ways():
    """op_args flattens the Join and fills absent entries of mutated lists with empty
    placeholders; the op's function gives the launcher back the Join and the Nones."""
    xs = [torch.randn(3, 2, device=DEVICE) for _ in range(2)]
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    running = [torch.zeros(2, device=DEVICE), None]
    args = (xs, running, [None, None], [None, None], None)
    flat = batchnorm.bn_stats.op_args(*args)
    assert flat[0] is xs and flat[1][0] is running[0] and flat[1][1].numel() == 0 and flat[4] is None
    assert batchnorm.bn_stats._launcher_args(flat)[1] == [running[0], None]
    joined = Join.of(xs, mask)
    flat = join.join_forward.op_args(xs, joined)
    assert flat[1:] == [JOIN_MASK.value, joined.table, [3, 3]]
    rebuilt = join.join_forward._launcher_args(flat)[1]
    assert isinstance(rebuilt, Join) and rebuilt.mode == JOIN_MASK.value and rebuilt.table is joined.table


def test_eager_and_traced_give_the_same_output():
    xs = [torch.randn(4, 3, 2, 2, device=DEVICE) for _ in range(3)]
    for joined in (Join.of(xs), Join.of(xs, torch.rand(3, 4, device=DEVICE) < 0.5)):
        torch.testing.assert_close(join.join_forward.eager(xs, joined), join.join_forward.traced(xs, joined))
        assert join.join_forward.on(False) is join.join_forward.eager


def test_join_values():
    xs = [torch.randn(4, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)]
    rows = torch.tensor([[0, 1, 2, 3], [-1, 0, -1, 1]], device=DEVICE)
    gathered = Join.of(xs, rows=rows)
    assert gathered.gathered and gathered.mode == JOIN_GATHER.value and gathered.sizes == [4, 2]
    assert gathered.args() == (rows, 4, 1)
    assert [s.tolist() for s in gathered.row_samples()] == [[0, 1, 2, 3], [1, 3]]
    assert Join.of(xs[:1]).args() == (None, 0, 0) and Join.of(xs[:1]).mode == JOIN_MEAN.value
    float_mask = Join.of(xs[:1], torch.tensor([[1.0, 0.0, 0.5, 0.0]], device=DEVICE))
    assert float_mask.table.dtype == torch.bool and float_mask.table.tolist() == [[True, False, True, False]]


def test_a_launcher_is_registered_as_it_is():
    """The op's function is the launcher: what torch.library calls, fake tensors included."""
    calls = []

    @kernel_op("fractal_kernels::test_scaled_copy")
    def scaled_copy(x: torch.Tensor, factor: float) -> torch.Tensor:
        calls.append(type(x))
        return x * factor

    x = torch.randn(3)
    assert scaled_copy.eager is not scaled_copy.traced and len(calls) == 0
    torch.testing.assert_close(scaled_copy.traced(x, 2.0), x * 2)
    with fake_mode():
        assert scaled_copy.traced(torch.empty(5), 2.0).shape == (5,)
    assert len(calls) == 2 and calls[1] is not torch.Tensor


def test_runs_eagerly_only_on_plain_tensors_outside_tracing():
    x = torch.randn(2)
    assert runs_eagerly(x) and runs_eagerly(torch.nn.Parameter(x))
    assert not runs_eagerly(x.to("meta"))
    with fake_mode():
        assert not runs_eagerly(torch.empty(2))


def test_a_single_pass_op_refuses_inputs_of_several_chunks_before_any_launch():
    """Called as the registered op (no tiling: torch's call), bn_forward and bn_backward check
    that their inputs take one chunk per channel block, the one-launch passes' condition."""
    x = torch.randn(1024, 2, 32, 32, device=DEVICE)
    assert channel_tiling(x).num_chunks > 1
    xs, join_ = [x], Join.of([x])
    stats = torch.empty(2, 2, device=DEVICE)
    absent = [None]
    with pytest.raises(ValueError, match="single-pass BatchNorm ops need"):
        batchnorm.bn_forward.traced(xs, join_, absent, absent, absent, absent, absent, stats, None, momentum=0.1,
                                    eps=1e-5, relu=True, dropout=0.0)
    with pytest.raises(ValueError, match="single-pass BatchNorm ops need"):
        batchnorm.bn_backward.traced(x, xs, join_, absent, absent, absent, absent, stats, None, eps=1e-5, relu=True,
                                     batch_stats=True, dropout=0.0)
