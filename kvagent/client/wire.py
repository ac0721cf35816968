"""What the registry answers, read strictly: handles, JSON bodies and error statuses.

Anything unexpected is a ``RegistryProtocolError``, never a ``KeyError`` or a half-parsed object; a
non-success status becomes the matching ``RegistryError`` (kvagent.errors), so callers and the retry policy
branch on types, never on message text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from ..artifacts import format as art
from ..artifacts import signing
from ..artifacts.signing import Signature
from ..artifacts.source import Handle
from ..errors import (
    ArtifactError,
    KVAgentError,
    RegistryAuthError,
    RegistryConflictError,
    RegistryError,
    RegistryNotImplementedError,
    RegistryPaymentRequiredError,
    RegistryProtocolError,
    RegistryRejectedError,
    RegistryUnavailableError,
)
from ..payments.terms import PAYMENT_REQUIRED_HEADER, decode_header

VISIBILITIES = ("restricted", "public")
HEX64_LEN, SIG_HEX_LEN = 64, 128
MAX_JSON_BYTES = 1 << 20
MAX_RETRY_AFTER_S = 30.0


def hex_field(v: Any, n: int, what: str) -> str:
    """``v`` if it is ``n`` lowercase hex characters, else RegistryProtocolError naming ``what``."""
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
    hkey = hex_field(obj["key"], HEX64_LEN, "a handle key")
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
            f"handle size {size!r:.40} is impossible for a {header.payload_bytes}-byte payload (limit "
            f"{max_size})"
        )
    if obj["visibility"] not in VISIBILITIES:
        raise RegistryProtocolError(f"unknown visibility {obj['visibility']!r:.40}")
    if not isinstance(obj["owner"], str):
        raise RegistryProtocolError("handle owner must be a string")
    url = obj["blob_url"]
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        raise RegistryProtocolError(f"blob_url must be a path on the registry, got {url!r:.80}")
    price, currency = obj.get("price"), obj.get("currency")
    if price is not None and (isinstance(price, bool) or not isinstance(price, int) or price < 0):
        raise RegistryProtocolError(f"handle price must be a non-negative integer, got {price!r:.40}")
    if currency is not None and not isinstance(currency, str):
        raise RegistryProtocolError("handle currency must be a string")
    return Handle(
        hkey, header, size, obj["visibility"], obj["owner"], url, _parse_signature(obj["signature"]),
        price, currency,
    )


def _parse_signature(sig: Any) -> Signature | None:
    if sig is None:
        return None
    if not isinstance(sig, Mapping) or sig.get("alg") not in signing.ALGS:
        raise RegistryProtocolError(f"unsupported signature record {sig!r:.80}")
    return Signature(
        sig["alg"],
        hex_field(sig.get("public_key"), HEX64_LEN, "a public key"),
        hex_field(sig.get("signature"), SIG_HEX_LEN, "a signature"),
    )


def read_json(resp: httpx.Response) -> Any:
    """The JSON body of a (read) answer: RegistryProtocolError when too large or malformed."""
    if len(resp.content) > MAX_JSON_BYTES:
        raise RegistryProtocolError(f"registry JSON response of {len(resp.content)} bytes is too large")
    try:
        return json.loads(resp.content)
    except (ValueError, RecursionError) as exc:
        raise RegistryProtocolError(f"registry sent malformed JSON ({resp.status_code}): {exc}") from exc


def json_object(resp: httpx.Response, what: str) -> Mapping[str, Any]:
    """The JSON object of a success answer (RegistryProtocolError for any other JSON)."""
    body = read_json(resp)
    if not isinstance(body, Mapping):
        raise RegistryProtocolError(f"registry {what} answer must be a JSON object")
    return body


def int_field(body: Any, name: str, what: str) -> int:
    """``body[name]`` when it is an integer (not a bool), else RegistryProtocolError."""
    v = body.get(name) if isinstance(body, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RegistryProtocolError(f"registry {what} answer lacks an integer {name!r}")
    return v


def retry_after(resp: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds (capped), None when absent or an HTTP date."""
    raw = resp.headers.get("retry-after")
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_S) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def error_for(resp: httpx.Response, what: str) -> RegistryError:
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
    if code == 402:
        return RegistryPaymentRequiredError(msg, quote(resp))
    if code == 501:
        return RegistryNotImplementedError(msg)
    if code == 429 or code >= 500 and code != 501:
        return RegistryUnavailableError(msg, retry_after=retry_after(resp))
    if code in (401, 403):
        return RegistryAuthError(msg + " (check the token)")
    if code == 409:
        return RegistryConflictError(msg)
    if code in (413, 422):
        return RegistryRejectedError(msg)
    return RegistryError(msg)


def quote(resp: httpx.Response) -> dict[str, Any]:
    """The machine-readable quote of a 402 answer (validated; empty if the registry sent none)."""
    try:
        q = json.loads(resp.content[:4096]).get("quote")
    except (ValueError, RecursionError, AttributeError, httpx.ResponseNotRead):
        return {}
    if not isinstance(q, Mapping):
        return {}
    ints = all(isinstance(q.get(f), int) and not isinstance(q.get(f), bool) for f in ("price", "balance"))
    if not ints or not isinstance(q.get("currency"), str):
        return {}
    return {f: q.get(f) for f in ("key", "price", "currency", "balance", "reason")}


def error_code(resp: httpx.Response) -> str:
    """The machine-readable ``error`` of a JSON error body ("" when there is none)."""
    try:
        body = json.loads(resp.content[:4096]) if resp.content else None
    except (ValueError, RecursionError, httpx.ResponseNotRead):
        return ""
    code = body.get("error") if isinstance(body, Mapping) else None
    return code if isinstance(code, str) else ""


def x402_error(resp: httpx.Response) -> str:
    """The ``error`` of a 402's ``PAYMENT-REQUIRED`` header (why a payment was refused), if any."""
    raw = resp.headers.get(PAYMENT_REQUIRED_HEADER)
    if raw is None:
        return ""
    try:
        err = decode_header(raw).get("error")
    except KVAgentError:
        return ""
    return str(err)[:200] if err else ""
