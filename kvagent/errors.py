"""The one exception hierarchy of kvagent.

    KVAgentError
    ├── ConfigError            bad argument or KVAGENT_* variable
    ├── ModelLoadError         a model or tokenizer could not be loaded
    ├── UnsupportedModelError  the model's cache is not plain per-layer K/V (e.g. a sliding window was hit)
    ├── InvalidKeyError        a cache key that is not 64 lowercase hex characters
    ├── ArtifactError          an artifact that must not be used
    │   ├── ArtifactFormatError     malformed container or header, unknown version/codec
    │   ├── ArtifactTooLargeError   header or payload over the configured limits
    │   ├── ArtifactIntegrityError  checksum mismatch (corruption or tampering)
    │   └── ArtifactMismatchError   artifact is for another model, tokenizer, dtype or layout
    ├── StoreError             the local store cannot be opened or written
    ├── EngineError            generation parameters or inputs the engine cannot run
    └── RegistryError          the remote registry refused or failed (see kvagent.registry)

Storage and integrity errors are cache misses for the agent: the facade logs them and prefills.
"""

from __future__ import annotations


class KVAgentError(Exception):
    """Base class of every error kvagent raises on purpose."""


class ConfigError(KVAgentError, ValueError):
    """A configuration value is missing or invalid."""


class ModelLoadError(KVAgentError):
    """A model or tokenizer could not be loaded."""


class UnsupportedModelError(KVAgentError):
    """The model keeps state that kvagent cannot capture exactly."""


class InvalidKeyError(KVAgentError, ValueError):
    """A cache key is not a 64-character lowercase sha256 hex digest."""


class ArtifactError(KVAgentError):
    """An artifact failed validation and must not be used."""


class ArtifactFormatError(ArtifactError):
    """The container or its header is malformed, or of an unknown version or codec."""


class ArtifactTooLargeError(ArtifactError):
    """The header or payload exceeds a size limit."""


class ArtifactIntegrityError(ArtifactError):
    """The payload's checksum does not match its header."""


class ArtifactMismatchError(ArtifactError):
    """The artifact was computed by another model, tokenizer, dtype or layout."""


class StoreError(KVAgentError):
    """The local store could not be opened or written."""


class EngineError(KVAgentError, ValueError):
    """Generation inputs or parameters are invalid."""


class RegistryError(KVAgentError):
    """The registry refused a request or could not be reached."""
