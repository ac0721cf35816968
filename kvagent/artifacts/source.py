"""Where published artifacts come from: a registry's ``Handle`` on one, the ``RegistrySource`` protocol
that finds and fetches them, and a ``Fetched`` artifact (records only: no I/O, no torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from . import format as art
from .signing import Signature

__all__ = ["Fetched", "GiveUp", "Handle", "RegistrySource"]


#: ``give_up(received, size, seconds)``: why to stop a download part-way, or None to go on
GiveUp = Callable[[int, int, float], "str | None"]


@dataclass(frozen=True)
class Handle:
    """The registry's record of a published artifact."""

    key: str
    header: art.ArtifactHeader
    size: int
    visibility: str
    owner: str
    blob_url: str
    signature: Signature | None
    # per load, integer micro-units of ``currency`` (None: the registry sells nothing)
    price: int | None = None
    currency: str | None = None


@dataclass(frozen=True)
class Fetched:
    """A verified artifact from a registry source; ``blob`` is set when it should be kept in the local
    store."""

    artifact: art.Artifact
    nbytes: int
    seconds: float
    blob: bytes | bytearray | None = None
    charged: int = 0  # what the registry charged for it, integer micro-units (0: free)
    receipt: str | None = None  # the purchase's receipt id, for a dispute


class RegistrySource(Protocol):
    """Where published artifacts come from: lookups by key and by block-hash prefix, and verified fetches."""

    label: str  # shown in reasons; for a remote source, its URL (the calibration and the breaker key on it)
    remote: bool  # across a network: lookups get deadlines and a circuit breaker, links are calibrated
    can_generate: bool  # whether it can continue generation from its copy (remote generate)
    # bytes/s to assume before a fetch has been measured (None: the policy's default)
    bandwidth_hint: float | None

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None: ...

    def lookup_prefix(
        self, hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None: ...

    def fetch(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
              give_up: GiveUp | None = None) -> Fetched:
        """Download (buying it for at most ``max_price`` when it is sold) and check checksum, header and
        signature;
        raise RegistryError (RegistryPaymentRequiredError for a refused purchase) or ArtifactError.
        ``give_up(received, size, seconds)``: asked while the bytes come in, why to stop part-way
        (RegistryDownloadAbandonedError) or None; a source whose fetch is not a transfer may ignore it."""

    def dispute(self, handle: Handle, receipt: str, reason: str, difference: float) -> str:
        """Report a bought artifact that failed verification; returns what the registry said."""
