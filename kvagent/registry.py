"""Client of the kvagent registry HTTP API (docs/registry-api.md).

One ``httpx.Client`` (connection reuse, explicit timeouts) behind a small retry policy: idempotent
calls are retried on connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``) with
exponential backoff and jitter, a bounded number of attempts and a bounded total delay. A
generate call is retried only until its stream has started. Every response is validated strictly:
anything unexpected is a ``RegistryError``, never a ``KeyError`` or a half-parsed object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from . import artifact as art
from .engine import GenerationParams
from .errors import (
    ArtifactError,
    ArtifactIntegrityError,
    RegistryAuthError,
    RegistryConflictError,
    RegistryError,
    RegistryProtocolError,
    RegistryRejectedError,
    RegistryUnavailableError,
)
from .identity import validate_key

T = TypeVar("T")

VISIBILITIES = ("restricted", "public")
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=20.0, write=20.0, pool=3.0)
_MAX_JSON_BYTES = 1 << 20
_MAX_RETRY_AFTER_S = 30.0
_HEX64_LEN, _SIG_HEX_LEN = 64, 128


@dataclass(frozen=True)
class Signature:
    """An ed25519 signature by ``public_key`` over the artifact's payload digest (see ``signed_message``)."""

    alg: str
    public_key: str
    signature: str


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


def signed_message(payload_sha256: str) -> bytes:
    """The bytes a publisher signs: the 32-byte payload tree hash."""
    return bytes.fromhex(payload_sha256)


def sign(payload_sha256: str, private_key: Any) -> str:
    """The ``X-KVAgent-Signature`` value for ``payload_sha256`` signed by an ed25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if isinstance(private_key, (bytes, bytearray)):
        private_key = Ed25519PrivateKey.from_private_bytes(bytes(private_key))
    pub = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return f"ed25519:{pub}:{private_key.sign(signed_message(payload_sha256)).hex()}"


def verify_signature(handle: Handle, trusted_keys: Collection[str]) -> None:
    """Raise ArtifactIntegrityError unless ``handle`` is signed by one of ``trusted_keys`` (hex)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    sig = handle.signature
    if sig is None:
        raise ArtifactIntegrityError(f"artifact {handle.key[:16]}… is unsigned but trusted keys are required")
    if sig.public_key not in {k.lower() for k in trusted_keys}:
        raise ArtifactIntegrityError(
            f"artifact {handle.key[:16]}… is signed by {sig.public_key[:16]}…, which is not a trusted key"
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig.public_key)).verify(
            bytes.fromhex(sig.signature), signed_message(handle.header.payload_sha256)
        )
    except (InvalidSignature, ValueError) as exc:
        raise ArtifactIntegrityError(
            f"signature on artifact {handle.key[:16]}… does not verify against its payload digest"
        ) from exc


# -- strict parsing of responses --------------------------------------------------------------
def _hex(v: Any, n: int, what: str) -> str:
    if not isinstance(v, str) or len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise RegistryProtocolError(
            f"registry sent {what} that is not {n} lowercase hex characters: {v!r:.80}"
        )
    return v


def parse_handle(obj: Any, *, key: str | None = None, limits: art.Limits = art.DEFAULT_LIMITS) -> Handle:
    """Validate a handle JSON object; ``key`` is the key it must describe."""
    if not isinstance(obj, Mapping):
        raise RegistryProtocolError(f"registry handle must be a JSON object, got {type(obj).__name__}")
    missing = {"key", "header", "size", "visibility", "owner", "blob_url", "signature"} - set(obj)
    if missing:
        raise RegistryProtocolError(f"registry handle lacks {sorted(missing)}")
    hkey = _hex(obj["key"], _HEX64_LEN, "a handle key")
    if key is not None and hkey != key:
        raise RegistryProtocolError(f"asked for {key[:16]}… but the registry answered with {hkey[:16]}…")
    if not isinstance(obj["header"], Mapping):
        raise RegistryProtocolError("registry handle's header is not a JSON object")
    try:
        header = art.header_from_mapping(obj["header"], limits)
    except ArtifactError as exc:
        raise RegistryProtocolError(f"registry handle carries an invalid artifact header: {exc}") from exc
    if header.key != hkey:
        raise RegistryProtocolError(f"handle {hkey[:16]}… carries the header of {header.key[:16]}…")
    size = obj["size"]
    max_size = 8 + limits.max_container_header + limits.max_payload_bytes
    if isinstance(size, bool) or not isinstance(size, int) or not header.payload_bytes < size <= max_size:
        raise RegistryProtocolError(
            f"handle size {size!r:.40} is impossible for a {header.payload_bytes}-byte payload (limit {max_size})"
        )
    if obj["visibility"] not in VISIBILITIES:
        raise RegistryProtocolError(f"unknown visibility {obj['visibility']!r:.40}")
    if not isinstance(obj["owner"], str):
        raise RegistryProtocolError("handle owner must be a string")
    url = obj["blob_url"]
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        raise RegistryProtocolError(f"blob_url must be a path on the registry, got {url!r:.80}")
    return Handle(
        hkey, header, size, obj["visibility"], obj["owner"], url, _parse_signature(obj["signature"])
    )


