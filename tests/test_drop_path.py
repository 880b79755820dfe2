"""Drop-path sampling statistics, drawn for the whole network at once."""

import pytest
import torch

from fractalnet import DropPath, FractalNet
from fractalnet.drop_path import chosen_column, join_rows


def sample(batch=4000, columns=(1, 2, 3), blocks=2, local_drop=0.15, global_ratio=0.5, seed=0):
    return DropPath(batch, columns, max(columns), blocks, local_drop, global_ratio, torch.device("cpu"),
                    torch.Generator().manual_seed(seed))


def join_columns(dp, row):
    return [c for c in dp.columns if row % 2 ** (dp.block_columns - c) == 0]


def test_joins_of_a_block():
    assert join_rows([1, 2, 3], 3) == [2, 4]
    assert join_rows([1, 2, 3, 4], 4) == [2, 4, 6, 8]
    assert join_rows([1, 2], 4) == [8]  # truncated to the two shallowest columns of C = 4
    assert join_rows([1], 3) == []


def test_global_fraction_and_uniform_columns():
    dp = sample()
    assert abs(dp.is_global.float().mean().item() - 0.5) < 0.03
    counts = torch.bincount(dp.global_column[dp.is_global], minlength=4)[1:].float()
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.04)


def test_global_columns_by_depth():
    """global_columns="by-depth": a global sample's column, or a global batch's, in proportion to
    its depth 2^(c-1) (drawn per sample on the device, per batch on the host alike)."""
    dp = DropPath(8000, (1, 2, 3), 3, 2, 0.15, 0.5, torch.device("cpu"), torch.Generator().manual_seed(0),
                  column_weights=[1.0, 2.0, 4.0])
    counts = torch.bincount(dp.global_column[dp.is_global], minlength=4)[1:].float()
    assert torch.allclose(counts / counts.sum(), torch.tensor([1 / 7, 2 / 7, 4 / 7]), atol=0.03)
    model = FractalNet(10, widths=(4,), columns=3, dropout=(0.0,), global_columns="by-depth")
    generator = torch.Generator().manual_seed(1)
    drawn = [model.draw_structure(generator) for _ in range(4000)]
    shares = torch.tensor([drawn.count(c) for c in (1, 2, 3)], dtype=torch.float) / (4000 - drawn.count("local"))
    assert torch.allclose(shares, torch.tensor([1 / 7, 2 / 7, 4 / 7]), atol=0.04)
    draws = torch.rand(1000, generator=generator)
    assert chosen_column(draws, 3, [1.0, 2.0, 4.0]).tolist() == [chosen_column(u, 3, [1.0, 2.0, 4.0])
                                                                 for u in draws.tolist()]
    with pytest.raises(ValueError, match="global_columns"):
        FractalNet(10, widths=(4,), columns=3, dropout=(0.0,), global_columns="deepest")


@pytest.mark.parametrize("k", [2, 3, 4])
def test_local_rate_with_one_survivor_restored(k):
    p = 0.15
    dp = sample(columns=(1, 2, 3, 4), blocks=10, local_drop=p)
    row = {2: 2, 3: 4, 4: 8}[k]  # a join of the k deepest columns
    masks = torch.cat([dp.mask(block, row) for block in range(10)], dim=1)
    assert masks.shape[0] == k
    local = ~dp.is_global.repeat(10)
    kept = masks[:, local]
    assert kept.any(0).all(), "every local sample keeps at least one input"
    expected = (1 - p) + p**k / k  # kept outright, or restored when all k were dropped
    assert abs(kept.float().mean().item() - expected) < 0.01
    # Each input is the lone survivor equally often (the restored one is uniform among them).
    alone = kept[:, kept.sum(0) == 1].float().mean(1)
    assert torch.allclose(alone / alone.sum(), torch.full((k,), 1 / k), atol=0.06)


