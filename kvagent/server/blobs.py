"""Blob storage behind one small interface: a local directory (default) or an S3-compatible bucket.

Uploads always stream into a local temp file first (``new_temp``), are validated there (checksum
recomputed), and only then ``publish`` makes them durable under a fresh name ``<key>-<nonce>``: an
fsync + atomic rename on disk, or one S3 PUT (multipart for large files, which S3 makes visible only
when complete). The metadata row is committed after that, so a half-uploaded object is never visible.
Names are never reused, so publishing never replaces bytes a committed row points to. Objects no row
references (a crash between publish and commit, a lost race) are removed by ``cleanup`` once they are
older than a grace period, so a node starting up never deletes another node's upload in flight.

Nothing else in the server knows which backend is in use: downloads ask ``presign`` for a short-lived
URL (S3) and otherwise stream ``open_read``; the model host reads through ``read_bytes``.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

from ..errors import ConfigError, StoreError

log = logging.getLogger("kvagent.server")

TMP_SUFFIX = ".part"
#: Default age below which an unreferenced blob is left alone (it may be between publish and commit).
DEFAULT_GRACE_S = 600.0


class BlobStore(Protocol):
    """What the server needs from blob storage."""

    kind: str  # "local" | "s3"

    def new_temp(self) -> Path:
        """A fresh local temp file path to stream an upload into."""

    def publish(self, temp: Path, key: str) -> str:
        """Make the complete, validated ``temp`` durable under a fresh name; returns that name."""

    def remove(self, name: str) -> None:
        """Delete a published blob (a missing one is fine)."""

    def open_read(self, name: str) -> BinaryIO:
        """A binary file-like object over the blob (raises FileNotFoundError if it is gone)."""

    def read_bytes(self, name: str) -> memoryview:
        """The whole blob as a read-only-use buffer (a copy-on-write map for local files)."""

    def presign(self, name: str, expires_s: int) -> str | None:
        """A short-lived URL that serves the blob without the app, or None to stream it through the app."""

    def cleanup(self, referenced: Callable[[], Iterable[str]], grace_s: float = DEFAULT_GRACE_S) -> int:
        """Delete temp files of dead processes and unreferenced blobs older than ``grace_s``; returns how
        many."""


def _fresh_name(key: str) -> str:
    return f"{key}-{secrets.token_hex(8)}"


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad blob name {name!r}")


# -- local directory ------------------------------------------------------------------------------
class LocalBlobs:
    """Blobs in ``<root>/<name[:2]>/<name>``, uploads in ``<root>/tmp``."""

    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def new_temp(self) -> Path:
        return _new_temp(self.tmp)

    def path(self, name: str) -> Path:
        _check_name(name)
        return self.root / name[:2] / name

    def publish(self, temp: Path, key: str) -> str:
        """fsync ``temp`` and atomically rename it into place; returns the blob name."""
        name = _fresh_name(key)
        dest = self.path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, dest)
        _fsync_dir(dest.parent)
        return name

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def open_read(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")  # an open file survives a concurrent delete

    def read_bytes(self, name: str) -> memoryview:
        with open(self.path(name), "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))

    def presign(self, name: str, expires_s: int) -> str | None:
        return None

    def cleanup(self, referenced: Callable[[], Iterable[str]], grace_s: float = DEFAULT_GRACE_S) -> int:
        cutoff = time.time() - grace_s
        n = _clean_temp(self.tmp)
        keep = set(referenced())
        for sub in self.root.iterdir():
            if sub.is_dir() and sub != self.tmp:
                n += _unlink_older((p for p in sub.iterdir() if p.name not in keep), cutoff)
        if n:
            log.info("removed %d stale temp file(s) / unreferenced blob(s) from %s", n, self.root)
        return n


def _new_temp(tmp: Path) -> Path:
    return tmp / f"{os.getpid()}-{secrets.token_hex(12)}{TMP_SUFFIX}"


def _clean_temp(tmp: Path) -> int:
    """Delete upload temp files whose writing process is gone (the pid leads the name); returns how many.

    A pid equal to ours belongs to an earlier process (we have not started uploading yet)."""
    n = 0
    for p in tmp.iterdir():
        pid = p.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_older(paths: Iterable[Path], cutoff: float) -> int:
    n = 0
    for p in paths:
        try:
            if p.stat().st_mtime <= cutoff:
                p.unlink()
                n += 1
        except FileNotFoundError:
            pass
    return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- S3-compatible bucket ---------------------------------------------------------------------------
class S3Blobs:
    """Blobs as objects ``<prefix>/blobs/<name>`` in an S3-compatible bucket (AWS S3, R2, Ceph RGW, MinIO).

    Credentials, region and endpoint come from the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL``
    for a non-AWS endpoint; plain ``http://`` endpoints are allowed for loopback test servers).
    Uploads are staged in ``scratch`` on local disk, downloads are served by presigned GET URLs.
    """

    kind = "s3"

    def __init__(self, url: str, scratch: Path, store: Any = None):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"--blobs must look like s3://BUCKET[/PREFIX], got {url!r}")
        self.url = url
        self.tmp = Path(scratch)
        self.tmp.mkdir(parents=True, exist_ok=True)
        if store is None:
            try:
                from obstore.store import S3Store
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigError("the S3 blob backend needs obstore: pip install 'kvagent[server]'") from exc
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
            store = S3Store.from_url(
                f"s3://{parsed.netloc}", client_options={"allow_http": endpoint.startswith("http://")}
            )
        self._store = store
        self._prefix = "/".join(p for p in (parsed.path.strip("/"), "blobs") if p)

    def _obj(self, name: str) -> str:
        _check_name(name)
        return f"{self._prefix}/{name}"

    def new_temp(self) -> Path:
        return _new_temp(self.tmp)

    def publish(self, temp: Path, key: str) -> str:
        import obstore

        name = _fresh_name(key)
        try:
            obstore.put(self._store, self._obj(name), Path(temp), chunk_size=16 << 20, max_concurrency=4)
        except Exception as exc:  # obstore raises its own error types; translate at this boundary
            raise StoreError(f"cannot store blob {name[:24]}… in {self.url}: {exc}") from exc
        Path(temp).unlink(missing_ok=True)  # consumed, as a local rename consumes it
        return name

    def remove(self, name: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, self._obj(name))
        except FileNotFoundError:
            pass

    def open_read(self, name: str) -> BinaryIO:
        import io

        return io.BytesIO(bytes(self.read_bytes(name)))

    def read_bytes(self, name: str) -> memoryview:
        import obstore

        return memoryview(bytes(obstore.get(self._store, self._obj(name)).bytes()))

    def presign(self, name: str, expires_s: int) -> str | None:
        from datetime import timedelta

        import obstore

        return str(obstore.sign(self._store, "GET", self._obj(name), timedelta(seconds=expires_s)))

    def cleanup(self, referenced: Callable[[], Iterable[str]], grace_s: float = DEFAULT_GRACE_S) -> int:
        import obstore

        cutoff = time.time() - grace_s
        n = _clean_temp(self.tmp)
        keep = set(referenced())
        for batch in obstore.list(self._store, self._prefix + "/"):
            for meta in batch:
                name = str(meta["path"]).rsplit("/", 1)[-1]
                if name not in keep and meta["last_modified"].timestamp() <= cutoff:
                    self.remove(name)
                    n += 1
        if n:
            log.info("removed %d stale temp file(s) / unreferenced blob(s) from %s", n, self.url)
        return n


def open_blobs(spec: str | None, data_dir: Path) -> BlobStore:
    """The backend chosen by ``--blobs``: None or a path (local directory) or ``s3://BUCKET[/PREFIX]``."""
    if spec and spec.startswith("s3://"):
        return S3Blobs(spec, Path(data_dir) / "upload-tmp")
    if spec and "://" in spec and not spec.startswith("file://"):
        raise ConfigError(f"--blobs must be a directory, file://PATH or s3://BUCKET[/PREFIX], got {spec!r}")
    root = Path(spec.removeprefix("file://")) if spec else Path(data_dir) / "blobs"
    return LocalBlobs(root)
