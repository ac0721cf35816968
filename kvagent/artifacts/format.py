"""KV artifact format v1: one safetensors file with a strict kvagent JSON header.

Layout (see docs/artifact-format.md)::

    u64 little-endian N | N bytes of safetensors JSON header | data section
    tensors: "k.{i}", "v.{i}" as [1, H, S, D] in the KV dtype, "token_ids" as int64 [S]
    __metadata__ = {"kvagent": "<JSON header>"}

The header's ``payload_sha256`` is the tree hash (kvagent.kvcache.hashing) of the data section and is
checked before any tensor is built. Reading validates every size and offset first and never
unpickles anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..errors import ArtifactFormatError, ArtifactIntegrityError, ArtifactMismatchError, ArtifactTooLargeError
from ..kvcache.hashing import payload_digest, tree_digests
from ..kvcache.identity import FORMAT_VERSION, KeyContext, document_key
from ..kvcache.tensors import KVCache, KVLayout, KVSource
from . import codecs

FORMAT_NAME = "kvagent-kv"
#: Codecs an artifact may use: "raw" stores K/V as plain safetensors tensors; the others store each
#: K/V tensor's encoded bytes as a uint8 tensor (see kvagent.artifacts.codecs). All are lossless.
CODECS = codecs.ARTIFACT_CODECS

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8,
}
_ST_NAMES = {dt: name for name, dt in _ST_DTYPES.items()}
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")  # \Z, not $: "$" also matches before a trailing newline
_TENSOR_NAME = re.compile(r"^(k|v)\.(0|[1-9][0-9]{0,3})$")


@dataclass(frozen=True)
class Limits:
    """Size limits applied before anything is parsed or allocated."""

    max_container_header: int = 1 << 20
    max_header_json: int = 16 << 10
    max_payload_bytes: int = 64 << 30
    max_layers: int = 1024
    max_tokens: int = 1 << 22
    max_publisher_len: int = 256


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ArtifactHeader:
    """The kvagent header of an artifact (format v1). Every field is required and type-checked."""

    key: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    token_count: int
    position_offset: int
    template_hash: str
    layout: KVLayout
    codec: str
    created_at: float
    publisher: str | None
    payload_sha256: str
    payload_bytes: int
    content_sha256: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: the engine that computed the KV ("vllm 0.32.0") when its writer says so; older artifacts lack it
    engine: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layout"] = asdict(self.layout)
        if d["engine"] is None:  # absent rather than null: readers that predate the field still accept it
            del d["engine"]
        return d


@dataclass(frozen=True)
class Expectation:
    """What the reader requires of an artifact; a field left None is not checked."""

    key: str | None = None
    model_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    dtype: str | None = None
    layout: KVLayout | None = None


@dataclass(frozen=True)
class Artifact:
    header: ArtifactHeader
    kv: KVCache


def bytes_name(h: ArtifactHeader) -> str:
    """A name of a decoded artifact's K/V bytes: its key (model, tokenizer, dtype, ids) and its checked
    payload digest under its codec (``decode`` verifies the payload against it, or the store its own file)."""
    return f"{h.key}:{h.codec}:{h.payload_sha256}"


def published_source(h: ArtifactHeader) -> KVSource:
    """The source of a published artifact's decoded KV: its bytes, the same for every reader entitled to
    it."""
    return KVSource("artifact:" + bytes_name(h), h.token_count, published=True, artifact=h.key)


def stored_source(h: ArtifactHeader) -> KVSource:
    """The source of a KV read from a local store: its bytes, private to the namespace whose key it has."""
    return KVSource("stored:" + bytes_name(h), h.token_count)


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class _Parsed:
    header: ArtifactHeader
    entries: dict[str, _Entry] = field(default_factory=dict)
    data_offset: int = 0


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ArtifactFormatError(f"KV dtype {dtype} is not supported; expected one of {sorted(_DTYPES)}")


def encode_parts(
    kv: KVCache,
    *,
    key: str | None = None,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    template_hash: str,
    position_offset: int = 0,
    publisher: str | None = None,
    created_at: float | None = None,
    codec: str = "raw",
    engine: str | None = None,
) -> tuple[ArtifactHeader, list[memoryview]]:
    """``encode``, with the artifact as the buffers it concatenates (the last ones share ``kv``'s memory).

    For a writer that needs no single copy of the bytes (the local store writes them to a file in turn).
    """
    ctx = KeyContext(
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        dtype=dtype_name(kv.dtype),
        position_offset=position_offset,
        template_hash=template_hash,
    )
    derived = document_key(ctx, kv.token_ids.numpy())
    if key is not None and key != derived:
        raise ArtifactMismatchError(
            f"key {key[:16]}… does not match the key {derived[:16]}… its fields and token ids derive"
        )

    if codec not in CODECS:
        raise ArtifactFormatError(
            f"codec {codec!r} cannot be used for artifacts (lossless codecs: {list(CODECS)})"
        )
    # artifacts are host bytes: a KV on an accelerator is copied to the CPU once, here
    ordered = [(name, t.detach().cpu()) for name, t in _ordered(kv)]
    tensors: dict[str, torch.Tensor] = {}
    if codec == "raw":
        tensors.update((name, t.detach().contiguous()) for name, t in ordered)
    else:
        enc = codecs.get(codec).encode
        blobs = list(codecs.pool().map(lambda item: enc(item[1]), ordered))
        tensors.update(
            (name, torch.frombuffer(bytearray(b), dtype=torch.uint8))
            for (name, _), b in zip(ordered, blobs, strict=True)
        )
    tensors["token_ids"] = kv.token_ids.detach().to("cpu", torch.int64).contiguous()
    # the container is laid out as safetensors would, but hashed and written from the tensors' own memory: one
    # parallel pass for both digests and a single copy into the artifact (not serialise, hash, re-join)
    st_header, parts = _container(tensors)
    data_bytes = sum(len(p) for p in parts)
    payload, *content = tree_digests([parts] + [[_bytes_of(t)] for _, t in ordered])
    header = ArtifactHeader(
        key=derived,
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        dtype=dtype_name(kv.dtype),
        token_count=kv.n_tokens,
        position_offset=position_offset,
        template_hash=template_hash,
        layout=kv.layout,
        codec=codec,
        created_at=float(time.time() if created_at is None else created_at),
        publisher=publisher,
        payload_sha256=payload,
        payload_bytes=data_bytes,
        content_sha256=_content_root(content),
        engine=engine,
    )
    _validate_header_fields(header.to_json(), DEFAULT_LIMITS)  # never write what we would refuse to read
    st_header["__metadata__"] = {
        "kvagent": json.dumps(header.to_json(), sort_keys=True, separators=(",", ":"))
    }
    hb = json.dumps(st_header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return header, [memoryview(len(hb).to_bytes(8, "little")), memoryview(hb), *parts]


def encode(
    kv: KVCache,
    *,
    key: str | None = None,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    template_hash: str,
    position_offset: int = 0,
    publisher: str | None = None,
    created_at: float | None = None,
    codec: str = "raw",
    engine: str | None = None,
) -> tuple[ArtifactHeader, bytes]:
    """Serialise ``kv`` into artifact bytes; returns the header written and the bytes.

    The key is derived from the other fields and the token ids; a ``key`` passed in must equal it.
    """
    header, parts = encode_parts(
        kv,
        key=key,
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        template_hash=template_hash,
        position_offset=position_offset,
        publisher=publisher,
        created_at=created_at,
        codec=codec,
        engine=engine,
    )
    return header, b"".join(parts)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy().data).cast("B")


def _container(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], list[memoryview]]:
    """The safetensors header (``__metadata__`` to be filled) and the data section's pieces, in file order."""
    order = _st_order(tuple((name, _ST_NAMES[t.dtype]) for name, t in tensors.items()))
    st: dict[str, Any] = {}
    parts: list[memoryview] = []
    offset = 0
    for name in order:
        if name == "__metadata__":
            st[name] = {}
            continue
        t = tensors[name]
        b = _bytes_of(t)
        st[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        parts.append(b)
        offset += len(b)
    return st, parts


@functools.lru_cache(maxsize=64)
def _st_order(spec: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The order safetensors writes these (name, dtype) tensors in, and its header keys, asked of safetensors
    itself.

    It sorts by dtype, then name, never by size: a one-element tensor of each stands in, so an artifact stays
    byte-for-byte what ``safetensors.torch.save`` would write (the same KV gives the same payload digest).
    """
    from safetensors.torch import save

    blob = save({name: torch.zeros(1, dtype=_ST_DTYPES[dt]) for name, dt in spec}, metadata={"kvagent": "{}"})
    n = int.from_bytes(blob[:8], "little")
    st = json.loads(blob[8 : 8 + n])
    return tuple(st)


def _content_root(tensor_digests: Iterable[str]) -> str:
    h = hashlib.sha256(b"kvagent-content-v1\0")
    for d in tensor_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def read_header(buf: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> ArtifactHeader:
    """Validate the container and header of an artifact without checking or building its payload."""
    return _parse(memoryview(buf), limits).header


#: ``integrity(whole_artifact)``: raises ArtifactIntegrityError unless the bytes are the ones a trusted
#: digest was computed over (see ``decode``).
IntegrityCheck = Callable[[memoryview], None]


def decode(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    *,
    expect: Expectation | None = None,
    limits: Limits = DEFAULT_LIMITS,
    integrity: IntegrityCheck | None = None,
    timings: dict[str, float] | None = None,
) -> Artifact:
    """Validate and decode an artifact: sizes, schema, expectation, checksum, then tensors.

    The checksum is the header's ``payload_sha256`` tree hash, unless ``integrity`` is given: then it
    is called instead with the whole artifact's bytes and must raise ArtifactIntegrityError if they
    differ from those its own digest was taken of. The local store passes its xxh3-128 check of the
    file it wrote (sha256 was verified, or computed, before that digest was recorded).
    Tensors share memory with ``buf`` when it is writable (a bytearray or a private mmap);
    immutable ``bytes`` are copied once. ``timings``, if given, receives the seconds spent in
    "parse", "integrity" and "decode" (tensors, codec, key re-derivation).
    """
    t0 = time.perf_counter()
    if isinstance(buf, bytes):
        buf = bytearray(buf)
    view = memoryview(buf)
    parsed = _parse(view, limits)
    h = parsed.header
    if expect is not None:
        check_expectation(h, expect)
    t1 = time.perf_counter()
    if integrity is not None:
        integrity(view)
    else:
        digest = payload_digest(view[parsed.data_offset :])
        if digest != h.payload_sha256:
            raise ArtifactIntegrityError(
                f"payload checksum mismatch for artifact {h.key[:16]}…: header says "
                f"{h.payload_sha256[:16]}…, "
                f"data hashes to {digest[:16]}… (corrupted or tampered; it will be recomputed)"
            )
    t2 = time.perf_counter()
    with warnings.catch_warnings():
        # a read-only buffer (the caller's); we never write to it
        warnings.simplefilter("ignore", UserWarning)
        tensors = {name: _tensor(buf, parsed.data_offset, e) for name, e in parsed.entries.items()}
    L = h.layout.num_layers
    if h.codec != "raw":
        shape = (1, h.layout.num_kv_heads, h.token_count, h.layout.head_dim)
        dec = codecs.get(h.codec).decode
        names = [n for n in tensors if n != "token_ids"]
        decoded = codecs.pool().map(lambda n: dec(tensors[n].numpy().data, _DTYPES[h.dtype], shape), names)
        tensors.update(zip(names, decoded, strict=True))
        got = content_digest(tensors[n] for n, _ in _ordered_names(L))
        if got != h.content_sha256:
            raise ArtifactIntegrityError(
                f"decoded tensors of {h.key[:16]}… hash to {got[:16]}…, the header says "
                f"{h.content_sha256[:16]}… "
                f"({h.codec} decoding went wrong)"
            )
    kv = KVCache(
        keys=tuple(tensors[f"k.{i}"] for i in range(L)),
        values=tuple(tensors[f"v.{i}"] for i in range(L)),
        token_ids=tensors["token_ids"],
    )
    ids = kv.token_ids
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**32):
        raise ArtifactFormatError("artifact token ids are out of range")
    derived = document_key(context_of(h), ids.numpy())
    if derived != h.key:
        raise ArtifactIntegrityError(
            f"artifact claims key {h.key[:16]}… but its header fields and token ids derive {derived[:16]}… "
            "(the header or the token ids were altered)"
        )
    if timings is not None:
        timings.update(parse=t1 - t0, integrity=t2 - t1, decode=time.perf_counter() - t2)
    return Artifact(header=h, kv=kv)


def _ordered_names(num_layers: int) -> list[tuple[str, int]]:
    return [(f"{kind}.{i}", i) for i in range(num_layers) for kind in ("k", "v")]


def _ordered(kv: KVCache) -> list[tuple[str, torch.Tensor]]:
    """K/V tensors in canonical order: k.0, v.0, k.1, v.1, ..."""
    out = []
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        out += [(f"k.{i}", k), (f"v.{i}", v)]
    return out


def content_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over the tree hashes of the decoded K/V tensors' bytes, in canonical order."""
    return _content_root(tree_digests([[_bytes_of(t.detach().contiguous())] for t in tensors]))


def context_of(h: ArtifactHeader) -> KeyContext:
    """The key context an artifact header commits to."""
    return KeyContext(
        model_fingerprint=h.model_fingerprint,
        tokenizer_fingerprint=h.tokenizer_fingerprint,
        dtype=h.dtype,
        position_offset=h.position_offset,
        template_hash=h.template_hash,
        format_version=h.format_version,
    )


def check_expectation(h: ArtifactHeader, expect: Expectation) -> None:
    """Raise ArtifactMismatchError if ``h`` differs from any field ``expect`` sets."""
    for name in ("key", "model_fingerprint", "tokenizer_fingerprint", "dtype", "layout"):
        want = getattr(expect, name)
        got = getattr(h, name)
        if want is not None and want != got:
            raise ArtifactMismatchError(
                f"artifact {name} is {_short(got)} but this reader expects {_short(want)}; "
                "it was computed for another model/tokenizer/dtype and cannot be reused here"
            )


def _short(v: Any) -> str:
    s = str(v)
    return s[:16] + "…" if _HEX64.match(s) else s


def _tensor(buf: Any, base: int, e: _Entry) -> torch.Tensor:
    count = math.prod(e.shape)
    if count == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(buf, dtype=e.dtype, count=count, offset=base + e.start).view(e.shape)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ArtifactFormatError(f"duplicate JSON key {k!r:.40} in artifact header")
        d[k] = v
    return d


def _parse(view: memoryview, limits: Limits) -> _Parsed:
    total = len(view)
    if total < 8:
        raise ArtifactFormatError(
            f"artifact is {total} bytes; a safetensors file starts with an 8-byte length"
        )
    n = int.from_bytes(view[:8], "little")
    if n > limits.max_container_header:
        raise ArtifactTooLargeError(
            f"container header of {n} bytes exceeds the {limits.max_container_header}-byte limit"
        )
    if 8 + n > total:
        raise ArtifactFormatError(
            f"container header claims {n} bytes but the artifact has only {total - 8} (truncated?)"
        )
    try:
        st = json.loads(bytes(view[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ArtifactFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"container header is not valid JSON: {exc}") from exc
    if not isinstance(st, dict):
        raise ArtifactFormatError("container header must be a JSON object")
    meta = st.pop("__metadata__", None)
    if not isinstance(meta, dict) or set(meta) != {"kvagent"} or not isinstance(meta["kvagent"], str):
        raise ArtifactFormatError(
            'artifact has no kvagent header (expected __metadata__ = {"kvagent": "<json>"})'
        )
    raw = meta["kvagent"]
    if len(raw) > limits.max_header_json:
        raise ArtifactTooLargeError(
            f"kvagent header of {len(raw)} bytes exceeds the {limits.max_header_json}-byte limit"
        )
    try:
        hj = json.loads(raw, object_pairs_hook=_no_duplicates)
    except ArtifactFormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"kvagent header is not valid JSON: {exc}") from exc
    header = _validate_header_fields(hj, limits)
    data_offset = 8 + n
    data_len = total - data_offset
    if data_len != header.payload_bytes:
        raise ArtifactFormatError(
            f"data section is {data_len} bytes but the header declares {header.payload_bytes} (truncated or "
            "padded)"
        )
    entries = _validate_entries(st, header, data_len)
    return _Parsed(header=header, entries=entries, data_offset=data_offset)


_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "key": (str,),
    "model_fingerprint": (str,),
    "tokenizer_fingerprint": (str,),
    "dtype": (str,),
    "token_count": (int,),
    "position_offset": (int,),
    "template_hash": (str,),
    "layout": (dict,),
    "codec": (str,),
    "created_at": (int, float),
    "publisher": (str, type(None)),
    "payload_sha256": (str,),
    "payload_bytes": (int,),
    "content_sha256": (str,),
}
#: fields a header may omit (added after format v1 was fixed), with their types
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"engine": (str,)}


def _validate_header_fields(hj: Any, limits: Limits) -> ArtifactHeader:
    if not isinstance(hj, dict):
        raise ArtifactFormatError("kvagent header must be a JSON object")
    missing = set(_FIELDS) - set(hj)
    extra = set(hj) - set(_FIELDS) - set(_OPTIONAL_FIELDS)
    if missing or extra:
        raise ArtifactFormatError(
            f"kvagent header fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)[:5]}"
        )
    for name, types in (*_FIELDS.items(), *((n, t) for n, t in _OPTIONAL_FIELDS.items() if n in hj)):
        v = hj[name]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ArtifactFormatError(f"kvagent header field {name!r} has type {type(v).__name__}")
    if len(hj.get("engine") or "") > limits.max_publisher_len:
        raise ArtifactFormatError("engine name too long")
    if hj["format"] != FORMAT_NAME:
        raise ArtifactFormatError(f"not a kvagent artifact: format is {hj['format']!r:.40}")
    if hj["format_version"] != FORMAT_VERSION:
        raise ArtifactFormatError(
            f"artifact format version {hj['format_version']} is not supported by this kvagent (reads "
            f"{FORMAT_VERSION})"
        )
    for name in (
        "key",
        "model_fingerprint",
        "tokenizer_fingerprint",
        "template_hash",
        "payload_sha256",
        "content_sha256",
    ):
        if not _HEX64.match(hj[name]):
            raise ArtifactFormatError(f"kvagent header field {name!r} is not a sha256 hex digest")
    if hj["dtype"] not in _DTYPES:
        raise ArtifactFormatError(f"KV dtype {hj['dtype']!r:.20} is not one of {sorted(_DTYPES)}")
    if hj["codec"] not in CODECS:
        raise ArtifactFormatError(f"codec {hj['codec']!r:.20} is not supported (known: {list(CODECS)})")
    if not 0 < hj["token_count"] <= limits.max_tokens:
        raise ArtifactTooLargeError(f"token_count {hj['token_count']} is outside 1..{limits.max_tokens}")
    if not 0 <= hj["position_offset"] < (1 << 31):
        raise ArtifactFormatError("position_offset out of range")
    if not 0 <= hj["payload_bytes"] <= limits.max_payload_bytes:
        raise ArtifactTooLargeError(
            f"payload of {hj['payload_bytes']} bytes exceeds the {limits.max_payload_bytes}-byte limit"
        )
    if hj["publisher"] is not None and len(hj["publisher"]) > limits.max_publisher_len:
        raise ArtifactFormatError("publisher name too long")
    if not math.isfinite(hj["created_at"]):
        raise ArtifactFormatError("created_at must be a finite number")
    lay = hj["layout"]
    if set(lay) != {"num_layers", "num_kv_heads", "head_dim"} or not all(
        isinstance(lay[k], int) and not isinstance(lay[k], bool) for k in lay
    ):
        raise ArtifactFormatError("layout must hold integer num_layers, num_kv_heads and head_dim")
    if not (
        0 < lay["num_layers"] <= limits.max_layers
        and 0 < lay["num_kv_heads"] <= 4096
        and 0 < lay["head_dim"] <= 4096
    ):
        raise ArtifactFormatError(f"layout {lay} is out of range")
    return ArtifactHeader(**{**hj, "layout": KVLayout(**lay), "created_at": float(hj["created_at"])})


def _validate_entries(st: dict[str, Any], h: ArtifactHeader, data_len: int) -> dict[str, _Entry]:
    L = h.layout.num_layers
    expected = {f"{kind}.{i}" for i in range(L) for kind in ("k", "v")} | {"token_ids"}
    if set(st) != expected:
        unexpected = sorted(set(st) - expected)[:3]
        missing = sorted(expected - set(st))[:3]
        raise ArtifactFormatError(
            f"artifact tensors do not match its layout: missing {missing}, unexpected {unexpected}"
        )
    kv_dtype = _DTYPES[h.dtype]
    kv_shape = (1, h.layout.num_kv_heads, h.token_count, h.layout.head_dim)
    entries: dict[str, _Entry] = {}
    spans = []
    for name, info in st.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactFormatError(f"tensor entry {name!r} is malformed")
        dt = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offs = info["shape"], info["data_offsets"]
        if dt is None or not isinstance(shape, list) or not isinstance(offs, list) or len(offs) != 2:
            raise ArtifactFormatError(f"tensor entry {name!r} is malformed")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, *offs)):
            raise ArtifactFormatError(f"tensor entry {name!r} has a non-integer shape or offset")
        want_shape: tuple[int, ...]
        if name == "token_ids":
            want_dt, want_shape = torch.int64, (h.token_count,)
        elif h.codec == "raw":
            want_dt, want_shape = kv_dtype, kv_shape
        else:  # encoded bytes; the codec checks their structure against kv_shape when decoding
            want_dt, want_shape = torch.uint8, (shape[0] if len(shape) == 1 else -1,)
        if dt != want_dt or tuple(shape) != want_shape:
            raise ArtifactFormatError(
                f"tensor {name!r} is {info['dtype']}{shape}; the header implies {want_dt}{list(want_shape)}"
            )
        start, end = offs
        itemsize = dt.itemsize
        if end - start != math.prod(shape) * itemsize or end > data_len:
            raise ArtifactFormatError(
                f"tensor {name!r} offsets {offs} do not fit its shape or the data section"
            )
        if start % itemsize:
            raise ArtifactFormatError(f"tensor {name!r} is misaligned")
        entries[name] = _Entry(dtype=dt, shape=tuple(shape), start=start, end=end)
        spans.append((start, end))
    spans.sort()
    pos = 0
    for s, e in spans:
        if s != pos:
            raise ArtifactFormatError("tensor data overlaps or leaves holes in the data section")
        pos = e
    if pos != data_len:
        raise ArtifactFormatError("data section has trailing bytes")
    return entries


def restamp(header: ArtifactHeader, **changes: Any) -> ArtifactHeader:
    """A copy of ``header`` with ``changes`` (for tests and tools)."""
    return replace(header, **changes)


def header_from_mapping(obj: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> ArtifactHeader:
    """Validate a header received as JSON (e.g. from a registry handle)."""
    return _validate_header_fields(dict(obj), limits)
