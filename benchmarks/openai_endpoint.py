"""Cold vs warm time to first token through the OpenAI-compatible API, beside the SDK and llama.cpp's server.

For each document length, with the embedded SmolLM2-135M (same GGUF for llama.cpp), one run, median of
``--repeats``. Every figure is the latency of a non-streaming ``chat.completions`` request with
``max_tokens=1`` (so it ends at the first token), measured by the official ``openai`` client on loopback:

* ``api_cold``: a document the server has never seen (a fresh nonce in front of it): a full prefill;
* ``api_warm``: a second question about the same document: the server resumes from the first question's
  KV (the common prefix, refined at token level) and prefills only the new question;
* ``sdk_warm``: the same resume in-process: ``KVAgent.read`` (memory hit) + time to first token of ``ask``;
* ``llama_cold`` / ``llama_warm``: the same two requests to ``python -m llama_cpp.server`` with its prompt
  cache on (``--cache true``), when llama-cpp-python is installed.

    python -m benchmarks.openai_endpoint [--lengths 512 1024 2048 4096] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is the first section about?", "Who founded the company?")
TOKEN = "bench-token-000001"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_kvagent(tmp: Path, threads: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    (tmp / "tokens.json").write_text(json.dumps({TOKEN: {"principal": "bench"}}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvagent.server", "--port", str(port), "--data-dir", str(tmp / "data"),
         "--token-file", str(tmp / "tokens.json"), "--model", "smollm2", "--kv-cache-items", "4"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "kvagent.log", "wb"), env=env,  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/v1/healthz", proc)
    return url, proc


def _start_llamacpp(tmp: Path, n_ctx: int, threads: int) -> tuple[str, subprocess.Popen[bytes]] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    from kvagent.models import locate_gguf

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(locate_gguf()), "--port", str(port),
         "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
         "--cache", "true", "--cache_type", "ram", "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "llamacpp.log", "wb"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/v1/models", proc)
    return url, proc


def _first_token_s(url: str, text: str, question: str) -> tuple[float, dict[str, Any]]:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=600)
    t0 = time.perf_counter()
    r = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=1,
                                  messages=[{"role": "user", "content": f"{text}\n\nQuestion: {question}"}])
    dt = time.perf_counter() - t0
    cached = (
        r.usage.prompt_tokens_details.cached_tokens if r.usage and r.usage.prompt_tokens_details else None
    )
    return dt, {"prompt_tokens": r.usage.prompt_tokens if r.usage else None, "cached_tokens": cached}


def _pair(url: str, doc: str, nonce: int) -> tuple[float, float, dict[str, Any]]:
    """Cold (a never-seen document) then warm (a second question on it) time to first token."""
    text = f"[document {nonce}]\n{doc}"
    cold, _ = _first_token_s(url, text, QUESTIONS[0])
    warm, info = _first_token_s(url, text, QUESTIONS[1])
    return cold, warm, info


def _sdk_warm(agent: Any, doc: str, nonce: int) -> float:
    text = f"[document {nonce}]\n{doc}"
    handle = agent.read(text)  # prefill once (not timed), then the timed warm path
    agent.ask(handle, QUESTIONS[0], max_new_tokens=1)
    t0 = time.perf_counter()
    handle = agent.read(text)
    for _ in agent.stream(handle, QUESTIONS[1], max_new_tokens=1, stop_token_ids=()):
        break
    return time.perf_counter() - t0


def run(lengths: list[int], repeats: int, threads: int, peer: bool = True) -> dict[str, Any]:
    from kvagent import KVAgent
    from tests.conftest import long_text

    tmp = Path(tempfile.mkdtemp(prefix="kvagent-openai-bench-"))
    agent = KVAgent(cache_dir=tmp / "sdk")
    docs = {
        n: agent.tokenizer.decode(agent.tokenizer.encode(long_text(n + 64, agent.tokenizer))[:n])
        for n in lengths
    }
    servers: list[tuple[str, Callable[[], None]]] = []
    url_k, proc_k = _start_kvagent(tmp, threads)
    servers.append(("kvagent", lambda: _stop(proc_k)))
    llama = _start_llamacpp(tmp, max(lengths) + 256, threads) if peer else None
    if llama is not None:
        servers.append(("llama.cpp", lambda: _stop(llama[1])))
    rows = []
    try:
        m = statistics.median
        for n in lengths:
            kc, kw, lc, lw, sw = [], [], [], [], []
            info: dict[str, Any] = {}
            for r in range(repeats):
                nonce = n * 100 + r
                c, w, info = _pair(url_k, docs[n], nonce)
                kc.append(c)
                kw.append(w)
                sw.append(_sdk_warm(agent, docs[n], nonce + 50))
                if llama is not None:
                    c, w, _ = _pair(llama[0], docs[n], nonce)
                    lc.append(c)
                    lw.append(w)
            row: dict[str, Any] = {
                "tokens": n,
                "prompt_tokens": info.get("prompt_tokens"),
                "warm_cached_tokens": info.get("cached_tokens"),
                "api_cold_s": m(kc),
                "api_warm_s": m(kw),
                "sdk_warm_s": m(sw),
                "api_warm_over_sdk_warm": m(kw) / m(sw),
                "api_cold_over_warm": m(kc) / m(kw),
            }
            if lc:
                row.update(llama_cold_s=m(lc), llama_warm_s=m(lw), llama_warm_over_api_warm=m(lw) / m(kw))
            rows.append(row)
            print(_fmt(row), flush=True)
    finally:
        for _name, stop in servers:
            stop()
        agent.close()
    return {"benchmark": "openai_endpoint", "threads": threads, "repeats": repeats, "load": os.getloadavg(),
            "llama_cpp": llama is not None, "rows": rows}


def _fmt(row: dict[str, Any]) -> str:
    s = (
        f"{row['tokens']:>5} tok  API cold {row['api_cold_s'] * 1000:8.0f} ms  API warm "
        f"{row['api_warm_s'] * 1000:6.0f} ms"
        f" (cached {row['warm_cached_tokens']})  SDK warm {row['sdk_warm_s'] * 1000:6.0f} ms"
        f"  API/SDK warm {row['api_warm_over_sdk_warm']:.2f}"
    )
    if "llama_cold_s" in row:
        s += (
            f"  llama.cpp cold {row['llama_cold_s'] * 1000:8.0f} ms warm {row['llama_warm_s'] * 1000:6.0f} ms"
        )
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--no-peer", action="store_true", help="skip llama.cpp's server even where it is installed"
    )
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "openai_endpoint.json")
    args = ap.parse_args(argv)
    result = run(args.lengths, args.repeats, args.threads, peer=not args.no_peer)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
