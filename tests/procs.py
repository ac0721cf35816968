"""Server processes for tests and benchmarks: start one with its output in a log file, wait until its health
route answers, read its log's tail, stop its process group.

``tests/registry_server.py`` (kvagent's server), ``integrations/vllm/tests/vllm_procs.py`` (vLLM's OpenAI
server) and ``benchmarks/concurrent_agents.py`` (every server it compares) start their processes with these.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


class StartError(RuntimeError):
    """A server exited or never became healthy while starting; the message ends with its log's tail."""


def spawn(
    cmd: Sequence[str], env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None,
    new_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr appended to ``log_path``; ``new_session``: in its own process
    group (what :func:`stop_group` stops, children included)."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen(list(cmd), stdout=logf, stderr=subprocess.STDOUT, env=dict(env),
                                cwd=str(cwd) if cwd else None, start_new_session=new_session)


def log_tail(log_path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of ``log_path`` ("" while it does not exist)."""
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else ""


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, log_path: Path, *, name: str, timeout: float,
    headers: Mapping[str, str] | None = None, interval: float = 0.2, tail: int = 4000,
) -> None:
    """Return once GET ``url`` answers 200; StartError (with the log's tail) when ``proc`` exits first or
    ``timeout`` seconds pass (the process is left running: the caller stops it as it started it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = f"{name} exited with {proc.returncode} while starting"
            raise StartError(f"{why}:\n{log_tail(log_path, tail)}")
        try:
            if httpx.get(url, timeout=2, headers=dict(headers or {})).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise StartError(f"{name} did not become healthy in {timeout:.0f} s:\n{log_tail(log_path, tail)}")


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    """SIGTERM ``proc``'s process group (it was spawned with ``new_session``), SIGKILL it after ``timeout``
    seconds; the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(10)
    return proc.returncode
