"""Start the registry server as a real separate process on 127.0.0.1 for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


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

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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
) -> ServerProcess:
    """Run ``python -m kvagent.server`` on a free loopback port and wait until /v1/healthz answers."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir.parent / f"{data_dir.name}.tokens.json"
    token_file.write_text(json.dumps(tokens))
    port = free_port()
    args = [
        sys.executable, "-m", "kvagent.server", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--token-file", str(token_file), "--model", model or "none", *extra_args,
    ]
    log_path = data_dir.parent / f"{data_dir.name}.server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path, data_dir, args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"registry server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/v1/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill9()
    raise RuntimeError(f"registry server did not become healthy in {timeout} s:\n{server.log()[-4000:]}")