def _parse_signature(sig: Any) -> Signature | None:
    if sig is None:
        return None
    if not isinstance(sig, Mapping) or sig.get("alg") != "ed25519":
        raise RegistryProtocolError(f"unsupported signature record {sig!r:.80}")
    return Signature(
        "ed25519",
        _hex(sig.get("public_key"), _HEX64_LEN, "a public key"),
        _hex(sig.get("signature"), _SIG_HEX_LEN, "a signature"),
    )


def _json(resp: httpx.Response) -> Any:
    if len(resp.content) > _MAX_JSON_BYTES:
        raise RegistryProtocolError(f"registry JSON response of {len(resp.content)} bytes is too large")
    try:
        return json.loads(resp.content)
    except (ValueError, RecursionError) as exc:
        raise RegistryProtocolError(f"registry sent malformed JSON ({resp.status_code}): {exc}") from exc


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after")
    try:
        return min(max(float(raw), 0.0), _MAX_RETRY_AFTER_S) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_for(resp: httpx.Response, what: str) -> RegistryError:
    """Translate a non-success status into the matching RegistryError (the body's detail included)."""
    detail = ""
    try:
        body = json.loads(resp.content[:4096]) if resp.content else None
        if isinstance(body, Mapping):
            detail = f": {body.get('error', '')} {str(body.get('detail', ''))[:300]}".rstrip()
    except (ValueError, RecursionError, httpx.ResponseNotRead):
        detail = ""
    msg = f"registry {what} failed with HTTP {resp.status_code}{detail}"
    code = resp.status_code
    if code == 429 or code >= 500 and code != 501:
        return RegistryUnavailableError(msg, retry_after=_retry_after(resp))
    if code in (401, 403):
        return RegistryAuthError(msg + " (check the token)")
    if code == 409:
        return RegistryConflictError(msg)
    if code in (413, 422):
        return RegistryRejectedError(msg)
    return RegistryError(msg)


