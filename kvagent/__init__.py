"""kvagent: read a document once for the whole world.

Public API::

    from kvagent import KVAgent
    agent = KVAgent()                     # embedded SmolLM2-135M-Instruct, offline
    doc = agent.read(Path("report.txt"))  # prefill once, cached on disk by content key
    agent.ask(doc, "What changed in 2024?")
"""

from typing import TYPE_CHECKING

from . import _moved
from .agent import Answer, DocumentHandle, KVAgent, VerifyReport
from .artifacts.format import Artifact, ArtifactHeader, Expectation, Limits
from .artifacts.source import RegistrySource
from .chat.turn import Cached, Guided, PromptTurns, Turn
from .config import Config
from .engines import (
    Cancel,
    Finish,
    GenerationEngine,
    GenerationRequest,
    Token,
    TransformersBatchEngine,
    Usage,
)
from .engines.hf import Generation, TransformersEngine
from .engines.params import GenerationParams
from .engines.textstream import TextStream, scan_stops
from .errors import (
    ArtifactError,
    ArtifactFormatError,
    ArtifactIntegrityError,
    ArtifactMismatchError,
    ArtifactTooLargeError,
    ConfigError,
    EngineError,
    InvalidKeyError,
    KVAgentError,
    ModelLoadError,
    RegistryError,
    StoreError,
    UnsupportedModelError,
)
from .kvcache.identity import FORMAT_VERSION, KeyContext, block_hashes, document_key, salted
from .kvcache.prefix import shared_prefix
from .kvcache.tensors import KVCache, KVLayout
from .reuse.info import CacheInfo
from .reuse.resolver import ClientSource, KVMemory, Resolution, Resolver, ResolverSettings
from .runtime import Runtime, build_runtime
from .tiers.store import KVStore

_moved.install()  # the old deep paths (kvagent.engine, ...), for one release

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Answer",
    "Artifact",
    "ArtifactError",
    "ArtifactFormatError",
    "ArtifactHeader",
    "ArtifactIntegrityError",
    "ArtifactMismatchError",
    "ArtifactTooLargeError",
    "CacheInfo",
    "Cached",
    "Cancel",
    "ClientSource",
    "Config",
    "ConfigError",
    "DocumentHandle",
    "EngineError",
    "Expectation",
    "Finish",
    "Generation",
    "GenerationEngine",
    "GenerationParams",
    "GenerationRequest",
    "Guided",
    "InvalidKeyError",
    "KVAgent",
    "KVAgentError",
    "KVCache",
    "KVLayout",
    "KVMemory",
    "KVStore",
    "KeyContext",
    "Limits",
    "ModelLoadError",
    "PromptTurns",
    "RegistryError",
    "RegistrySource",
    "Resolution",
    "Resolver",
    "ResolverSettings",
    "Runtime",
    "StoreError",
    "TextStream",
    "Token",
    "TransformersBatchEngine",
    "TransformersEngine",
    "Turn",
    "UnsupportedModelError",
    "Usage",
    "VerifyReport",
    "__version__",
    "block_hashes",
    "build_runtime",
    "document_key",
    "salted",
    "scan_stops",
    "shared_prefix",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """Names and modules that moved out of this package: importable for one release, with a warning."""
        from ._moved import moved_attribute

        return moved_attribute(__name__, name)
