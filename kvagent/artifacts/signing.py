"""ed25519 signatures over an artifact's whole identity (signature version 3).

A v3 signature covers a canonical encoding of the artifact header — format and version, key, model and
tokenizer fingerprints, dtype, token count, position offset, template hash, layout, codec, payload and
content digests, and the ``engine`` that computed the KV (null when the header names none) — so a signed
payload cannot be re-served under a header that claims another model, tokenizer, template, offset, key or
engine (a reader with ``engines="same"`` trusts that field). ``created_at`` and ``publisher`` are
informational and not signed (the public key names the signer).

Version 2 (``alg = "ed25519-v2"``) signed the same fields but ``engine``; v2 signatures are still accepted
and verified (records and clients that predate v3), over those fields only: they say nothing about the
engine. New signatures are v3.

Version 1 (``alg = "ed25519"``) signed the 32 bytes of the payload digest only; such signatures are
parsed so old records stay readable, but never verify: a reader that trusts keys refuses them.

Wire form (``X-KVAgent-Signature``): ``ed25519-v3:<64 hex public key>:<128 hex signature>`` (or ``-v2``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import ArtifactFormatError, ArtifactIntegrityError
from .format import ArtifactHeader

ALG = "ed25519-v3"
V2_ALG = "ed25519-v2"
LEGACY_ALG = "ed25519"
ALGS = (ALG, V2_ALG, LEGACY_ALG)
#: Domain separation, per version: a signature can never be mistaken for one over anything else.
DOMAINS = {ALG: b"kvagent-artifact-signature-v3\n", V2_ALG: b"kvagent-artifact-signature-v2\n"}
DOMAIN = DOMAINS[ALG]
#: The header fields a v2 signature binds, in this order.
V2_FIELDS = (
    "format",
    "format_version",
    "key",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "dtype",
    "token_count",
    "position_offset",
    "template_hash",
    "layout",
    "codec",
    "payload_sha256",
    "payload_bytes",
    "content_sha256",
)
#: The header fields a v3 (current) signature binds: v2's and the engine that computed the KV.
SIGNED_FIELDS = (*V2_FIELDS, "engine")
_FIELDS = {ALG: SIGNED_FIELDS, V2_ALG: V2_FIELDS}
_WIRE = re.compile(r"^(ed25519(?:-v[23])?):([0-9a-f]{64}):([0-9a-f]{128})\Z")


@dataclass(frozen=True)
class Signature:
    """A signature record: algorithm, hex public key, hex signature."""

    alg: str
    public_key: str
    signature: str

    def to_json(self) -> dict[str, str]:
        return {"alg": self.alg, "public_key": self.public_key, "signature": self.signature}

    def header_value(self) -> str:
        """The ``X-KVAgent-Signature`` value."""
        return f"{self.alg}:{self.public_key}:{self.signature}"


def canonical_header(header: ArtifactHeader, alg: str = ALG) -> bytes:
    """The bytes an ``alg`` signature signs: its domain tag, then its fields of ``header`` as compact sorted
    JSON (v3: SIGNED_FIELDS, ``engine`` null when absent; v2: V2_FIELDS)."""
    full = {**header.to_json(), "engine": header.engine}
    fields = {name: full[name] for name in _FIELDS[alg]}
    return DOMAINS[alg] + json.dumps(fields, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode()


def public_key_hex(private_key: Any) -> str:
    """The hex public key of an ed25519 private key (an ``Ed25519PrivateKey`` or its 32 raw bytes)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return _private(private_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign(header: ArtifactHeader, private_key: Any) -> Signature:
    """A v3 signature of ``header`` by ``private_key`` (an ``Ed25519PrivateKey`` or 32 raw bytes)."""
    sk = _private(private_key)
    return Signature(ALG, public_key_hex(sk), sk.sign(canonical_header(header)).hex())


def parse(value: str) -> Signature:
    """Parse an ``X-KVAgent-Signature`` value: v3, or v2 (from clients that predate v3); never v1."""
    m = _WIRE.match(value.strip().lower())
    if not m:
        raise ArtifactFormatError(
            f"X-KVAgent-Signature must be '{ALG}:<64 hex public key>:<128 hex signature>'"
        )
    if m.group(1) == LEGACY_ALG:
        raise ArtifactFormatError(
            f"'{LEGACY_ALG}' signatures cover the payload digest only and are no longer accepted; "
            f"sign the header with kvagent.signing.sign ('{ALG}')"
        )
    return Signature(m.group(1), m.group(2), m.group(3))


def verify(sig: Signature, header: ArtifactHeader, trusted_keys: Collection[str] | None = None) -> None:
    """Raise ArtifactIntegrityError unless ``sig`` is a valid v3 (or v2) signature of ``header``.

    With ``trusted_keys`` (hex public keys) the signer must also be one of them.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    what = f"artifact {header.key[:16]}…"
    if sig.alg not in _FIELDS:
        raise ArtifactIntegrityError(
            f"{what} carries a '{sig.alg}' signature, which covers the payload digest only and not the "
            f"header; it must be re-signed as '{ALG}'"
        )
    if trusted_keys is not None and sig.public_key not in {k.lower() for k in trusted_keys}:
        raise ArtifactIntegrityError(
            f"{what} is signed by {sig.public_key[:16]}…, which is not a trusted key"
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig.public_key)).verify(
            bytes.fromhex(sig.signature), canonical_header(header, sig.alg)
        )
    except (InvalidSignature, ValueError) as exc:
        raise ArtifactIntegrityError(
            f"the {sig.alg} signature on {what} does not verify over its header (key, fingerprints, digests"
            f"{', engine' if sig.alg == ALG else ''})"
        ) from exc


def _private(private_key: Any) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(private_key, (bytes, bytearray)):
        return Ed25519PrivateKey.from_private_bytes(bytes(private_key))
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey or 32 raw bytes, got {type(private_key).__name__}")
    return private_key
