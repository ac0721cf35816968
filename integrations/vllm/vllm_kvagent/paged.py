"""Moving one request's KV between kvagent's ``[1, H, S, D]`` tensors and vLLM's paged blocks.

vLLM keeps each attention layer's KV in blocks of ``block_size`` token slots. How a block is laid out
depends on the attention backend and, on the CPU, on the kernel's instruction set (the CPU kernels may
store a block's keys in a blocked or transposed order). Rather than copy a layout out of vLLM's C++ source,
:func:`discover_tile` asks the backend's own cache-write op where each (token, head, dim) element of K and V
lands in one block, once per layer shape; reading and writing are then plain gathers and scatters through
that map, exact for any layout that is a permutation (every unquantised KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: ``write(key, value, block, slots)``: the backend's op writing ``key``/``value`` ([n, H, D]) into the slots
#: ``slots`` (int64 [n]) of ``block``, a zeroed tensor shaped like the layer's cache (fewer blocks)
CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class TileMap:
    """Where K and V element (token-in-block, head, dim) sit in a flattened block: int64 ``[bs, H, D]``."""

    block_size: int
    num_heads: int
    head_dim: int
    k_index: torch.Tensor
    v_index: torch.Tensor


def discover_tile(
    shape: Sequence[int],
    dtype: torch.dtype,
    block_size: int,
    num_heads: int,
    head_dim: int,
    write: CacheWrite,
) -> TileMap:
    """Find a block's layout by writing coded values through the backend's own op (see the module docstring).

    The codes are written in base-64 digits (exact in every float dtype vLLM caches), one pass per digit.
    """
    n_el = block_size * num_heads * head_dim
    codes = torch.arange(n_el, dtype=torch.int64).view(block_size, num_heads, head_dim)
    per_block = 1
    for d in shape[1:]:
        per_block *= int(d)
    found = {0: torch.zeros(per_block, dtype=torch.int64), 1: torch.zeros(per_block, dtype=torch.int64)}
    marked: dict[int, torch.Tensor] = {}
    slots = torch.arange(block_size, dtype=torch.int64)
    base, scale = 64, 1
    while scale < n_el:
        digit = ((codes // scale) % base + 1).to(dtype)  # +1: a zero marks an element the write left alone
        zero = torch.zeros_like(digit)
        for which in (0, 1):
            block = torch.zeros((1, *shape[1:]), dtype=dtype)
            write(digit if which == 0 else zero, zero if which == 0 else digit, block, slots)
            flat = block.reshape(-1).to(torch.int64)
            marked.setdefault(which, flat > 0)
            found[which] += torch.where(flat > 0, (flat - 1) * scale, torch.zeros_like(flat))
        scale *= base
    k_index = _invert(found[0], marked[0], n_el).view(block_size, num_heads, head_dim)
    v_index = _invert(found[1], marked[1], n_el).view(block_size, num_heads, head_dim)
    return TileMap(block_size, num_heads, head_dim, k_index, v_index)


def _invert(found: torch.Tensor, marked: torch.Tensor, n_el: int) -> torch.Tensor:
    """Positions (in the flattened block) of codes 0..n_el-1, checking that each code landed exactly once."""
    positions = marked.nonzero().flatten()
    if positions.numel() != n_el:
        raise ValueError(
            f"the cache write placed {positions.numel()} of {n_el} elements: not a permutation layout"
        )
    index = torch.full((n_el,), -1, dtype=torch.int64)
    index[found[positions]] = positions
    if bool((index < 0).any()):
        raise ValueError("the cache write mapped two elements onto one slot: not a permutation layout")
    return index


def _rows_cols(
    tile: TileMap, index: torch.Tensor, block_ids: Sequence[int], start: int, end: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rows and in-block columns of tokens ``start..end`` of a request holding ``block_ids``."""
    tok = torch.arange(start, end, dtype=torch.int64)
    bs = tile.block_size
    if len(block_ids) * bs < end:
        raise ValueError(f"{len(block_ids)} blocks of {bs} slots cannot hold {end} tokens")
    rows = torch.as_tensor(list(block_ids), dtype=torch.int64)[tok // bs]  # [n]
    cols = index[tok % bs]  # [n, H, D]
    return rows.to(device)[:, None, None].expand_as(cols), cols.to(device)


def read_blocks(
    cache: torch.Tensor, tile: TileMap, block_ids: Sequence[int], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of the first ``n`` tokens held in ``block_ids``, as CPU ``[1, H, n, D]`` copies."""
    flat = cache.view(cache.shape[0], -1)
    out = []
    for index in (tile.k_index, tile.v_index):
        rows, cols = _rows_cols(tile, index, block_ids, 0, n, cache.device)
        out.append(flat[rows, cols].permute(1, 0, 2).unsqueeze(0).to("cpu", copy=True).contiguous())
    return out[0], out[1]


def write_blocks(
    cache: torch.Tensor, tile: TileMap, block_ids: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write K and V (``[1, H, n, D]``) as tokens ``start..start+n`` of a request holding ``block_ids``."""
    end = start + int(k.shape[2])
    flat = cache.view(cache.shape[0], -1)
    for index, t in ((tile.k_index, k), (tile.v_index, v)):
        rows, cols = _rows_cols(tile, index, block_ids, start, end, cache.device)
        flat[rows, cols] = t[0].permute(1, 0, 2).to(cache.device, cache.dtype)
