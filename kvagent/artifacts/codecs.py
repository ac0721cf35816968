"""Tensor codecs for KV artifacts: how each K/V tensor's bytes are stored.

* ``raw``          the tensor bytes as they are (safetensors tensors);
* ``zstd``         the bytes compressed with zstd (lossless, little gain: KV mantissas are noise);
* ``bplane-zstd``  lossless: split every element into byte planes (for bf16: sign+exponent byte and
                   exponent-bit+mantissa byte), lay each channel's values along the sequence so that
                   similar magnitudes sit together, and zstd each plane; planes that do not shrink are
                   stored raw. The exponent plane is where the redundancy is;
* ``int8``         LOSSY: per-(head, channel) absmax scale to int8. Never used where exactness is promised.

Encoded layout of the non-raw codecs (all integers little-endian)::

    magic "KVC1" | codec id u8 | n_parts u8 | n_parts x (mode u8, stored length u64, decoded length u64) |
    parts

Decoding checks every length against the dtype and shape the caller expects before it allocates or
decompresses (zstd output is capped at the expected size), and raises ArtifactFormatError on any mismatch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ArtifactFormatError

_MAGIC = b"KVC1"
_PART = struct.Struct("<BQQ")
_RAW, _ZSTD = 0, 1
_IDS = {"zstd": 1, "bplane-zstd": 2, "int8": 3}
# : zstd level of the byte planes; level 1 both compresses the exponent plane better and decodes faster than 3
# here.
BPLANE_LEVEL = 1
_pool: ThreadPoolExecutor | None = None


_inner: ThreadPoolExecutor | None = None


def _sub_pool() -> ThreadPoolExecutor:
    """A second pool for the planes of one large tensor (never the pool that runs whole tensors: no
    deadlock)."""
    global _inner
    if _inner is None:
        _inner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvagent-codec-part")
    return _inner


def pool() -> ThreadPoolExecutor:
    """The shared worker pool for encoding/decoding tensors (zstd and numpy release the GIL)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvagent-codec")
    return _pool


@dataclass(frozen=True)
class Codec:
    name: str
    lossless: bool
    encode: Callable[[torch.Tensor], bytes]
    decode: Callable[[memoryview, torch.dtype, tuple[int, ...]], torch.Tensor]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pack(codec: str, parts: list[tuple[int, bytes, int]]) -> bytes:
    head = [_MAGIC, bytes([_IDS[codec], len(parts)])]
    head += [_PART.pack(mode, len(data), decoded) for mode, data, decoded in parts]
    return b"".join(head + [data for _, data, _ in parts])


def _unpack(buf: memoryview, codec: str, expected: list[int]) -> list[bytes | memoryview]:
    """Split and decompress the parts of an encoded tensor, checking every length against ``expected``."""
    n = len(expected)
    head = 6 + n * _PART.size
    if len(buf) < head or bytes(buf[:4]) != _MAGIC or buf[4] != _IDS[codec] or buf[5] != n:
        raise ArtifactFormatError(f"{codec} tensor data has a malformed header")
    pos = head
    jobs = []
    for i, want in enumerate(expected):
        mode, stored, decoded = _PART.unpack_from(buf, 6 + i * _PART.size)
        if decoded != want or mode not in (_RAW, _ZSTD) or pos + stored > len(buf):
            raise ArtifactFormatError(
                f"{codec} part {i} declares {decoded} bytes in {stored}; expected {want}"
            )
        if mode == _RAW and stored != want:
            raise ArtifactFormatError(f"{codec} raw part {i} is {stored} bytes, expected {want}")
        jobs.append((mode, buf[pos : pos + stored], want))
        pos += stored
    if pos != len(buf):
        raise ArtifactFormatError(f"{codec} tensor data has {len(buf) - pos} trailing bytes")
    big = sum(want for *_, want in jobs) >= 4 << 20
    return [_expand(j) for j in jobs] if not big else list(_sub_pool().map(_expand, jobs))


def _expand(job: tuple[int, memoryview, int]) -> bytes | memoryview:
    import zstandard

    mode, data, want = job
    if mode == _RAW:
        return data
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=want)
    except zstandard.ZstdError as exc:
        raise ArtifactFormatError(f"corrupt zstd data: {exc}") from exc
    if len(out) != want:
        raise ArtifactFormatError(f"zstd data decoded to {len(out)} bytes, expected {want}")
    return out


