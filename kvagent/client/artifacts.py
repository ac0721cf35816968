"""The artifact API of a registry: look up, download (checked, maybe paid), publish and grant.

Every byte downloaded is checked against its handle (declared size, tree hash, header, signature when keys
are trusted), whether it came from the registry or from a presigned object-store URL.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..artifacts import format as art
from ..artifacts import signing
from ..artifacts.source import GiveUp, Handle
from ..errors import (
    ArtifactIntegrityError,
    RegistryDownloadAbandonedError,
    RegistryProtocolError,
    RegistryUnavailableError,
)
from ..kvcache.identity import validate_key
from ..payments.payer import Payer
from .charges import X402, Paid, payment_headers
from .transport import Deadline, Transport
from .wire import HEX64_LEN, VISIBILITIES, error_for, hex_field, parse_handle, read_json

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Download:
    """One artifact download: its bytes, how long it took, and what it cost (nothing is kept on the client).

    ``charge``: integer micro-units charged by this call (0: free, or a replay of a purchase already paid);
    ``receipt``: the purchase's ``X-KVAgent-Receipt`` (for a dispute), None when nothing was sold.
    """

    data: bytearray
    seconds: float
    charge: int = 0
    receipt: str | None = None


@dataclass(frozen=True)
class VerifiedDownload:
    """A downloaded artifact after its checks (tree hash, header == handle, signature), and what it cost."""

    artifact: art.Artifact
    data: bytearray
    seconds: float
    charge: int = 0
    receipt: str | None = None


def sign(header: art.ArtifactHeader, private_key: Any) -> str:
    """The ``X-KVAgent-Signature`` value of an ed25519-v3 signature of ``header`` (see
    kvagent.artifacts.signing)."""
    return signing.sign(header, private_key).header_value()


def verify_signature(handle: Handle, trusted_keys: Collection[str]) -> None:
    """Raise ArtifactIntegrityError unless ``handle`` is v3- (or v2-) signed over its header by one of
    ``trusted_keys``."""
    if handle.signature is None:
        raise ArtifactIntegrityError(f"artifact {handle.key[:16]}… is unsigned but trusted keys are required")
    signing.verify(handle.signature, handle.header, trusted_keys)


class ArtifactClient:
    """Artifacts on a registry. ``trusted_keys`` (hex ed25519 public keys) makes signatures mandatory;
    ``payer`` (a wallet within its caps) pays a download's x402 402 when within the call's ``max_price``."""

    def __init__(self, transport: Transport, *, trusted_keys: Collection[str] | None = None,
                 limits: art.Limits = art.DEFAULT_LIMITS, payer: Payer | None = None) -> None:
        self._t = transport
        self.trusted_keys = frozenset(k.lower() for k in trusted_keys) if trusted_keys is not None else None
        self.limits = limits
        self.payer = payer

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        """The handle of ``key``, or None if the registry has none visible to us.

        ``timeout`` bounds the whole call, retries included (a stalled registry then costs at most that).
        """
        validate_key(key)
        deadline = Deadline(timeout)

        def once() -> Handle | None:
            resp = self._t.request(
                "GET", f"/v1/artifacts/{key}", "lookup", **deadline.kw("lookup", self._t.timeout)
            )
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise error_for(resp, "lookup")
            return parse_handle(read_json(resp), key=key, limits=self.limits)

        return self._t.retrying(once, deadline)

    def lookup_prefix(
        self, block_hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        """The artifact sharing the longest block-hash prefix with ``block_hashes`` and how many blocks.

        ``timeout`` bounds the whole call, retries included.
        """
        hashes = [hex_field(h, HEX64_LEN, "a block hash") for h in block_hashes]
        if not hashes:
            return None
        deadline = Deadline(timeout)

        def once() -> tuple[Handle, int] | None:
            resp = self._t.request(
                "POST", "/v1/lookup/prefix", "prefix lookup", json={"block_hashes": hashes[:4096]},
                **deadline.kw("prefix lookup", self._t.timeout),
            )
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise error_for(resp, "prefix lookup")
            body = read_json(resp)
            if not isinstance(body, Mapping) or not {"key", "blocks", "handle"} <= set(body):
                raise RegistryProtocolError("prefix lookup answer must hold key, blocks and handle")
            blocks = body["blocks"]
            if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 < blocks <= len(hashes):
                raise RegistryProtocolError(f"prefix lookup matched {blocks!r:.20} of {len(hashes)} blocks")
            return parse_handle(
                body["handle"], key=hex_field(body["key"], HEX64_LEN, "a key"), limits=self.limits
            ), blocks

        return self._t.retrying(once, deadline)

    def download_blob(self, handle: Handle, *, max_price: int | None = None,
                      idempotency_key: str | None = None, give_up: GiveUp | None = None) -> Download:
        """The artifact bytes of ``handle``, streamed and cut off at the handle's declared size.

        Every attempt carries the same ``Idempotency-Key`` (a fresh one per call unless given), so a
        retried download is charged once; a priced artifact above ``max_price`` or the balance raises
        RegistryPaymentRequiredError (not retried). The returned ``Download`` says what this call cost.
        ``give_up(received, size, seconds)``, asked as the bytes come in, returns why to stop (raising
        RegistryDownloadAbandonedError, not retried) or None to go on.
        """
        pay = payment_headers(max_price, idempotency_key)
        paid = Paid()
        x402 = X402(self.payer, max_price)
        t0 = time.perf_counter()

        def attempt(headers: dict[str, str], started: float) -> bytearray | httpx.Response:
            """One GET of the blob: its bytes, or a 402 answer that the wallet may pay (read)."""
            with self._t.stream("GET", handle.blob_url, headers=headers) as resp:
                # a presigned object-store URL: bytes bypass the registry
                if resp.status_code in _REDIRECTS:
                    resp.read()
                    paid.note(resp)
                    x402.served(resp)
                    obj = self._t.open_elsewhere(_presigned_location(resp))
                    try:
                        # expired or refused: the next attempt asks for a fresh URL
                        if obj.status_code != 200:
                            obj.read()
                            raise RegistryUnavailableError(
                                f"object store answered HTTP {obj.status_code} for {handle.key[:16]}…"
                            )
                        return _read_blob(obj, handle, give_up, started)
                    finally:
                        obj.close()
                if resp.status_code != 200:
                    resp.read()
                    if x402.payable(resp):
                        return resp
                    raise x402.refused(resp) or error_for(resp, "download")
                paid.note(resp)
                x402.served(resp)
                return _read_blob(resp, handle, give_up, started)

        def once() -> bytearray:
            started = time.perf_counter()  # give_up judges this attempt's speed, not earlier attempts'
            try:
                got = attempt(x402.headers(pay), started)
                if isinstance(got, httpx.Response):  # a 402 the wallet pays: once, then the same signature
                    x402.pay(got)
                    got = attempt(x402.headers(pay), started)
                    if isinstance(got, httpx.Response):
                        raise error_for(got, "download")
                return got
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"download of {handle.key[:16]}… failed: {type(exc).__name__}: {exc}"
                ) from exc

        data = self._t.retrying(once)
        charge = x402.charge(paid)
        return Download(data, time.perf_counter() - t0, charge, paid.receipt)

    def download_verified(
        self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
        idempotency_key: str | None = None, give_up: GiveUp | None = None,
    ) -> VerifiedDownload:
        """Download, verify (tree hash, header == handle, signature when keys are trusted) and decode;
        ``give_up`` as for ``download_blob``."""
        got = self.download_blob(
            handle, max_price=max_price, idempotency_key=idempotency_key, give_up=give_up
        )
        artifact = art.decode(got.data, expect=expect, limits=self.limits)
        if artifact.header != handle.header:
            raise ArtifactIntegrityError(
                f"downloaded artifact header differs from the registry's handle for {handle.key[:16]}…"
            )
        if self.trusted_keys is not None:
            verify_signature(handle, self.trusted_keys)
        return VerifiedDownload(artifact, got.data, got.seconds, got.charge, got.receipt)

    def download(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
                 idempotency_key: str | None = None) -> art.Artifact:
        """The verified, decoded artifact of ``handle`` (see ``download_verified``)."""
        return self.download_verified(
            handle, expect, max_price=max_price, idempotency_key=idempotency_key
        ).artifact

    def publish(self, blob: bytes, visibility: str = "restricted", signing_key: Any = None,
                price: int | None = None) -> Handle:
        """Publish artifact bytes under their header's key (PUT is idempotent for identical bytes);
        ``price`` (micro-units per load) is set before the artifact becomes visible."""
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
        header = art.read_header(blob, self.limits)
        headers = {"X-KVAgent-Visibility": visibility, "Content-Type": "application/octet-stream"}
        if price is not None:
            headers["X-KVAgent-Price"] = str(int(price))
        if signing_key is not None:
            headers["X-KVAgent-Signature"] = sign(header, signing_key)

        def once() -> Handle:
            resp = self._t.request("PUT", f"/v1/artifacts/{header.key}", "publish", content=blob,
                                   headers=headers)
            if resp.status_code not in (200, 201):
                raise error_for(resp, "publish")
            return parse_handle(read_json(resp), key=header.key, limits=self.limits)

        return self._t.retrying(once)

    def grant(self, key: str, principal: str) -> None:
        """Let ``principal`` see a restricted artifact we own."""
        validate_key(key)

        def once() -> None:
            resp = self._t.request(
                "POST", f"/v1/artifacts/{key}/entitlements", "grant", json={"principal": principal}
            )
            if resp.status_code not in (200, 201, 204):
                raise error_for(resp, "grant")

        self._t.retrying(once)


def _presigned_location(resp: httpx.Response) -> str:
    url = resp.headers.get("location", "")
    if not url.startswith(("https://", "http://")) or len(url) > 8192:
        raise RegistryProtocolError(f"registry redirected a download to {url[:80]!r}, not an http(s) URL")
    return url


def _read_blob(resp: httpx.Response, handle: Handle, give_up: GiveUp | None, started: float) -> bytearray:
    """The body of a blob response, checked against the handle's declared size; ``give_up`` (see
    ``ArtifactClient.download_blob``) is asked after each chunk, with the seconds since ``started``."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != handle.size:
        raise ArtifactIntegrityError(
            f"registry serves {declared} bytes for {handle.key[:16]}… but its handle says {handle.size}"
        )
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > handle.size:
            raise ArtifactIntegrityError(
                f"download of {handle.key[:16]}… exceeded its declared {handle.size} bytes"
            )
        if give_up is not None and len(buf) < handle.size:
            seconds = time.perf_counter() - started
            why = give_up(len(buf), handle.size, seconds)
            if why:
                raise RegistryDownloadAbandonedError(why, len(buf), seconds)
    if len(buf) != handle.size:
        raise RegistryUnavailableError(
            f"download of {handle.key[:16]}… stopped at {len(buf)}/{handle.size} bytes"
        )
    return buf