def test_global_samples_follow_one_column_in_every_join():
    dp = sample(columns=(1, 2, 3, 4))
    glob = dp.is_global
    for block in range(2):  # the same column throughout
        for row in dp.rows:
            columns = join_columns(dp, row)
            mask = dp.mask(block, row)[:, glob]
            expected = torch.tensor(columns)[:, None] == dp.global_column[glob]
            assert torch.equal(mask, expected)
            assert (mask.sum(0) <= 1).all()
    # A global sample whose column is missing from a join has no survivor there.
    assert not dp.mask(0, 2)[:, glob & (dp.global_column <= 2)].any()


def test_same_seed_same_masks():
    a, b = sample(batch=64, seed=7), sample(batch=64, seed=7)
    assert torch.equal(a.is_global, b.is_global) and torch.equal(a.global_column, b.global_column)
    assert torch.equal(a.mask(1, 4), b.mask(1, 4))
    assert not torch.equal(sample(batch=64, seed=8).mask(1, 4), a.mask(1, 4))


def test_blocks_and_joins_draw_independently():
    dp = sample(batch=4000, blocks=2)
    local = ~dp.is_global
    a, b = dp.mask(0, 4)[:, local].float(), dp.mask(1, 4)[:, local].float()
    correlation = torch.corrcoef(torch.stack([a[0], b[0]]))[0, 1]
    assert abs(correlation) < 0.05


def test_one_draw_and_few_kernels():
    from fractal_kernels.testing import count_kernels, fake_mode

    with fake_mode():
        counts = count_kernels(lambda: sample(batch=100, columns=(1, 2, 3), blocks=5))
    assert counts["aten"] <= 25
    with pytest.raises(ValueError, match="consecutive"):
        sample(columns=(1, 3))


def test_per_batch_draws_one_mask_for_the_whole_batch():
    dps = [DropPath(64, (1, 2, 3), 3, 2, 0.15, 0.5, torch.device("cpu"), torch.Generator().manual_seed(seed),
                    per_batch=True) for seed in range(200)]
    for dp in dps:
        for block in range(2):
            for row in dp.rows:
                mask = dp.mask(block, row)
                assert torch.equal(mask, mask[:, :1].expand_as(mask))  # every sample alike
        assert dp.is_global.all() or not dp.is_global.any()
    global_batches = sum(bool(dp.is_global[0]) for dp in dps)
    assert 70 <= global_batches <= 130  # half the batches, one column for all


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_a_training_step_runs_under_fake_tensor_mode(per):
    """Memory estimators and FLOP counters trace a training step on fake tensors: the per-batch
    structure is a host draw, real under FakeTensorMode, the same as in a real step."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from fractalnet import create_model

    real = create_model("fractalnet20_cifar", 10, widths=(2,) * 5, drop_path_per=per)
    draws = []
    for seed in range(6):
        real(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
        draws.append(getattr(real.last_drop_path, "batch_column", None))
    with FakeTensorMode():
        model = create_model("fractalnet20_cifar", 10, widths=(2,) * 5, drop_path_per=per)
        x = torch.randn(2, 3, 32, 32)
        for seed, expected in enumerate(draws):
            out = model(x, generator=torch.Generator().manual_seed(seed))
            out.sum().backward()
            assert is_fake(out) and getattr(model.last_drop_path, "batch_column", None) == expected
    if per == "batch":
        assert None in draws and {1, 2, 3} & set(draws)  # local and global batches were traced


def test_copy_to_device_pins_only_real_host_tensors_in_eager_mode():
    """The pinned, asynchronous copy is for a real host tensor bound for a GPU in eager mode;
    torch.compile cannot trace pinning, and fake tensors have no memory to pin."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fractalnet.drop_path import pinned_copy

    t = torch.ones(3)
    assert pinned_copy(t, torch.device("cuda")) and not pinned_copy(t, torch.device("cpu"))
    with FakeTensorMode() as mode:
        assert not pinned_copy(mode.from_tensor(t), torch.device("cuda"))
    decisions = []

    @torch.compile(fullgraph=True, backend="eager")
    def traced(x):
        decisions.append(pinned_copy(x, torch.device("cuda")))
        return x + 1

    traced(t)
    assert decisions == [False]
