"""Real processes for the connector's tests: a vLLM OpenAI server with the connector, and a fault proxy.

vLLM's first start compiles for a minute or two, so the tests start one server per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.procs import StartError, log_tail, spawn, stop_group, wait_healthy
from tests.registry_server import free_port  # the repo root is on sys.path (conftest)

REPO = Path(__file__).resolve().parents[3]
INTEGRATION = Path(__file__).resolve().parents[1]
#: the registry's tokens in these tests: a publisher on another machine, the vLLM host, an admin
TOKENS: dict[str, dict[str, object]] = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "vllm-token-00002": {"principal": "vllmhost", "publish": True},
    "admin-token-0003": {"principal": "admin", "publish": True, "admin": True},
}
ALICE, VLLM_TOKEN, ADMIN = "alice-token-0001", "vllm-token-00002", "admin-token-0003"


@dataclass
class VLLMServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cache_dir: Path

    def log(self) -> str:
        return log_tail(self.log_path, chars=1 << 62)

    def stop(self) -> None:
        stop_group(self.proc)

    def complete(
        self, prompt: list[int], *, max_tokens: int = 24, cache_salt: str | None = None, timeout: float = 300
    ) -> dict[str, Any]:
        """A greedy /v1/completions call on token ids; the response JSON."""
        body: dict[str, Any] = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def first_token_seconds(self, prompt: list[int], *, cache_salt: str | None = None) -> float:
        """Seconds until the first streamed token of a greedy completion (TTFT as a client sees it)."""
        return self.streamed(prompt, max_tokens=4, cache_salt=cache_salt)[0]

    def streamed(
        self, prompt: list[int], *, max_tokens: int = 24, cache_salt: str | None = None
    ) -> tuple[float, str, int]:
        """A streamed greedy completion: (seconds to its first token, its text, the prompt tokens vLLM
        reported cached)."""
        body: dict[str, Any] = {
            "model": "m",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        t0 = time.perf_counter()
        first: float | None = None
        text, cached = "", 0
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=300) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    if choice.get("text") is not None:
                        first = time.perf_counter() - t0 if first is None else first
                        text += choice["text"]
                usage = chunk.get("usage") or {}
                cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached)
        if first is None:
            raise AssertionError("the stream ended without a token")
        return first, text, cached


def start_vllm(model_dir: Path, work: Path, extra: dict[str, Any], timeout: float = 900, *,
               dtype: str = "float32", eager: bool | None = None) -> VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` with the connector, on a free loopback port.

    ``dtype``: vLLM's ``--dtype``; ``eager``: ``--enforce-eager`` (None: unless ``KVAGENT_VLLM_COMPILE=1``,
    since torch.compile adds minutes to a start on 2 cores)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    transfer = {
        "kv_connector": "KVAgentConnector",
        "kv_connector_module_path": "vllm_kvagent",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "m",
        "--dtype",
        dtype,
        "--max-model-len",
        "2048",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prompt-tokens-details",
        "--kv-transfer-config",
        json.dumps(transfer),
    ]
    if eager if eager is not None else os.environ.get("KVAGENT_VLLM_COMPILE") != "1":
        args.append("--enforce-eager")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(INTEGRATION), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    log_path = work / "vllm.log"
    proc = spawn(args, env, log_path, cwd=work)
    server = VLLMServer(f"http://127.0.0.1:{port}", proc, log_path, Path(extra.get("cache_dir", "")))
    try:
        wait_healthy(proc, server.url + "/health", log_path, name="vLLM", timeout=timeout, interval=1,
                     tail=6000)
    except StartError:
        server.stop()
        raise
    return server
