"""Validation of an uploaded artifact file before it is published."""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path

from .. import artifact as art
from ..errors import ArtifactFormatError, ArtifactIntegrityError, ArtifactMismatchError
from ..identity import block_hashes

_SIG = re.compile(r"^ed25519:([0-9a-f]{64}):([0-9a-f]{128})\Z")


@dataclass(frozen=True)
class Signature:
    public_key: str
    signature: str

    def to_json(self) -> dict[str, str]:
        return {"alg": "ed25519", "public_key": self.public_key, "signature": self.signature}


@dataclass(frozen=True)
class Validated:
    header: art.ArtifactHeader
    size: int
    block_hashes: list[str]
    signature: Signature | None


def parse_signature(value: str | None) -> Signature | None:
    """Parse ``ed25519:<pubkey hex>:<sig hex>`` (None when the header is absent)."""
    if value is None:
        return None
    m = _SIG.match(value.strip().lower())
    if not m:
        raise ArtifactFormatError("X-KVAgent-Signature must be 'ed25519:<64 hex public key>:<128 hex signature>'")
    return Signature(m.group(1), m.group(2))


def verify_signature(sig: Signature, payload_sha256: str) -> None:
    """Check an ed25519 signature over the 32 raw bytes of the payload digest."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig.public_key)).verify(
            bytes.fromhex(sig.signature), bytes.fromhex(payload_sha256)
        )
    except (InvalidSignature, ValueError) as exc:
        raise ArtifactIntegrityError("the ed25519 signature does not verify over the payload digest") from exc


def validate_upload(path: Path, key: str, signature: Signature | None, block_size: int) -> Validated:
    """Check container, header, key, checksum, content address and signature; compute block hashes.

    Raises an ArtifactError (or InvalidKeyError) describing the first problem found.
    """
    size = path.stat().st_size
    if size < 8:
        raise ArtifactFormatError(f"artifact is {size} bytes; a safetensors file starts with an 8-byte length")
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    header = art.read_header(buf)
    if header.key != key:
        raise ArtifactMismatchError(f"artifact header key {header.key[:16]}… does not match the URL key {key[:16]}…")
    # decode verifies the payload tree hash, the decoded content, and that the key is the content
    # address of the header's context and the token ids
    ids = art.decode(buf).kv.token_ids.numpy().copy()
    if signature is not None:
        verify_signature(signature, header.payload_sha256)
    return Validated(header, size, block_hashes(art.context_of(header), ids, block_size), signature)
