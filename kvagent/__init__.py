"""kvagent: read a document once for the whole world.

Public API::

    from kvagent import KVAgent
    agent = KVAgent()                     # embedded SmolLM2-135M-Instruct, offline
    doc = agent.read(Path("report.txt"))  # prefill once, cached on disk by content key
    agent.ask(doc, "What changed in 2024?")
"""

from .agent import Answer, CacheInfo, DocumentHandle, KVAgent, VerifyReport
from .artifact import Artifact, ArtifactHeader, Expectation, Limits
from .config import Config
from .engine import Generation, GenerationParams, TransformersEngine
from .engines import (
    Cached,
    Cancel,
    Finish,
    GenerationEngine,
    GenerationRequest,
    Guided,
    PromptTurns,
    Token,
    TransformersBatchEngine,
    Turn,
    Usage,
)
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
from .identity import FORMAT_VERSION, KeyContext, block_hashes, document_key, salted
from .kv import KVCache, KVLayout
from .resolver import (
    ClientSource,
    KVMemory,
    RegistrySource,
    Resolution,
    Resolver,
    ResolverSettings,
    shared_prefix,
)
from .runtime import Runtime, build_runtime
from .store import KVStore
from .textstream import TextStream, scan_stops

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
