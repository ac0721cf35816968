"""Engines behind one interface (:mod:`.base`), the transformers engine with continuous batching
(:mod:`.transformers`), and the prompt-turn core every front door uses (:mod:`.turn`)."""

from __future__ import annotations

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
from .plugins import EngineContext, EngineFactory, load_engine_factory
from .transformers import BatchObserver, TransformersBatchEngine
from .turn import (
    Cached,
    Guide,
    Guided,
    GuidedReply,
    PromptTurns,
    Turn,
    TurnEvent,
    continuation_ids,
    settled,
)

__all__ = [
    "BatchObserver",
    "Cached",
    "Cancel",
    "EngineContext",
    "EngineEvent",
    "EngineFactory",
    "Finish",
    "FinishReason",
    "GenerationEngine",
    "GenerationRequest",
    "Guide",
    "Guided",
    "GuidedReply",
    "PromptForward",
    "PromptTurns",
    "RequestHandle",
    "Sink",
    "Token",
    "TransformersBatchEngine",
    "Turn",
    "TurnEvent",
    "Usage",
    "continuation_ids",
    "engine_failure",
    "events",
    "load_engine_factory",
    "settled",
]
