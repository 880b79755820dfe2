"""Drop-path sampling statistics."""

import pytest
import torch

from fractalnet import DropPath


def sample(batch=4000, columns=(1, 2, 3), local_drop=0.15, global_ratio=0.5, seed=0):
    return DropPath(batch, columns, local_drop, global_ratio, torch.device("cpu"), torch.Generator().manual_seed(seed))


def test_global_fraction_and_uniform_columns():
    dp = sample()
    assert abs(dp.is_global.float().mean().item() - 0.5) < 0.03
    counts = torch.bincount(dp.global_column[dp.is_global], minlength=4)[1:].float()
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.04)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_local_rate_with_one_survivor_restored(k):
    p = 0.15
    dp = sample(columns=tuple(range(1, 5)), local_drop=p)
    masks = torch.cat([dp.mask(list(range(5 - k, 5))) for _ in range(10)], dim=1)
    local = ~dp.is_global.repeat(10)
    kept = masks[:, local]
    assert kept.any(0).all(), "every local sample keeps at least one input"
    expected = (1 - p) + p**k / k  # kept outright, or restored when all k were dropped
    assert abs(kept.float().mean().item() - expected) < 0.01


def test_global_samples_follow_one_column_in_every_join():
    dp = sample(columns=(1, 2, 3, 4))
    joins = [[3, 4], [2, 3, 4], [3, 4], [1, 2, 3, 4]]
    glob = dp.is_global
    for columns in joins * 2:  # two blocks: the same column throughout
        mask = dp.mask(columns)[:, glob]
        expected = torch.tensor(columns)[:, None] == dp.global_column[glob]
        assert torch.equal(mask, expected)
        assert (mask.sum(0) <= 1).all()
    # A global sample whose column is missing from a join has no survivor there.
    assert not dp.mask([3, 4])[:, glob & (dp.global_column <= 2)].any()


def test_same_seed_same_masks():
    a, b = sample(batch=64, seed=7), sample(batch=64, seed=7)
    assert torch.equal(a.is_global, b.is_global) and torch.equal(a.global_column, b.global_column)
    assert torch.equal(a.mask([1, 2, 3]), b.mask([1, 2, 3]))
    assert not torch.equal(sample(batch=64, seed=8).mask([1, 2, 3]), a.mask([1, 2, 3]))
