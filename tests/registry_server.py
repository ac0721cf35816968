"""Start the registry server as a real separate process on 127.0.0.1 for tests.

``KVAGENT_TEST_BLOBS=s3`` runs every server these tests start on the S3 blob backend instead of a local
directory: a fresh bucket per data directory (a restart on the same directory finds the same bucket) on the
S3-API server named by ``KVAGENT_TEST_S3_URL`` (.ci/s3.sh starts one). A test that picks its own ``--blobs``
keeps it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.procs import StartError, log_tail, spawn, wait_healthy

REPO = Path(__file__).resolve().parents[1]
BLOBS_ENV = "KVAGENT_TEST_BLOBS"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path
    args: list[str] = field(default_factory=list)
    # : the ``--blobs`` spec (a directory or ``s3://bucket/prefix``), or None for the directory under
    # ``data_dir``
    blobs: str | None = None
    #: the S3 endpoint the server was given (``AWS_ENDPOINT_URL``), when ``blobs`` is set
    s3_endpoint: str | None = None

    @property
    def on_s3(self) -> bool:
        """Whether the server keeps its blobs in S3 (downloads are presigned redirects)."""
        return bool(self.blobs and self.blobs.startswith("s3://"))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return log_tail(self.log_path, chars=1 << 62)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_server(
    data_dir: Path,
    tokens: dict[str, dict[str, object]],
    model: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 120,
    s3_endpoint: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """Run ``python -m kvagent.server`` on a free loopback port and wait until /v1/healthz answers.

    ``extra_env`` adds to the server's environment (e.g. ``OMP_NUM_THREADS``).

    ``s3_endpoint`` overrides the endpoint an S3 backend is given (a fault proxy in front of the S3 server).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    blobs, blob_env = _blob_backend(data_dir, extra_args, s3_endpoint)
    if blobs is not None and "--blobs" not in extra_args:
        extra_args = [*extra_args, "--blobs", blobs]
    token_file = data_dir.parent / f"{data_dir.name}.tokens.json"
    token_file.write_text(json.dumps(tokens))
    port = free_port()
    args = [
        sys.executable, "-m", "kvagent.server", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--token-file", str(token_file), "--model", model or "none", *extra_args,
    ]
    log_path = data_dir.parent / f"{data_dir.name}.server.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **blob_env,
        **(extra_env or {}),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = spawn(args, env, log_path, cwd=REPO, new_session=False)  # stop() signals the server alone
    server = ServerProcess(
        f"http://127.0.0.1:{port}",
        proc,
        log_path,
        data_dir,
        args,
        blobs,
        blob_env.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") if blobs else None,
    )
    try:
        wait_healthy(proc, server.url + "/v1/healthz", log_path, name="registry server", timeout=timeout,
                     interval=0.1)
    except StartError:
        server.kill9()
        raise
    return server


def blob_backend() -> str:
    """"local" or "s3": the backend servers started without their own ``--blobs`` use."""
    kind = os.environ.get(BLOBS_ENV, "local")
    if kind not in ("local", "s3"):
        raise RuntimeError(f"{BLOBS_ENV}={kind!r}: expected 'local' or 's3'")
    return kind


def _blob_backend(
    data_dir: Path, extra_args: Sequence[str], endpoint: str | None
) -> tuple[str | None, dict[str, str]]:
    """The ``--blobs`` spec and the environment (AWS_*) a server on ``data_dir`` runs with."""
    if "--blobs" in extra_args:
        spec = list(extra_args)[list(extra_args).index("--blobs") + 1]
        return spec, ({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})
    if blob_backend() == "local":
        return None, {}
    from tests.s3_server import ENV, aws_settings, new_bucket

    url = os.environ.get(ENV)
    if not url:
        raise RuntimeError(
            f"{BLOBS_ENV}=s3 needs the S3-API server named by {ENV} (start one with .ci/s3.sh)"
        )
    spec_file = data_dir.parent / f"{data_dir.name}.blobs"
    if not spec_file.exists():  # one bucket per data directory, found again by a restart
        spec_file.write_text(f"s3://{new_bucket(url)}/kv")
    return spec_file.read_text(), aws_settings(endpoint or url)


def published_blobs(server: ServerProcess) -> list[str]:
    """Every published blob of ``server``'s backend: what a reader could ever be pointed at."""
    if not server.on_s3:
        root = Path(server.blobs.removeprefix("file://")) if server.blobs else server.data_dir / "blobs"
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp"
        )
    assert server.blobs is not None
    from urllib.parse import urlparse

    from tests.s3_server import ENV, list_objects

    endpoint = os.environ.get(ENV) or server.s3_endpoint
    assert endpoint, "no S3 endpoint to list"
    return sorted(list_objects(endpoint, urlparse(server.blobs).netloc))


def upload_temp_files(data_dir: Path) -> list[Path]:
    """Files a server on ``data_dir`` streams uploads into before they are verified (either backend)."""
    return [
        p for d in ("blobs/tmp", "upload-tmp") if (data_dir / d).is_dir() for p in (data_dir / d).iterdir()
    ]


def download(server: ServerProcess, path: str, headers: dict[str, str], **kw: object) -> httpx.Response:
    """GET a blob route as a client would: on S3 the registry answers a visible blob with a presigned redirect
    to the object store and no byte of the blob, and the client follows it without credentials (a ``Range``
    header goes along)."""
    r = httpx.get(server.url + path, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]
    if not server.on_s3:
        return r
    assert r.status_code not in (200, 206), f"an S3-backed registry sent blob bytes itself ({r.status_code})"
    if r.status_code != 307:
        return r
    loc = r.headers["location"]
    assert r.content == b"" and server.s3_endpoint and loc.startswith(server.s3_endpoint + "/"), (
        loc,
        r.content[:80],
    )
    return httpx.get(loc, headers={k: v for k, v in headers.items() if k.lower() == "range"}, timeout=60)
