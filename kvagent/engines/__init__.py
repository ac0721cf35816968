"""Engines behind one interface (:mod:`.base`): decoding settings (:mod:`.params`), the transformers engine
(:mod:`.hf`), the engine with continuous batching (:mod:`.batch`; its attention kernel :mod:`.attention`,
its batchability probes :mod:`.probe`), the text stream they decode into (:mod:`.textstream`) and engines
by name are chosen above them (:mod:`kvagent.plugins`). The prompt-turn core every front door uses is
:mod:`kvagent.chat.turn`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Cancel,
    EngineEvent,
    Finish,
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    PromptForward,
    RequestHandle,
    Sink,
    Token,
    Usage,
    engine_failure,
    events,
)
from .batch import BatchObserver, TransformersBatchEngine

__all__ = [
    "BatchObserver",
    "Cancel",
    "EngineEvent",
    "Finish",
    "FinishReason",
    "GenerationEngine",
    "GenerationRequest",
    "PromptForward",
    "RequestHandle",
    "Sink",
    "Token",
    "TransformersBatchEngine",
    "Usage",
    "engine_failure",
    "events",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """Names and modules that moved out of this package: importable for one release, with a warning."""
        from .._moved import moved_attribute

        return moved_attribute(__name__, name)
