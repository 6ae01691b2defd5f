"""The Triton launchers' grids stay within CUDA's per-axis limits for any batch (computed, nothing launched).

CUDA caps grid axes 1 and 2 at 65,535 blocks; a batch on one of them fails to launch past that (ViT-B
attention with batch x heads on axis 1: batch >= 5,462). The launchers fold batch (and heads) into axis 0.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tome_kernels import reference  # noqa: E402
from tome_kernels.triton import _attention, _match, _merge  # noqa: E402
from tome_kernels.triton._common import GRID_LIMITS, SHARED_MEMORY_PER_BLOCK, checked_grid  # noqa: E402

BATCHES = [1, 2, 64, 5_462, 65_535, 65_536, 100_000, 10**6]
# (heads, N, head dim): ViT-B/16 at 224 and 384, ViT-L, DETR's encoder, a head dim that pads to 128.
ATTENTION_SHAPES = [(12, 197, 64), (12, 577, 64), (16, 197, 64), (8, 1100, 32), (4, 50, 96)]
# (N, C, pos channels, protected, r)
TOKEN_SHAPES = [(197, 768, 0, 1, 16), (1100, 256, 256, 0, 275), (577, 1024, 0, 1, 45), (5, 8, 0, 0, 2)]


def _within_limits(grid):
    assert len(grid) <= 3
    for size, limit in zip(grid, GRID_LIMITS):
        assert 1 <= size <= limit, grid


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shared_memory", [None, *sorted(set(SHARED_MEMORY_PER_BLOCK.values()))])
def test_attention_grids(batch, dtype, shared_memory):
    for heads, seq, head_dim in ATTENTION_SHAPES:
        block_d = _attention._block_d(head_dim)
        fwd = _attention.fwd_shape(batch, heads, seq, dtype, block_d, shared_memory)
        _within_limits(fwd["grid"])
        assert fwd["grid"] == (fwd["q_blocks"] * batch * heads,)
        assert fwd["q_blocks"] * fwd["tile"].block_m >= seq
        bwd = _attention.bwd_shape(batch, heads, seq, seq, dtype, block_d, shared_memory)
        _within_limits(bwd["grid"])
        _within_limits(bwd["preprocess_grid"])
        assert bwd["grid"] == (bwd["blocks"] * batch * heads,)
        assert bwd["k_blocks"] * bwd["tile"].block_n >= seq


@pytest.mark.parametrize("batch", BATCHES)
def test_match_grids(batch):
    for num_tokens, _, _, protected, _ in TOKEN_SHAPES:
        n_a, n_b = reference.num_a(num_tokens, protected), reference.num_b(num_tokens, protected)
        shape = _match.launch_shape(batch, n_a, n_b)
        _within_limits(shape["fwd_grid"])
        _within_limits(shape["rank_grid"])
        assert shape["fwd_grid"] == (shape["a_blocks"] * shape["splits"] * batch,)
        assert shape["splits"] * shape["b_per_split"] >= n_b > (shape["splits"] - 1) * shape["b_per_split"]


@pytest.mark.parametrize("batch", BATCHES)
def test_window_match_grids(batch):
    for num_tokens, _, _, _, _ in TOKEN_SHAPES:
        n_a = reference.num_a(num_tokens, 0)
        shape = _match.window_launch_shape(batch, n_a)
        _within_limits(shape["fwd_grid"])
        _within_limits(shape["rank_grid"])
        assert shape["fwd_grid"] == (shape["a_blocks"] * batch,)
        assert shape["a_blocks"] * _match._WINDOW_BLOCK_A >= n_a


def test_match_spreads_detr_rows():
    """DETR's encoder rows (N = 1100, batch 2) fill a GPU: B splits for the forward, 16-token rank blocks."""
    shape = _match.launch_shape(2, 550, 550)
    assert shape["splits"] > 1 and shape["fwd_grid"][0] >= 64
    assert shape["rank_grid"][0] >= 64
    assert _match.launch_shape(64, 98, 98)["splits"] == 1  # ViT-B batch 64: already enough programs


@pytest.mark.parametrize("batch", BATCHES)
def test_merge_grids(batch):
    for num_tokens, channels, pos_channels, _, r in TOKEN_SHAPES:
        gather = _merge.gather_shape(batch, num_tokens - r, channels, pos_channels)
        spread = _merge.spread_shape(batch, num_tokens, channels, pos_channels)
        for shape, items in ((gather, num_tokens - r), (spread, num_tokens)):
            _within_limits(shape["grid"])
            assert shape["grid"][0] == shape["t_blocks"] * batch
            assert shape["t_blocks"] * _merge.BLOCK_T >= items


def test_checked_grid_names_the_axis():
    assert checked_grid(2**31 - 1, 65_535) == (2**31 - 1, 65_535)
    with pytest.raises(ValueError, match="axis 1"):
        checked_grid(1, 65_536)


def test_small_shared_memory_devices_get_their_tiles():
    """A device with 99 KB per block gets the small-shared-memory tile where one is listed."""
    small = min(SHARED_MEMORY_PER_BLOCK.values())
    for table, small_table in ((_attention._FWD_TILES, _attention._SMALL_SMEM_FWD_TILES),
                               (_attention._BWD_TILES, _attention._SMALL_SMEM_BWD_TILES)):
        for (size, block_d), tile in small_table.items():
            dtype = {2: torch.float16, 4: torch.float32}[size]
            assert _attention._tile(table, small_table, dtype, block_d, small) == tile
            assert _attention._tile(table, small_table, dtype, block_d, None) == table[size][block_d]
