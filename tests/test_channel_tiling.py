"""ChannelTiling: how the per-channel kernels cover [N, C, HW] tensors, the cache of tilings, and
the single-pass rule."""

import pytest
import torch

from fractal_kernels.batchnorm import single_pass
from fractal_kernels.channel_tiling import SINGLE_PASS_TILES, channel_tiling, tile_for_gpu
from fractal_kernels.launch import MAX_INPUTS, REDUCTION_REGISTERS, STREAMING_REGISTERS, cdiv


def covered(tiling) -> torch.Tensor:
    """How often the tiles of every chunk of every channel block cover each (n, c, hw): what
    tile_indices and chunk_tiles compute in the kernels, on the host."""
    counts = torch.zeros(tiling.N, tiling.C, tiling.HW, dtype=torch.int64)
    tiles = cdiv(tiling.N, tiling.BLOCK_N) * tiling.hw_blocks
    for cb in range(tiling.grid[0]):
        for chunk in range(tiling.grid[1]):
            for t in range(chunk * tiling.tiles_per_chunk, min((chunk + 1) * tiling.tiles_per_chunk, tiles)):
                nb, hb = divmod(t, tiling.hw_blocks)
                n = slice(nb * tiling.BLOCK_N, (nb + 1) * tiling.BLOCK_N)
                c = slice(cb * tiling.BLOCK_C, (cb + 1) * tiling.BLOCK_C)
                hw = slice(hb * tiling.BLOCK_HW, (hb + 1) * tiling.BLOCK_HW)
                counts[n, c, hw] += 1
    return counts


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(5, 3, 7, 7), (64, 8, 32, 32), (2, 130, 2, 2), (3, 4, 1, 1), (100, 6)])
@pytest.mark.parametrize("sm_count", [None, 132])
def test_the_tiles_cover_every_element_once(shape, channels_last, sm_count):
    x = torch.empty(shape, device="meta")
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    with tile_for_gpu(sm_count):  # None: as the interpreter tiles
        tiling = channel_tiling(x, 3)
    assert torch.equal(covered(tiling), torch.ones(tiling.N, tiling.C, tiling.HW, dtype=torch.int64))
    assert tiling.grid == (cdiv(tiling.C, tiling.BLOCK_C), tiling.num_chunks)
    assert tiling.count == tiling.N * tiling.HW
    assert tiling.meta(streaming=True)["maxnreg"] == STREAMING_REGISTERS
    assert tiling.meta(streaming=False)["maxnreg"] == REDUCTION_REGISTERS


def test_single_pass_rule():
    """One chunk per channel block, one group of inputs, local statistics and a momentum: the
    one rule the forward, the backward and the traffic model ask."""
    small = channel_tiling(torch.empty(4, 6, 3, 3, device="meta"), 2)
    with tile_for_gpu(1):
        large = channel_tiling(torch.empty(72, 2, 16, 16, device="meta"), 2)
    assert small.num_chunks == 1 and large.num_chunks > 1
    assert cdiv(72, large.BLOCK_N) * large.hw_blocks > SINGLE_PASS_TILES
    assert single_pass(small, 2) and not single_pass(large, 2)
    assert not single_pass(None, 2)  # a gather join, or sizes traced as symbols
    assert not single_pass(small, MAX_INPUTS + 1)
    assert not single_pass(small, 2, synchronised=True) and not single_pass(small, 2, cumulative=True)


def test_tilings_are_cached_by_layout_and_gpu_and_the_cache_stays_bounded(monkeypatch):
    from fractal_kernels import channel_tiling as tiling_module


    x = torch.randn(64, 8, 32, 32)
    nhwc = x.to(memory_format=torch.channels_last)
    assert channel_tiling(x) is channel_tiling(x.clone())  # one lookup for every tensor like x
    assert not channel_tiling(x).channels_last and channel_tiling(nhwc).channels_last
    with tile_for_gpu(132):
        gpu = channel_tiling(x)
        assert gpu == tiling_module._tiling(x, 1, False)  # the cached tiling is the computed one
    assert gpu != channel_tiling(x)  # the interpreter's tiles are larger
    monkeypatch.setattr(tiling_module, "_MAX_TILINGS", 3)
    monkeypatch.setattr(tiling_module, "_tilings", {})
    for n in range(2, 10):
        assert channel_tiling(torch.empty(n, 8, 4, 4, device="meta")).N == n
        assert len(tiling_module._tilings) <= 3


