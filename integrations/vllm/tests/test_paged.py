"""Block copies through a discovered layout: read and write invert each other exactly, for any permutation
layout a backend's cache-write op may use. Runs without vLLM (the real CPU op runs in test_connector_vllm)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvagent import paged

BS, H, D = 8, 3, 4


def nhd_write(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor, slots: torch.Tensor) -> None:
    """A plain layout: block [B, H, BS, 2D], keys in the first D columns."""
    b, t = slots // BS, slots % BS
    block[b, :, t, :D] = key
    block[b, :, t, D:] = value


def blocked_write(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor, slots: torch.Tensor) -> None:
    """A kernel-style layout: per (block, head) a K tile stored transposed, then a V tile."""
    tiles = block.view(block.shape[0], H, 2, D * BS)
    for i, slot in enumerate(slots.tolist()):
        b, t = divmod(slot, BS)
        tiles[b, :, 0, t::BS] = key[i]  # K transposed: [D, BS]
        tiles[b, :, 1, t * D : (t + 1) * D] = value[i]  # V as [BS, D]


@pytest.mark.parametrize("write", [nhd_write, blocked_write])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_kv_reads_back_bit_exact(write: paged.CacheWrite, dtype: torch.dtype) -> None:
    cache = torch.zeros(6, H, BS, 2 * D, dtype=dtype)
    tile = paged.discover_tile(cache.shape, dtype, BS, H, D, write)
    blocks = [4, 1, 3]
    k, v = torch.randn(1, H, 21, D).to(dtype), torch.randn(1, H, 21, D).to(dtype)
    paged.write_blocks(cache, tile, blocks, 0, k[:, :, :10], v[:, :, :10])
    paged.write_blocks(cache, tile, blocks, 10, k[:, :, 10:], v[:, :, 10:])  # a later chunk, mid-block
    got_k, got_v = paged.read_blocks(cache, tile, blocks, 21)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    # the same bytes the backend's own op writes for those tokens
    ref = torch.zeros_like(cache)
    slots = torch.tensor([blocks[i // BS] * BS + i % BS for i in range(21)])
    write(k[0].permute(1, 0, 2), v[0].permute(1, 0, 2), ref, slots)
    assert torch.equal(ref, cache)


def test_a_layout_that_is_not_a_permutation_is_refused() -> None:
    def lossy(key: torch.Tensor, value: torch.Tensor, block: torch.Tensor, slots: torch.Tensor) -> None:
        block[slots // BS, :, slots % BS, 0] = key[:, :, 0]  # keeps one dim of each head only

    with pytest.raises(ValueError, match="not a permutation"):
        paged.discover_tile((2, H, BS, 2 * D), torch.float32, BS, H, D, lossy)