class _Wait:
    """Retry-After when the server sent one, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float):
        self._backoff = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RegistryUnavailableError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))


class RegistryClient:
    """Talks to one registry. ``trusted_keys`` (hex ed25519 public keys) makes signatures mandatory."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_seconds: float = 20.0,
        backoff_initial: float = 0.2,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
        trusted_keys: Collection[str] | None = None,
        limits: art.Limits = art.DEFAULT_LIMITS,
    ) -> None:
        if retries < 1:
            raise ValueError("retries counts attempts and must be at least 1")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._http = client or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        if client is not None:
            client.base_url = httpx.URL(self.base_url)
            client.headers.update(headers)
        self.trusted_keys = frozenset(k.lower() for k in trusted_keys) if trusted_keys is not None else None
        self.limits = limits
        self._retry_kw: dict[str, Any] = dict(
            stop=stop_after_attempt(retries) | stop_after_delay(max_retry_seconds),
            wait=_Wait(backoff_initial, 5.0),
            retry=retry_if_exception_type(RegistryUnavailableError),
            reraise=True,
        )
        if sleep is not None:
            self._retry_kw["sleep"] = sleep
        self.last_download_seconds = 0.0

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------
    def _retrying(self, fn: Callable[[], T]) -> T:
        return Retrying(**self._retry_kw)(fn)

    def _send(self, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"registry {what} at {self.base_url} failed: {type(exc).__name__}: {exc}"
            ) from exc

    # -- API --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self._http.get("/v1/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def lookup(self, key: str) -> Handle | None:
        """The handle of ``key``, or None if the registry has none visible to us."""
        validate_key(key)

        def once() -> Handle | None:
            resp = self._send("GET", f"/v1/artifacts/{key}", "lookup")
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise _error_for(resp, "lookup")
            return parse_handle(_json(resp), key=key, limits=self.limits)

        return self._retrying(once)

    def lookup_prefix(self, block_hashes: Sequence[str]) -> tuple[Handle, int] | None:
        """The artifact sharing the longest block-hash prefix with ``block_hashes`` and how many blocks."""
        hashes = [_hex(h, _HEX64_LEN, "a block hash") for h in block_hashes]
        if not hashes:
            return None

        def once() -> tuple[Handle, int] | None:
            resp = self._send(
                "POST", "/v1/lookup/prefix", "prefix lookup", json={"block_hashes": hashes[:4096]}
            )
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise _error_for(resp, "prefix lookup")
            body = _json(resp)
            if not isinstance(body, Mapping) or not {"key", "blocks", "handle"} <= set(body):
                raise RegistryProtocolError("prefix lookup answer must hold key, blocks and handle")
            blocks = body["blocks"]
            if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 < blocks <= len(hashes):
                raise RegistryProtocolError(f"prefix lookup matched {blocks!r:.20} of {len(hashes)} blocks")
            return parse_handle(
                body["handle"], key=_hex(body["key"], _HEX64_LEN, "a key"), limits=self.limits
            ), blocks

        return self._retrying(once)

    def download_blob(self, handle: Handle) -> bytearray:
        """The artifact bytes of ``handle``, streamed and cut off at the handle's declared size."""

        def once() -> bytearray:
            buf = bytearray()
            try:
                with self._http.stream("GET", handle.blob_url) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        raise _error_for(resp, "download")
                    declared = resp.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) != handle.size:
                        raise ArtifactIntegrityError(
                            f"registry serves {declared} bytes for {handle.key[:16]}… but its handle says {handle.size}"
                        )
                    for chunk in resp.iter_bytes():
                        buf += chunk
                        if len(buf) > handle.size:
                            raise ArtifactIntegrityError(
                                f"download of {handle.key[:16]}… exceeded its declared {handle.size} bytes"
                            )
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"download of {handle.key[:16]}… failed: {type(exc).__name__}: {exc}"
                ) from exc
            if len(buf) != handle.size:
                raise RegistryUnavailableError(
                    f"download of {handle.key[:16]}… stopped at {len(buf)}/{handle.size} bytes"
                )
            return buf

        return self._retrying(once)

    def download_verified(self, handle: Handle, expect: art.Expectation) -> tuple[art.Artifact, bytearray]:
        """Download, verify (tree hash, header == handle, signature when keys are trusted) and decode."""
        t0 = time.perf_counter()
        buf = self.download_blob(handle)
        self.last_download_seconds = time.perf_counter() - t0
        artifact = art.decode(buf, expect=expect, limits=self.limits)
        if artifact.header != handle.header:
            raise ArtifactIntegrityError(
                f"downloaded artifact header differs from the registry's handle for {handle.key[:16]}…"
            )
        if self.trusted_keys is not None:
            verify_signature(handle, self.trusted_keys)
        return artifact, buf

    def download(self, handle: Handle, expect: art.Expectation) -> art.Artifact:
        return self.download_verified(handle, expect)[0]

    def publish(self, blob: bytes, visibility: str = "restricted", signing_key: Any = None) -> Handle:
        """Publish artifact bytes under their header's key (PUT is idempotent for identical bytes)."""
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
        header = art.read_header(blob, self.limits)
        headers = {"X-KVAgent-Visibility": visibility, "Content-Type": "application/octet-stream"}
        if signing_key is not None:
            headers["X-KVAgent-Signature"] = sign(header.payload_sha256, signing_key)

        def once() -> Handle:
            resp = self._send("PUT", f"/v1/artifacts/{header.key}", "publish", content=blob, headers=headers)
            if resp.status_code not in (200, 201):
                raise _error_for(resp, "publish")
            return parse_handle(_json(resp), key=header.key, limits=self.limits)

        return self._retrying(once)

    def grant(self, key: str, principal: str) -> None:
        """Let ``principal`` see a restricted artifact we own."""
        validate_key(key)

        def once() -> None:
            resp = self._send(
                "POST", f"/v1/artifacts/{key}/entitlements", "grant", json={"principal": principal}
            )
            if resp.status_code not in (200, 201, 204):
                raise _error_for(resp, "grant")

        self._retrying(once)

    def generate_stream(self, key: str, suffix_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        """Continue generation on the registry from ``key``'s KV; yields token ids as they arrive.

        The request is retried until the stream starts, never after a token has been yielded.
        """
        validate_key(key)
        body = {
            "suffix_ids": [int(t) for t in suffix_ids],
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop_token_ids": list(params.stop_token_ids),
        }

        def start() -> httpx.Response:
            try:
                req = self._http.build_request("POST", f"/v1/artifacts/{key}/generate", json=body)
                resp = self._http.send(req, stream=True)
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"registry generate failed: {type(exc).__name__}: {exc}"
                ) from exc
            if resp.status_code != 200:
                resp.read()
                resp.close()
                raise _error_for(resp, "generate")
            return resp

        resp = self._retrying(start)
        try:
            yield from _ndjson_tokens(resp, params.max_new_tokens)
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"registry generate stream broke: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            resp.close()


def _ndjson_tokens(resp: httpx.Response, max_new_tokens: int) -> Iterator[int]:
    n = 0
    for line in resp.iter_lines():
        if not line.strip():
            continue
        if len(line) > 4096:
            raise RegistryProtocolError("generate stream line too long")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise RegistryProtocolError(f"generate stream sent malformed JSON: {line[:80]!r}") from exc
        if isinstance(msg, Mapping) and msg.get("done") is True:
            return
        tok = msg.get("token") if isinstance(msg, Mapping) else None
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise RegistryProtocolError(f"generate stream sent an unexpected message: {line[:80]!r}")
        n += 1
        if n > max_new_tokens:
            raise RegistryProtocolError(
                f"generate stream sent more than the {max_new_tokens} tokens asked for"
            )
        yield tok
    raise RegistryUnavailableError("generate stream ended without its done message")
