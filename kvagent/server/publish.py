"""Validation of an uploaded artifact file before it is published (signatures: kvagent.artifacts.signing)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import format as art
from ..artifacts import signing
from ..artifacts.signing import Signature
from ..errors import ArtifactFormatError, ArtifactMismatchError
from ..kvcache.identity import block_hashes

__all__ = ["Signature", "Validated", "parse_signature", "validate_upload"]


@dataclass(frozen=True)
class Validated:
    header: art.ArtifactHeader
    size: int
    block_hashes: list[str]
    signature: Signature | None


def parse_signature(value: str | None) -> Signature | None:
    """Parse an ``X-KVAgent-Signature`` value (None when the header is absent); v3 or v2, never v1."""
    return None if value is None else signing.parse(value)


def validate_upload(path: Path, key: str, signature: Signature | None, block_size: int) -> Validated:
    """Check container, header, key, checksum, content address and signature; compute block hashes.

    Raises an ArtifactError (or InvalidKeyError) describing the first problem found.
    """
    size = path.stat().st_size
    if size < 8:
        raise ArtifactFormatError(
            f"artifact is {size} bytes; a safetensors file starts with an 8-byte length"
        )
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    header = art.read_header(buf)
    if header.key != key:
        raise ArtifactMismatchError(
            f"artifact header key {header.key[:16]}… does not match the URL key {key[:16]}…"
        )
    # decode verifies the payload tree hash, the decoded content, and that the key is the content
    # address of the header's context and the token ids
    ids = art.decode(buf).kv.token_ids.numpy().copy()
    if signature is not None:
        signing.verify(signature, header)
    return Validated(header, size, block_hashes(art.context_of(header), ids, block_size), signature)
