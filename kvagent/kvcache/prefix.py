"""The token-level prefix match every tier and the batching engine use."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["shared_prefix"]


def shared_prefix(a: torch.Tensor | Sequence[int], b: torch.Tensor | Sequence[int]) -> int:
    """How many leading tokens two id sequences share."""
    ta = torch.as_tensor(a, dtype=torch.int64)
    tb = torch.as_tensor(b, dtype=torch.int64)
    m = min(int(ta.numel()), int(tb.numel()))
    if m == 0:
        return 0
    diff = (ta[:m] != tb[:m]).nonzero()
    return int(diff[0]) if diff.numel() else m
