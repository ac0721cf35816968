"""kvagent: read a document once for the whole world.

Public API::

    from kvagent import KVAgent
    agent = KVAgent()                     # embedded SmolLM2-135M-Instruct, offline
    doc = agent.read(Path("report.txt"))  # prefill once, cached on disk by content key
    agent.ask(doc, "What changed in 2024?")
"""

import importlib
from typing import TYPE_CHECKING

from . import _moved
from .agent import Answer, DocumentHandle, KVAgent, VerifyReport
from .artifacts.format import Artifact, ArtifactHeader, Expectation, Limits, encode_parts
from .artifacts.source import RegistrySource
from .chat.turn import Cached, Guided, PromptTurns, Reply, Turn
from .config import Config, unknown_option
from .costs.policy import PolicyParams
from .engines import (
    BatchObserver,
    Cancel,
    Finish,
    GenerationEngine,
    GenerationRequest,
    Sink,
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
    ContextLengthError,
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
from .modes import AskMode, Publish, Verify
from .options import Option, option_name, option_of, options_of
from .plugins import EngineContext, EngineFactory
from .reuse.info import CacheInfo, CacheStatus
from .reuse.resolver import ClientSource, KVMemory, Resolution, Resolver, ResolverSettings
from .runtime import Runtime, build_runtime
from .tiers.store import KVStore

if TYPE_CHECKING:
    from .chat.guided import guided_json, guided_tool_call
    from .chat.tools import (
        ContentDelta,
        Parsed,
        StreamParser,
        ToolCall,
        ToolFormat,
        forced_tool,
        normalize_tools,
        require_tool_format,
        tool_format,
    )
    from .chat.tools import parse as parse_tool_calls
    from .chat.tools import render as render_chat
    from .client.registry import RegistryClient

#: public names imported on first use: ``import kvagent`` still loads neither httpx nor the tool parsers
_LAZY: dict[str, tuple[str, str]] = {
    "RegistryClient": ("kvagent.client.registry", "RegistryClient"),
    "ContentDelta": ("kvagent.chat.tools", "ContentDelta"),
    "Parsed": ("kvagent.chat.tools", "Parsed"),
    "StreamParser": ("kvagent.chat.tools", "StreamParser"),
    "ToolCall": ("kvagent.chat.tools", "ToolCall"),
    "ToolFormat": ("kvagent.chat.tools", "ToolFormat"),
    "forced_tool": ("kvagent.chat.tools", "forced_tool"),
    "normalize_tools": ("kvagent.chat.tools", "normalize_tools"),
    "parse_tool_calls": ("kvagent.chat.tools", "parse"),
    "render_chat": ("kvagent.chat.tools", "render"),
    "require_tool_format": ("kvagent.chat.tools", "require_tool_format"),
    "tool_format": ("kvagent.chat.tools", "tool_format"),
    "guided_json": ("kvagent.chat.guided", "guided_json"),
    "guided_tool_call": ("kvagent.chat.guided", "guided_tool_call"),
}

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
    "AskMode",
    "BatchObserver",
    "CacheInfo",
    "CacheStatus",
    "Cached",
    "Cancel",
    "ClientSource",
    "Config",
    "ConfigError",
    "ContentDelta",
    "ContextLengthError",
    "DocumentHandle",
    "EngineContext",
    "EngineError",
    "EngineFactory",
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
    "Option",
    "Parsed",
    "PolicyParams",
    "PromptTurns",
    "Reply",
    "Publish",
    "RegistryClient",
    "RegistryError",
    "RegistrySource",
    "Resolution",
    "Resolver",
    "ResolverSettings",
    "Runtime",
    "Sink",
    "StoreError",
    "StreamParser",
    "TextStream",
    "Token",
    "ToolCall",
    "ToolFormat",
    "TransformersBatchEngine",
    "TransformersEngine",
    "Turn",
    "UnsupportedModelError",
    "Usage",
    "Verify",
    "VerifyReport",
    "__version__",
    "block_hashes",
    "build_runtime",
    "document_key",
    "encode_parts",
    "forced_tool",
    "guided_json",
    "guided_tool_call",
    "normalize_tools",
    "option_name",
    "option_of",
    "options_of",
    "parse_tool_calls",
    "render_chat",
    "require_tool_format",
    "salted",
    "scan_stops",
    "shared_prefix",
    "tool_format",
    "unknown_option",
]


if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """The public names imported on first use (``_LAZY``), then the names and modules that moved out of
        this package: importable for one release, with a warning."""
        if name in _LAZY:
            module, attr = _LAZY[name]
            value = getattr(importlib.import_module(module), attr)
            globals()[name] = value
            return value
        from ._moved import moved_attribute

        return moved_attribute(__name__, name)
