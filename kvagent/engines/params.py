"""Decoding settings every engine and client takes (a leaf: no torch, nothing above it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import EngineError

__all__ = ["GenerationParams"]


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. ``temperature == 0`` is greedy (deterministic) decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise EngineError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
