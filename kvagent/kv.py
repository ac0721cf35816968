"""In-memory KV cache of one document: per-layer keys and values plus the token ids they encode."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of a model's KV: ``num_layers`` pairs of ``[1, num_kv_heads, seq, head_dim]`` tensors."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class KVCache:
    """Keys and values for ``token_ids`` (1-D int64), one ``[1, H, S, D]`` tensor per layer each.

    Treated as immutable: engines copy-on-extend, so a resume never changes these tensors.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    token_ids: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("KVCache needs the same, non-zero number of key and value layers")
        n = int(self.token_ids.numel())
        for t in (*self.keys, *self.values):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != n:
                raise ValueError(
                    f"KV tensor of shape {tuple(t.shape)} does not hold {n} tokens as [1, H, S, D]"
                )

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def layout(self) -> KVLayout:
        k = self.keys[0]
        return KVLayout(num_layers=len(self.keys), num_kv_heads=int(k.shape[1]), head_dim=int(k.shape[3]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def truncate(self, n: int) -> KVCache:
        """The KV of the first ``n`` tokens (views, no copy). Valid because attention is causal."""
        if not 0 < n <= self.n_tokens:
            raise ValueError(f"cannot truncate a {self.n_tokens}-token KV to {n} tokens")
        if n == self.n_tokens:
            return self
        return KVCache(
            keys=tuple(k[:, :, :n] for k in self.keys),
            values=tuple(v[:, :, :n] for v in self.values),
            token_ids=self.token_ids[:n],
        )