def _zstd_part(data: bytes | memoryview, level: int) -> tuple[int, bytes, int]:
    import zstandard

    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if len(packed) >= 0.98 * len(data):  # incompressible: store raw, decode for free
        return (_RAW, bytes(data), len(data))
    return (_ZSTD, packed, len(data))


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


# -- raw ---------------------------------------------------------------------------------------------
def _raw_encode(t: torch.Tensor) -> bytes:
    return _as_bytes(t).tobytes()


def _raw_decode(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    want = math.prod(shape) * _itemsize(dtype)
    if len(buf) != want:
        raise ArtifactFormatError(f"raw tensor data is {len(buf)} bytes, expected {want}")
    return (
        torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape)
        if want
        else torch.empty(shape, dtype=dtype)
    )


# -- zstd ----------------------------------------------------------------------------------------------
def _zstd_encode(t: torch.Tensor) -> bytes:
    return _pack("zstd", [_zstd_part(_as_bytes(t).data, 3)])


def _zstd_decode(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    want = math.prod(shape) * _itemsize(dtype)
    (data,) = _unpack(buf, "zstd", [want])
    return (
        torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        if want
        else torch.empty(shape, dtype=dtype)
    )


# -- byte planes + zstd --------------------------------------------------------------------------------
def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """[1, H, S, D] -> [H, D, S]: one channel's values over the sequence become contiguous."""
    return (
        t.detach().reshape(t.shape[-3], t.shape[-2], t.shape[-1]).transpose(1, 2).contiguous()
        if t.dim() == 4
        else t
    )


def _bplane_encode(t: torch.Tensor) -> bytes:
    item = t.element_size()
    grid = _as_bytes(_channels_last(t)).reshape(-1, item)  # little-endian: column item-1 is the top byte
    planes = [np.ascontiguousarray(grid[:, item - 1 - j]) for j in range(item)]  # most significant first
    return _pack("bplane-zstd", [_zstd_part(p.data, BPLANE_LEVEL) for p in planes])


def _bplane_decode(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    item = _itemsize(dtype)
    n = math.prod(shape)
    planes = _unpack(buf, "bplane-zstd", [n] * item)
    grid = np.stack([np.frombuffer(planes[item - 1 - j], dtype=np.uint8) for j in range(item)], axis=1)
    flat = torch.from_numpy(grid.reshape(-1)).view(dtype)
    if len(shape) == 4:
        h, s, d = shape[1], shape[2], shape[3]
        return flat.reshape(h, d, s).transpose(1, 2).contiguous().reshape(shape)
    return flat.reshape(shape)


# -- int8 (lossy) ----------------------------------------------------------------------------------------
def _int8_encode(t: torch.Tensor) -> bytes:
    x = t.detach().float().reshape(t.shape[-3], t.shape[-2], t.shape[-1])  # [H, S, D]
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0  # per (head, channel)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return _pack("int8", [(_RAW, scale.numpy().astype("<f4").tobytes(), scale.numel() * 4),
                          _zstd_part(q.numpy().tobytes(), 3)])


def _int8_decode(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) != 4:
        raise ArtifactFormatError("int8 codec needs [1, H, S, D] tensors")
    h, s, d = shape[1], shape[2], shape[3]
    scale_b, q_b = _unpack(buf, "int8", [h * d * 4, h * s * d])
    scale = torch.from_numpy(np.frombuffer(scale_b, dtype="<f4").copy()).reshape(h, 1, d)
    q = torch.from_numpy(np.frombuffer(q_b, dtype=np.int8).copy()).reshape(h, s, d)
    return (q.float() * scale).to(dtype).reshape(shape)


CODECS: dict[str, Codec] = {
    "raw": Codec("raw", True, _raw_encode, _raw_decode),
    "zstd": Codec("zstd", True, _zstd_encode, _zstd_decode),
    "bplane-zstd": Codec("bplane-zstd", True, _bplane_encode, _bplane_decode),
    "int8": Codec("int8", False, _int8_encode, _int8_decode),
}
#: Codecs an artifact may use (lossless only: an artifact's promise is exactness).
ARTIFACT_CODECS = tuple(name for name, c in CODECS.items() if c.lossless)


def get(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ArtifactFormatError(f"unknown codec {name!r:.40}; known: {sorted(CODECS)}") from None
