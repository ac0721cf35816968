"""Content addressing: fingerprints, document keys and prefix block hashes.

Everything here is pure: the same inputs give the same digests in every process, on every
machine (sha256 over a canonical encoding; Python's salted ``hash()`` is never used).
A document key covers every input that changes the KV: format version, model weights and
config, tokenizer and chat template, dtype, position offset, prompt-template prefix and the
exact token ids.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..errors import InvalidKeyError
from .hashing import payload_digest

#: Version of the KV artifact format and of the key derivation. Bump on any change to either.
FORMAT_VERSION = 1
#: Tokens per block of the prefix hash chain.
DEFAULT_BLOCK_SIZE = 256

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")  # \Z, not $: "$" also matches before a trailing newline


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` as canonical JSON bytes (sorted keys, no spaces, ASCII only)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def validate_key(key: str) -> str:
    """Return ``key`` if it is a 64-character lowercase hex digest, else raise InvalidKeyError."""
    if not isinstance(key, str) or not _HEX64.match(key):
        raise InvalidKeyError(f"expected a 64-character lowercase hex sha256 key, got {key!r:.80}")
    return key


def token_tuple(token_ids: Sequence[int] | np.ndarray | Any) -> tuple[int, ...]:
    """``token_ids`` (a sequence of ints, a NumPy array or a tensor) as a tuple of Python ints.

    Integers only: a float or string id is a caller's bug, which ``int()`` would silently truncate or parse.
    """
    if hasattr(token_ids, "tolist"):  # NumPy array or tensor: one conversion, not one 0-d object per element
        token_ids = token_ids.tolist()
    try:
        return tuple(map(operator.index, token_ids))
    except TypeError as exc:
        raise InvalidKeyError(f"token ids must be integers: {exc}") from None


def token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Encode token ids canonically as little-endian uint32."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidKeyError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise InvalidKeyError("token ids must lie in [0, 2**32)")
    return arr.astype("<u4").tobytes()


def tensor_fingerprint(named_tensors: Iterable[tuple[str, Any]], config: Mapping[str, Any]) -> str:
    """sha256 over a model config and its named tensors (name, dtype, shape and raw bytes, sorted by name)."""
    import torch

    h = hashlib.sha256(b"kvagent-model\0")
    h.update(canonical_json(_jsonable(config)))
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]))
        t = t.contiguous().reshape(-1)
        h.update(bytes.fromhex(payload_digest(t.view(torch.uint8).numpy().data if t.numel() else b"")))
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Turn a config dict into something canonical_json accepts (tuples, dtypes, sets, objects)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(repr(v) for v in obj)
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return repr(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over everything of a tokenizer that maps text to ids: vocabulary/merges, special tokens, chat
    template."""
    h = hashlib.sha256(b"kvagent-tokenizer\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(canonical_json(sorted(tokenizer.get_vocab().items())))
    h.update(canonical_json(_jsonable(getattr(tokenizer, "special_tokens_map", {}))))
    h.update(canonical_json(getattr(tokenizer, "chat_template", None)))
    h.update(canonical_json([type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None)]))
    return h.hexdigest()


@dataclass(frozen=True)
class KeyContext:
    """Everything besides the token ids that determines a KV cache."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    position_offset: int = 0
    template_hash: str = sha256_hex(b"")
    format_version: int = FORMAT_VERSION

    def digest(self) -> bytes:
        return hashlib.sha256(b"kvagent-context\0" + canonical_json(asdict(self))).digest()


def document_key(ctx: KeyContext, token_ids: Sequence[int] | np.ndarray) -> str:
    """The content address of a document's KV: sha256 over the context and the exact token ids."""
    tb = token_bytes(token_ids)
    body = {
        "context": asdict(ctx),
        "n_tokens": len(tb) // 4,
        "tokens_sha256": hashlib.sha256(tb).hexdigest(),
    }
    return sha256_hex(b"kvagent-key\0", canonical_json(body))


def block_hashes(
    ctx: KeyContext, token_ids: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[str]:
    """Chained hashes of each *full* block of ``block_size`` tokens.

    ``result[i]`` commits to the context and tokens ``[0, (i+1)*block_size)``, so two prompts share
    ``result[i]`` exactly when they share that whole prefix.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    tb = token_bytes(token_ids)
    n_full = (len(tb) // 4) // block_size
    prev = ctx.digest()
    out = []
    step = block_size * 4
    for i in range(n_full):
        prev = hashlib.sha256(prev + tb[i * step : (i + 1) * step]).digest()
        out.append(prev.hex())
    return out


def template_hash(prefix_token_ids: Sequence[int], template_text: str | None) -> str:
    """Hash of the prompt-template prefix placed before a document (its ids and the template source)."""
    return sha256_hex(b"kvagent-template\0", token_bytes(prefix_token_ids), canonical_json(template_text))


def salted(ctx: KeyContext, salt: str) -> KeyContext:
    """``ctx`` in a private namespace: keys and block hashes under it differ from every other namespace's.

    The salt is folded into the template hash (which every key and block hash commits to), so a
    principal's private prompt KV can never be found from another principal's token ids. Salts are
    derived by the server from the authenticated identity, never chosen by clients.
    """
    if not salt:
        return ctx
    return replace(
        ctx, template_hash=sha256_hex(b"kvagent-salt\0", salt.encode(), b"\0", ctx.template_hash.encode())
    )
