"""Tensor codecs: lossless ones are bit-exact; hostile encoded data is a clear error; artifacts can use
them."""

from __future__ import annotations

import pytest
import torch

from kvagent.artifacts import codecs
from kvagent.artifacts import format as art
from kvagent.errors import ArtifactError, ArtifactFormatError, ArtifactIntegrityError
from tests._kvfixtures import make_artifact, make_kv, same_bits

LOSSLESS = [name for name, c in codecs.CODECS.items() if c.lossless]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _kv_like(dtype: torch.dtype, shape=(1, 3, 37, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * torch.linspace(0.1, 8.0, shape[-1])).to(dtype)
    flat = t.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0]).to(dtype)
    n = min(4, flat.numel())
    flat[:n] = specials[:n]
    return t


def test_registry_flags():
    assert set(LOSSLESS) == {"raw", "zstd", "bplane-zstd"}
    assert codecs.CODECS["int8"].lossless is False
    assert "int8" not in codecs.ARTIFACT_CODECS
    with pytest.raises(ArtifactFormatError):
        codecs.get("lz4")


@pytest.mark.parametrize("name", LOSSLESS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 37, 16), (1, 1, 1, 1), (1, 2, 0, 8), (5, 7)])
def test_lossless_round_trip_is_bit_exact(name, dtype, shape):
    t = _kv_like(dtype, shape) if 0 not in shape else torch.empty(shape, dtype=dtype)
    c = codecs.get(name)
    out = c.decode(memoryview(c.encode(t)), dtype, tuple(shape))
    assert same_bits(out, t)


def test_bplane_shrinks_structured_bf16_more_than_plain_zstd():
    # Values with a realistic spread of magnitudes per channel: the exponent plane is predictable.
    t = _kv_like(torch.bfloat16, (1, 4, 2048, 64), seed=3)
    sizes = {n: len(codecs.get(n).encode(t)) for n in ("raw", "zstd", "bplane-zstd")}
    assert sizes["bplane-zstd"] < sizes["zstd"] < sizes["raw"]


@pytest.mark.parametrize("name", ["zstd", "bplane-zstd", "int8"])
def test_corrupt_or_hostile_data_raises_a_format_error(name):
    t = _kv_like(torch.float16 if name != "int8" else torch.float32)
    c = codecs.get(name)
    good = bytearray(c.encode(t))
    shape, dtype = tuple(t.shape), t.dtype
    cases = [good[:3], good[:-1], good + b"x", bytearray(b"XXXX") + good[4:]]
    lying = bytearray(good)
    lying[6 + 9] ^= 0x01  # the first part's declared decoded length
    cases.append(lying)
    for bad in cases:
        with pytest.raises(ArtifactFormatError):
            c.decode(memoryview(bytes(bad)), dtype, shape)
    with pytest.raises(ArtifactFormatError):  # valid data, but for another shape
        c.decode(memoryview(bytes(good)), dtype, (1, 3, 36, 16))


def test_zstd_bomb_is_capped_by_the_expected_size():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    data = codecs._pack("zstd", [(codecs._ZSTD, bomb, 16)])  # claims 16 bytes, inflates to 64 MiB
    with pytest.raises(ArtifactFormatError):
        codecs.get("zstd").decode(memoryview(data), torch.float32, (1, 1, 1, 4))


def test_int8_is_lossy_but_bounded():
    t = _kv_like(torch.float32).nan_to_num(0.0, 0.0, 0.0)
    c = codecs.get("int8")
    out = c.decode(memoryview(c.encode(t)), t.dtype, tuple(t.shape))
    scale = t.reshape(3, 37, 16).abs().amax(dim=1, keepdim=True) / 127.0
    assert not torch.equal(out, t)
    assert bool(((out - t).abs().reshape(3, 37, 16) <= scale * 0.5 + 1e-6).all())


@pytest.mark.parametrize("codec", ["zstd", "bplane-zstd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_artifact_with_codec_round_trips_and_checks_decoded_content(codec, dtype):
    kv = make_kv(dtype=dtype)
    header, blob = make_artifact(kv, codec=codec)
    assert header.codec == codec
    raw_header, _ = make_artifact(kv)
    assert header.content_sha256 == raw_header.content_sha256 and header.key == raw_header.key
    got = art.decode(blob)
    assert all(
        same_bits(a, b) for a, b in zip((*got.kv.keys, *got.kv.values), (*kv.keys, *kv.values), strict=True)
    )


def test_lossy_codec_cannot_make_an_artifact():
    with pytest.raises(ArtifactError):
        make_artifact(make_kv(), codec="int8")


def test_a_codec_that_decodes_wrong_bytes_is_caught_by_the_content_hash(monkeypatch):
    kv = make_kv(dtype=torch.bfloat16)
    _, blob = make_artifact(kv, codec="zstd")
    real = codecs.CODECS["zstd"]

    def flipped(buf, dtype, shape):
        t = real.decode(buf, dtype, shape).clone()
        t.view(-1)[0] = t.view(-1)[0] + 1
        return t

    monkeypatch.setitem(codecs.CODECS, "zstd", codecs.Codec("zstd", True, real.encode, flipped))
    with pytest.raises(ArtifactIntegrityError, match="decoded tensors"):
        art.decode(blob)
