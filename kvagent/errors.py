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
    │   └── SchemaVersionError     the registry database's schema is newer than this kvagent (or not migrated)
    ├── EngineError            generation parameters or inputs the engine cannot run
    │   └── ContextLengthError     a document longer than the model's context (refused before prefill)
    ├── ToolsUnsupportedError  tools asked of a model whose chat template cannot render them
    ├── IdempotencyError       an Idempotency-Key that cannot serve this request (kvagent.server.ledger)
    │   ├── IdempotencyKeyReused     the key was claimed for another request (422)
    │   ├── AlreadyServed            the key's generation was served; it is never generated again (409)
    │   └── IdempotencyKeyRefunded   the key's purchase was refunded; it never serves again (409)
    ├── PaymentError           an x402 payment not made, not valid or not settled (kvagent.payments)
    │   ├── PaymentDeclined        this agent will not pay: over its caps, or the offer is not payable
    │   ├── PaymentInvalid         the facilitator refused the signed payment at verification
    │   └── SettlementFailed       a verified payment did not settle on chain (nothing was served)
    └── RegistryError          the remote registry refused or failed (see kvagent.client.registry)
        ├── RegistryUnavailableError  unreachable, timed out, 5xx or 429 (retried)
        │   ├── RegistrySkippedError  not asked: its circuit breaker is open (kvagent.costs.calibration)
        │   └── RegistryDeadlineError a call's own deadline passed (not retried)
        ├── RegistryAuthError         401 / 403
        ├── RegistryPaymentRequiredError  402: price above the stated maximum or the balance (never retried)
        ├── RegistryNotImplementedError   501: this registry does not offer the call (no model to generate)
        ├── RegistryConflictError     409
        ├── RegistryRejectedError     413 / 422
        └── RegistryProtocolError     malformed or unexpected response

Storage and integrity errors are cache misses for the agent: the facade logs them and prefills.
"""

from __future__ import annotations

from typing import Any


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


class SchemaVersionError(StoreError):
    """The registry database's schema is at a version this kvagent does not know (newer), or behind it while
    migrations are off: the message says which versions and what to run."""


class EngineError(KVAgentError, ValueError):
    """Generation inputs or parameters are invalid."""


class ContextLengthError(EngineError):
    """A document has more tokens than the model has positions; refused before any prefill."""

    def __init__(self, message: str, n_tokens: int, max_positions: int):
        super().__init__(message)
        self.n_tokens, self.max_positions = n_tokens, max_positions


class ToolsUnsupportedError(KVAgentError, ValueError):
    """Tools were given to a model whose chat template has no (known) tool-call format."""


class IdempotencyError(KVAgentError):
    """An ``Idempotency-Key`` that cannot serve this request: ``status`` and ``code`` are the HTTP answer's,
    ``receipt`` names the purchase that holds the key (None when it holds none)."""

    code = "idempotency_key_reused"
    status = 409

    def __init__(self, message: str, receipt: str | None = None):
        super().__init__(message)
        self.receipt = receipt


class IdempotencyKeyReused(IdempotencyError):
    """The key was claimed for another request (another route, artifact, amount or body): 422, as the IETF
    Idempotency-Key draft answers a key reused with another payload."""

    status = 422


class AlreadyServed(IdempotencyError):
    """The key's paid generation was served already: it is never generated again. ``answer`` is the stored
    answer (JSON text) when one was kept, for the route to replay."""

    code = "idempotency_key_already_served"

    def __init__(self, message: str, receipt: str | None = None, answer: str | None = None):
        super().__init__(message, receipt)
        self.answer = answer


class IdempotencyKeyRefunded(IdempotencyError):
    """The key's purchase was refunded: the key never serves again (send a new one)."""

    code = "idempotency_key_refunded"


class PaymentError(KVAgentError):
    """An x402 payment was not made, was not valid, or did not settle; ``reason`` is machine-readable."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class PaymentDeclined(PaymentError):
    """This agent will not pay: the price is above its cap or its remaining budget, or no offer is payable."""


class PaymentInvalid(PaymentError):
    """The facilitator refused a signed payment at verification (forged, expired, replayed, underfunded)."""


class SettlementFailed(PaymentError):
    """A verified payment did not settle on chain, or the facilitator could not be reached."""


class RegistryError(KVAgentError):
    """The registry refused a request or could not be reached."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached, timed out, or answered 5xx/429 (transient; retried)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RegistrySkippedError(RegistryUnavailableError):
    """The registry was not asked: it failed recently and is skipped until its back-off ends."""


class RegistryDeadlineError(RegistryUnavailableError):
    """A call's own deadline (its ``timeout``, retries included) passed: never retried. ``last_error`` is what
    its last attempt failed with ("" when none had failed)."""

    def __init__(self, message: str, last_error: str = ""):
        super().__init__(message)
        self.last_error = last_error


class RegistryDownloadAbandonedError(RegistryError):
    """A download given up part-way: finishing it would take longer than computing the KV here (not a
    registry failure, not retried). ``received``/``seconds`` measure the link so far."""

    def __init__(self, message: str, received: int, seconds: float):
        super().__init__(message)
        self.received, self.seconds = received, seconds


class RegistryAuthError(RegistryError):
    """The registry refused the token (401) or the principal may not do this (403)."""


class RegistryPaymentRequiredError(RegistryError):
    """402: the registry refused to charge (price above the caller's maximum, or above its balance).

    ``quote`` is the server's machine-readable quote: ``{"key", "price", "currency", "balance", "reason"}``.
    """

    def __init__(self, message: str, quote: dict[str, Any]):
        super().__init__(message)
        self.quote = quote


class RegistryNotImplementedError(RegistryError):
    """The registry does not offer this call (501), e.g. remote generation on a registry that hosts no
    model."""


class RegistryConflictError(RegistryError):
    """The key is owned by another principal, or the artifact is for another model (409)."""


class RegistryRejectedError(RegistryError):
    """The registry refused the request body: too large (413) or an invalid artifact (422)."""


class RegistryProtocolError(RegistryError):
    """The registry answered with malformed JSON or an unexpected shape."""
