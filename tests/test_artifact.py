"""The KV artifact codec: bit-exact round trips and a specific error for every malformed input."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from typing import Any

import pytest
import torch
from _kvfixtures import (
    CREATED_AT,
    MODEL_FP,
    TEMPLATE_HASH,
    TOKENIZER_FP,
    build,
    container,
    key_for,
    make_artifact,
    make_kv,
    same_kv,
    split,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvagent.artifacts import format as art
from kvagent.errors import (
    ArtifactError,
    ArtifactFormatError,
    ArtifactIntegrityError,
    ArtifactMismatchError,
    ArtifactTooLargeError,
)
from kvagent.kvcache.hashing import payload_digest
from kvagent.kvcache.identity import sha256_hex
from kvagent.kvcache.tensors import KVLayout

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def valid() -> tuple[Any, art.ArtifactHeader, bytes]:
    kv = make_kv()
    header, blob = make_artifact(kv)
    return kv, header, blob


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    kv = make_kv(dtype=dtype, seed=7)
    header, blob = make_artifact(kv)
    out = art.decode(blob)
    assert same_kv(out.kv, kv)
    assert out.kv.keys[0].view(-1)[2].isnan()  # the special values went through untouched
    assert out.header == header
    assert out.kv.layout == KVLayout(num_layers=3, num_kv_heads=2, head_dim=8)
    assert out.kv.dtype == dtype


def _safetensors_reference(blob: bytes, header: art.ArtifactHeader, kv: Any) -> bytes:
    """What the encoder wrote before it laid containers out itself: safetensors' own file, then its header
    rewritten.

    Tensors and digests come from the artifact under test (a codec's bytes are its own business); the layout,
    key
    order and padding come from ``safetensors.torch.save``.
    """
    import hashlib

    from safetensors.torch import save

    tensors = _stored_tensors(blob)
    ref = save(tensors, metadata={"kvagent": "{}"})
    n = int.from_bytes(ref[:8], "little")
    st = json.loads(ref[8 : 8 + n])
    st["__metadata__"] = {"kvagent": json.dumps(header.to_json(), sort_keys=True, separators=(",", ":"))}
    hb = json.dumps(st, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    data = ref[8 + n :]
    assert header.payload_sha256 == payload_digest(data)
    content = hashlib.sha256(b"kvagent-content-v1\0")  # the format's definition, one tensor at a time
    for i in range(len(kv.keys)):
        for t in (kv.keys[i], kv.values[i]):
            content.update(bytes.fromhex(payload_digest(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())))
    assert header.content_sha256 == content.hexdigest()
    return len(hb).to_bytes(8, "little") + hb + data


def _stored_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return {k: v.clone() for k, v in load(blob).items()}


@pytest.mark.parametrize("codec", art.CODECS)
@pytest.mark.parametrize(("dtype", "layers", "tokens"), [
    (torch.float32, 3, 17), (torch.bfloat16, 12, 5), (torch.float16, 2, 1), (torch.float32, 11, 300),
], ids=str)
def test_encode_writes_what_safetensors_would(
    codec: str, dtype: torch.dtype, layers: int, tokens: int
) -> None:
    """The container, its key order ("k.10" before "k.2"), offsets, padding and both digests are those of the
    reference path, so one KV has one payload digest whichever kvagent version encoded it."""
    kv = make_kv(num_layers=layers, tokens=tokens, dtype=dtype, seed=layers)
    header, blob = make_artifact(kv, codec=codec)
    assert blob == _safetensors_reference(blob, header, kv)
    assert same_kv(art.decode(blob).kv, kv)


def test_header_fields_are_preserved(valid: Any) -> None:
    kv, header, blob = valid
    h = art.decode(blob).header
    assert h == header
    assert art.read_header(blob) == header
    assert (h.key, h.model_fingerprint, h.tokenizer_fingerprint, h.template_hash) == (
        key_for(kv),
        MODEL_FP,
        TOKENIZER_FP,
        TEMPLATE_HASH,
    )
    assert (h.dtype, h.token_count, h.position_offset, h.codec) == ("float32", 17, 0, "raw")
    assert (h.created_at, h.publisher, h.format, h.format_version) == (CREATED_AT, "tests", "kvagent-kv", 1)
    assert h.payload_bytes == kv.nbytes + 17 * 8
    assert h.payload_sha256 == payload_digest(split(blob)[2])


def test_position_offset_and_anonymous_publisher_round_trip() -> None:
    kv = make_kv(num_layers=1, tokens=3, seed=3)
    header, blob = make_artifact(kv, position_offset=12, publisher=None)
    h = art.decode(blob).header
    assert (h.position_offset, h.publisher) == (12, None)


def test_the_producing_engine_is_an_optional_header_field() -> None:
    """``engine`` round-trips when a writer records it; a header without it (every older artifact) still
    reads,
    and a writer that does not name its engine writes no such field at all."""
    kv = make_kv(num_layers=1, tokens=3, seed=4)
    _, blob = make_artifact(kv, engine="vllm 0.32.0")
    assert art.decode(blob).header.engine == "vllm 0.32.0"
    header, plain = make_artifact(kv)
    assert header.engine is None and "engine" not in header.to_json()
    assert "engine" not in split(plain)[1]
    assert art.decode(plain).header.engine is None
    with pytest.raises(ArtifactFormatError, match="engine"):
        art.header_from_mapping({**header.to_json(), "engine": 5})


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "readonly memoryview"])
def test_decode_accepts_buffers(valid: Any, kind: str) -> None:
    kv, header, blob = valid
    buf = {
        "bytes": lambda: blob,
        "bytearray": lambda: bytearray(blob),
        "memoryview": lambda: memoryview(bytearray(blob)),
        "readonly memoryview": lambda: memoryview(blob),
    }[kind]()
    out = art.decode(buf)
    assert same_kv(out.kv, kv)
    assert out.header == header


def test_decoding_bytes_copies_and_decoding_a_bytearray_shares(valid: Any) -> None:
    kv, _, blob = valid
    out = art.decode(blob)
    out.kv.keys[1].add_(1)  # a private, writable copy of immutable input
    assert same_kv(art.decode(blob).kv, kv)
    buf = bytearray(blob)
    out = art.decode(buf)
    st, _, _ = split(blob)
    start = 8 + _header_len(blob) + st["k.1"]["data_offsets"][0]
    buf[start : start + 4] = bytes(4)  # documented: tensors share a writable buffer's memory
    assert out.kv.keys[1].view(-1)[0].item() == 0.0
    assert kv.keys[1].view(-1)[0].item() != 0.0


def test_encode_refuses_unsupported_dtype() -> None:
    kv = make_kv(num_layers=1, tokens=2)
    kv64 = dataclasses.replace(kv, keys=(kv.keys[0].double(),), values=(kv.values[0].double(),))
    with pytest.raises(ArtifactFormatError):
        make_artifact(kv64)


# -- truncation and corruption ------------------------------------------------------------------


def _header_len(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little")


def test_truncations_are_format_errors(valid: Any) -> None:
    _, _, blob = valid
    n = _header_len(blob)
    cuts = [0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(blob) - 8, len(blob) - 1]
    for cut in cuts:
        with pytest.raises(ArtifactFormatError):
            art.decode(blob[:cut])
        with pytest.raises(ArtifactFormatError):
            art.read_header(blob[:cut])


def test_padding_is_a_format_error(valid: Any) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactFormatError, match="data section"):
        art.decode(blob + b"\0" * 8)


@pytest.mark.parametrize("where", [0, 1 / 3, 1 / 2, -1])
def test_payload_bit_flip_is_an_integrity_error(valid: Any, where: float) -> None:
    _, _, blob = valid
    data_start = 8 + _header_len(blob)
    pos = len(blob) - 1 if where == -1 else data_start + int((len(blob) - data_start) * where)
    bad = bytearray(blob)
    bad[pos] ^= 0x10
    with pytest.raises(ArtifactIntegrityError):
        art.decode(bad)
    art.read_header(bad)  # the header alone is still fine: only decode checks the payload


def _replace_once(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) == 1 and len(old) == len(new)
    return blob.replace(old, new)


def test_header_bit_flips_are_detected(valid: Any) -> None:
    kv, header, blob = valid
    # a bit flip in the dtype value, in a field name, and in a hex digest (upper-case 'A' is not hex)
    for old, new in [
        (b"float32", b"float33"),
        (b'"codec', b'"codec'.replace(b"c", b"b", 1)),
        (b"raw", b"rav"),
    ]:
        with pytest.raises(ArtifactFormatError):
            art.decode(_replace_once(blob, old, new))
    fp_pos = blob.index(MODEL_FP.encode())
    letter = next(i for i, c in enumerate(MODEL_FP) if c in "abcdef")
    bad = bytearray(blob)
    bad[fp_pos + letter] ^= 0x20
    with pytest.raises(ArtifactFormatError, match="model_fingerprint"):
        art.decode(bad)
    # a flip that leaves valid hex is caught by the reader's expectation
    bad = bytearray(blob)
    bad[fp_pos + next(i for i, c in enumerate(MODEL_FP) if c in "0123456789abcdef"[:14])] ^= 0x01
    with pytest.raises(ArtifactMismatchError):
        art.decode(bad, expect=art.Expectation(model_fingerprint=MODEL_FP))


def test_every_single_bit_flip_in_the_container_header_is_caught_or_harmless(valid: Any) -> None:
    kv, header, blob = valid
    n = _header_len(blob)
    for pos in range(0, 8 + n, 3):
        bad = bytearray(blob)
        bad[pos] ^= 1 << (pos % 8)
        try:
            out = art.decode(bad, expect=art.Expectation(key=header.key, model_fingerprint=MODEL_FP))
        except ArtifactError:
            continue
        assert same_kv(out.kv, kv), pos


# -- hand-built malformed containers -------------------------------------------------------------


def test_rebuilt_container_is_valid(valid: Any) -> None:
    """The hand-building helpers produce a decodable file, so the failures below are specific."""
    kv, header, blob = valid
    assert same_kv(art.decode(build(*split(blob))).kv, kv)


def test_oversized_container_header_length_is_refused_before_allocating() -> None:
    huge = (1 << 62).to_bytes(8, "little") + b"{}      "
    with pytest.raises(ArtifactTooLargeError):
        art.decode(huge)
    limit = art.DEFAULT_LIMITS.max_container_header
    buf = bytearray((limit + 1).to_bytes(8, "little") + b" " * (limit + 1))
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactTooLargeError):
            art.read_header(buf)
        with pytest.raises(ArtifactTooLargeError):
            art.decode(buf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit // 4


def test_limits_are_configurable(valid: Any) -> None:
    _, _, blob = valid
    n = _header_len(blob)
    for limits in [
        art.Limits(max_container_header=n - 8),
        art.Limits(max_header_json=64),
        art.Limits(max_tokens=16),
        art.Limits(max_payload_bytes=100),
    ]:
        with pytest.raises(ArtifactTooLargeError):
            art.decode(blob, limits=limits)


def _edited(blob: bytes, st_edit: Any = None, kvh_edit: Any = None, data_edit: Any = None) -> bytes:
    st, kvh, data = split(blob)
    if st_edit:
        st_edit(st)
    if data_edit:
        data = data_edit(data)
        kvh["payload_bytes"] = len(data)
        kvh["payload_sha256"] = payload_digest(data)
    if kvh_edit:
        kvh_edit(kvh)
    return build(st, kvh, data)


def test_duplicate_keys_in_the_container_json(valid: Any) -> None:
    _, _, blob = valid
    st, kvh, data = split(blob)
    body = json.dumps({**st, "__metadata__": {"kvagent": json.dumps(kvh)}})
    k0 = json.dumps(st["k.0"])
    dup = body.replace('"k.0": ' + k0, '"k.0": ' + k0 + ', "k.0": ' + k0, 1)
    assert dup != body
    with pytest.raises(ArtifactFormatError, match="duplicate"):
        art.decode(container(dup.encode(), data))


def test_duplicate_keys_in_the_kvagent_header(valid: Any) -> None:
    _, _, blob = valid
    st, kvh, data = split(blob)
    raw = json.dumps(kvh)
    dup = raw[:-1] + ', "dtype": "float32"}'
    with pytest.raises(ArtifactFormatError, match="duplicate"):
        art.decode(build(st, dup, data))


def _pop(name: str) -> Any:
    return lambda d: d.pop(name)


def _set(name: str, value: Any) -> Any:
    return lambda d: d.__setitem__(name, value)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_pop("publisher"), id="missing field"),
        pytest.param(_set("extra", 1), id="extra field"),
        pytest.param(_set("token_count", True), id="bool for int"),
        pytest.param(_set("format_version", True), id="bool version"),
        pytest.param(_set("format_version", "1"), id="str version"),
        pytest.param(_set("created_at", "yesterday"), id="str created_at"),
        pytest.param(_set("created_at", 1e999), id="infinite created_at"),
        pytest.param(_set("publisher", 5), id="int publisher"),
        pytest.param(_set("publisher", "x" * 1000), id="long publisher"),
        pytest.param(_set("layout", [3, 2, 8]), id="layout list"),
        pytest.param(
            _set("layout", {"num_layers": 3, "num_kv_heads": 2, "head_dim": True}), id="layout bool"
        ),
        pytest.param(_set("layout", {"num_layers": 3, "num_kv_heads": 2}), id="layout missing"),
        pytest.param(_set("layout", {"num_layers": 0, "num_kv_heads": 2, "head_dim": 8}), id="layout zero"),
        pytest.param(_set("format_version", 2), id="unknown version"),
        pytest.param(_set("format", "other"), id="unknown format"),
        pytest.param(_set("codec", "zstd"), id="unknown codec"),
        pytest.param(_set("dtype", "float64"), id="unknown dtype"),
        pytest.param(_set("dtype", "float16"), id="dtype not matching tensors"),
        pytest.param(_set("token_count", 16), id="token count not matching tensors"),
        pytest.param(_set("position_offset", -1), id="negative offset"),
        pytest.param(_set("key", "A" * 64), id="upper-case key"),
        pytest.param(_set("key", "a" * 64 + "\n"), id="key with newline"),
        pytest.param(_set("payload_sha256", "0" * 63), id="short digest"),
        pytest.param(lambda d: d.__setitem__("payload_bytes", d["payload_bytes"] + 8), id="payload_bytes"),
    ],
)
def test_bad_kvagent_header_is_a_format_error(valid: Any, edit: Any) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactFormatError):
        art.decode(_edited(blob, kvh_edit=edit))


def test_kvagent_header_that_is_not_an_object(valid: Any) -> None:
    _, _, blob = valid
    st, _, data = split(blob)
    for raw in ["[]", "not json", '"text"', ""]:
        with pytest.raises(ArtifactFormatError):
            art.decode(build(st, raw, data))


def test_missing_or_foreign_metadata(valid: Any) -> None:
    _, _, blob = valid
    st, kvh, data = split(blob)
    with pytest.raises(ArtifactFormatError, match="no kvagent header"):
        art.decode(container(json.dumps(st).encode(), data))
    meta = {"kvagent": json.dumps(kvh), "other": "x"}
    with pytest.raises(ArtifactFormatError, match="no kvagent header"):
        art.decode(container(json.dumps({**st, "__metadata__": meta}).encode(), data))
    with pytest.raises(ArtifactFormatError):
        art.decode(container(b"[1, 2]", data))
    with pytest.raises(ArtifactFormatError):
        art.decode(container(b"\xff\xfe{}", data))


def _rename(old: str, new: str) -> Any:
    return lambda st: st.__setitem__(new, st.pop(old))


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_rename("v.2", "v.3"), id="layer out of range"),
        pytest.param(_rename("k.1", "k.01"), id="non-canonical name"),
        pytest.param(_rename("token_ids", "tokens"), id="no token_ids"),
        pytest.param(lambda st: st.pop("v.0"), id="missing tensor"),
        pytest.param(lambda st: st.__setitem__("extra", dict(st["k.0"])), id="extra tensor"),
    ],
)
def test_tensor_names_must_match_the_layout(valid: Any, edit: Any) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactFormatError, match="do not match its layout"):
        art.decode(_edited(blob, st_edit=edit))


def _entry(name: str, **changes: Any) -> Any:
    return lambda st: st[name].update(changes)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_entry("k.0", dtype="F16"), id="tensor dtype"),
        pytest.param(_entry("k.0", dtype="F64"), id="unknown tensor dtype"),
        pytest.param(_entry("k.0", dtype=7), id="non-string tensor dtype"),
        pytest.param(_entry("token_ids", dtype="I32"), id="token_ids dtype"),
        pytest.param(_entry("k.0", shape=[1, 2, 8, 17]), id="tensor shape"),
        pytest.param(_entry("k.0", shape=[1, 2, 17, True]), id="bool in shape"),
        pytest.param(_entry("k.0", data_offsets=[0]), id="one offset"),
        pytest.param(_entry("k.0", data_offsets=[0.0, 1088.0]), id="float offsets"),
        pytest.param(_entry("k.0", extra=1), id="extra entry field"),
        pytest.param(lambda st: st.__setitem__("k.0", [1]), id="entry not an object"),
    ],
)
def test_malformed_tensor_entries(valid: Any, edit: Any) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactFormatError):
        art.decode(_edited(blob, st_edit=edit))


def _spans(st: dict[str, Any]) -> list[tuple[str, list[int]]]:
    return sorted(((n, e["data_offsets"]) for n, e in st.items()), key=lambda x: x[1][0])


def test_overlapping_offsets(valid: Any) -> None:
    _, _, blob = valid

    def overlap(st: dict[str, Any]) -> None:  # k.1 (same size as k.0) now claims k.0's bytes
        st["k.1"]["data_offsets"] = list(st["k.0"]["data_offsets"])

    with pytest.raises(ArtifactFormatError, match="overlaps or leaves holes"):
        art.decode(_edited(blob, st_edit=overlap))


def test_holes_between_tensors(valid: Any) -> None:
    _, _, blob = valid

    def shift(st: dict[str, Any]) -> None:  # every tensor 8 bytes later, the first 8 bytes unused
        for e in st.values():
            e["data_offsets"] = [e["data_offsets"][0] + 8, e["data_offsets"][1] + 8]

    with pytest.raises(ArtifactFormatError, match="overlaps or leaves holes"):
        art.decode(_edited(blob, st_edit=shift, data_edit=lambda d: b"\0" * 8 + d))


def test_trailing_bytes_after_the_tensors(valid: Any) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactFormatError, match="trailing"):
        art.decode(_edited(blob, data_edit=lambda d: d + b"\0" * 8))


def test_offsets_out_of_bounds(valid: Any) -> None:
    _, _, blob = valid

    def past_end(st: dict[str, Any]) -> None:
        name, (s, e) = _spans(st)[-1]
        st[name]["data_offsets"] = [s + 8, e + 8]

    with pytest.raises(ArtifactFormatError, match="do not fit"):
        art.decode(_edited(blob, st_edit=past_end))

    def wrong_length(st: dict[str, Any]) -> None:
        name, (s, e) = _spans(st)[0]
        st[name]["data_offsets"] = [s, e - 4]

    with pytest.raises(ArtifactFormatError, match="do not fit"):
        art.decode(_edited(blob, st_edit=wrong_length))


def test_misaligned_tensor(valid: Any) -> None:
    _, _, blob = valid

    def misalign(st: dict[str, Any]) -> None:  # token_ids (int64) start 4 bytes into the data
        for e in st.values():
            e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]

    with pytest.raises(ArtifactFormatError, match="misaligned"):
        art.decode(_edited(blob, st_edit=misalign, data_edit=lambda d: b"\0" * 4 + d))


# -- expectations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expect",
    [
        art.Expectation(model_fingerprint=sha256_hex(b"another model")),
        art.Expectation(tokenizer_fingerprint=sha256_hex(b"another tokenizer")),
        art.Expectation(dtype="bfloat16"),
        art.Expectation(key=sha256_hex(b"another key")),
        art.Expectation(layout=KVLayout(num_layers=3, num_kv_heads=2, head_dim=16)),
    ],
)
def test_expectation_mismatch(valid: Any, expect: art.Expectation) -> None:
    _, _, blob = valid
    with pytest.raises(ArtifactMismatchError):
        art.decode(blob, expect=expect)


def test_matching_expectation(valid: Any) -> None:
    kv, header, blob = valid
    expect = art.Expectation(
        key=header.key,
        model_fingerprint=MODEL_FP,
        tokenizer_fingerprint=TOKENIZER_FP,
        dtype="float32",
        layout=kv.layout,
    )
    assert same_kv(art.decode(blob, expect=expect).kv, kv)


def test_expectation_is_checked_before_the_payload(valid: Any) -> None:
    _, _, blob = valid
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(ArtifactMismatchError):
        art.decode(bad, expect=art.Expectation(model_fingerprint=sha256_hex(b"another model")))


def test_header_from_mapping(valid: Any) -> None:
    _, header, _ = valid
    assert art.header_from_mapping(header.to_json()) == header
    with pytest.raises(ArtifactFormatError):
        art.header_from_mapping({**header.to_json(), "token_count": 1.5})


# -- fuzzing ----------------------------------------------------------------------------------------

_SMALL_KV = make_kv(num_layers=2, heads=1, tokens=3, head_dim=4, seed=11)
_SMALL_HEADER, _SMALL_BLOB = make_artifact(_SMALL_KV)


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    blob = bytearray(_SMALL_BLOB)
    n = len(blob)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, n - 1))
        if draw(st.booleans()):
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            blob[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        blob = blob[: draw(st.integers(0, n))]
    return bytes(blob)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged())
def test_damaged_artifacts_decode_exactly_or_raise_artifact_errors(buf: bytes) -> None:
    for call in (
        lambda: art.decode(buf),
        lambda: art.decode(buf, expect=art.Expectation(key=_SMALL_HEADER.key)),
    ):
        try:
            out = call()
        except ArtifactError:
            continue
        assert same_kv(out.kv, _SMALL_KV)


def test_an_integrity_check_replaces_the_payload_sha256(valid: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``integrity`` sees the whole artifact (header included) after the header checks; sha256 is skipped."""
    kv, header, blob = valid
    seen: list[bytes] = []
    monkeypatch.setattr(art, "payload_digest", lambda *_: "0" * 64)  # would fail if it were consulted
    timings: dict[str, float] = {}
    out = art.decode(bytearray(blob), integrity=lambda view: seen.append(bytes(view)), timings=timings)
    assert seen == [blob] and same_kv(out.kv, kv)
    assert set(timings) == {"parse", "integrity", "decode"} and all(v >= 0 for v in timings.values())

    def refuse(view: memoryview) -> None:
        raise ArtifactIntegrityError("damaged")

    with pytest.raises(ArtifactIntegrityError, match="damaged"):
        art.decode(bytearray(blob), integrity=refuse)
    with pytest.raises(ArtifactMismatchError):  # the expectation is checked before the integrity hook runs
        art.decode(bytearray(blob), expect=art.Expectation(dtype="bfloat16"), integrity=refuse)
