"""Concurrent agents on one document: ``kvagent serve`` beside bare vLLM (CPU) and ``transformers serve
--continuous-batching`` (and ``kvagent serve --engine vllm``: ``kvagent-vllm``), in one run, on the same
weights (the embedded SmolLM2-135M-Instruct). ``vllm-connector`` is bare vLLM with the KVAgentConnector, and
``vllm-noop-connector`` bare vLLM with a connector that does nothing (vLLM's connector framework alone), so
the rows split a connector row's gap to bare vLLM into vLLM's hooks and kvagent's own work. ``llamacpp`` is
llama-cpp-python's OpenAI server at its defaults on the embedded model's GGUF (Q4_1 weights:
``--peer-defaults`` only; build it into ``.llamacpp-venv`` as docs/benchmarks.md says), ``llamacpp-queue``
the same with ``--interrupt_requests False`` (its default interrupts a stream when the next request comes).

Two lines of settings: ``--peer-defaults`` starts every server as its users do (no dtype, eager, batch-size
or other tuning flag: vLLM then picks bf16 and compiles on a CPU with AMX/AVX512-BF16, kvagent runs its
float32 default); without it, the matched line gives every server ``--dtype`` (default float32) and
``--vllm-args`` (e.g. ``--enforce-eager``) alike. Every cell runs ``--repeats`` times (default 3) with all
servers up and their order rotated each repeat; the table and the ratios are medians, the JSON keeps each
run.

For each server, document length and agent count: the document is sent once first (so every server has had the
chance to cache it), then N agents start together, each with its own question about the document, streaming,
temperature 0, ``--max-tokens`` tokens. Reported per cell: wall time (first request sent to last stream
ended), time to first token (median and p99 over the agents), output tokens per second over the wall time,
and failures (any non-200, any 5xx, a stream without tokens). A server that cannot be started is skipped with
the reason printed (and recorded in the JSON).

``--principals``: on the kvagent servers, ``one`` runs every agent under one bearer token (one principal: its
private prompt cache holds the document after the first request); ``distinct`` gives each agent a token of
its own (a principal each, agent i the same one in every cell) and publishes the document public first (by a
publisher principal, through the SDK), so the agents resume from the published artifact: what the batching
engine may share across principals. Both rows come out of one run, side by side, with their ratios over one
agent (the other servers have no principals: ``one`` only).

    python -m benchmarks.concurrent_agents [--agents 1 8 32] [--doc-tokens 1500 4000] [--max-tokens 48]
        [--servers kvagent kvagent-vllm vllm vllm-connector vllm-noop-connector llamacpp llamacpp-queue
                   transformers]
        [--principals one distinct]
        [--vllm-python .vllm-venv/bin/python] [--llamacpp-python .llamacpp-venv/bin/python]
        [--vllm-cmd "<command line>"] [--transformers-cmd "transformers serve"] [--threads 2]
        [--max-batch N (default: the most agents)] [--prefill-chunk 256]
        [--repeats 3] [--peer-defaults | --dtype float32|bfloat16]
        [--baseline-tree /path/to/an/older/checkout]  # adds the server "kvagent-base"
        [--json benchmarks/results/concurrent_agents.json]

``kvagent-base`` is ``kvagent serve`` from another checkout (``--baseline-tree``, e.g. a ``git worktree`` of
the code before a change), started like ``kvagent`` beside it in the same run: the before/after line of a
change. Its float32 default is used as is (an older tree may not have ``--dtype``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.procs import StartError, spawn, stop_group, wait_healthy
from tests.registry_server import free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-000001"
PUBLISHER = "bench-publisher-token-0001"
#: servers with principals (bearer tokens of their own): the only ones a ``distinct`` row is run on
KVAGENT_SERVERS = ("kvagent", "kvagent-base", "kvagent-vllm")


def agent_token(i: int) -> str:
    """The bearer token of agent ``i`` in the distinct-principals rows (a principal of its own)."""
    return f"bench-agent-{i:04d}-token"


def token_file(tmp: Path, agents: int) -> Path:
    """The kvagent servers' token file: the one-principal token, a publisher, and one token per agent."""
    tokens: dict[str, dict[str, Any]] = {TOKEN: {"principal": "bench"},
                                         PUBLISHER: {"principal": "publisher", "publish": True}}
    tokens.update({agent_token(i): {"principal": f"agent-{i}"} for i in range(agents)})
    path = tmp / "tokens.json"
    path.write_text(json.dumps(tokens))
    return path
#: every server loads the weights from a local directory and must never reach for a model hub
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOPICS = (
    "the founding",
    "the fares",
    "the largest vessel",
    "the routes",
    "the head office",
    "the timetable",
    "children's tickets",
    "the crew",
    "the night service",
    "the winter schedule",
    "the harbour",
    "bicycles",
    "luggage",
    "the history",
    "the owners",
    "accessibility",
    "the cafe",
    "the weather policy",
    "group tickets",
    "the island",
    "the lighthouse",
    "the ticket office",
    "refunds",
    "pets",
    "the engines",
    "safety",
    "season passes",
    "the newest ship",
    "delays",
    "the bridge",
    "parking",
    "the first ship",
)


@dataclass
class Server:
    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_group(self.proc)


def _launch(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    url: str,
    model: str,
    health: str,
    timeout: float,
) -> Server | str:
    """Start ``cmd``; the Server once ``health`` answers 200, else the reason it could not start."""
    try:
        proc = spawn(cmd, env, log)
    except OSError as exc:
        return f"{name}: cannot run {cmd[0]!r}: {exc}"
    srv = Server(name, url, model, proc, log)
    try:
        wait_healthy(proc, url + health, log, name=name, timeout=timeout, interval=0.5, tail=600,
                     headers={"Authorization": f"Bearer {TOKEN}"})
    except StartError as exc:
        srv.stop()
        return f"{exc} (log: {log})"
    return srv


def _kvagent_tuning(args: argparse.Namespace) -> list[str]:
    """``kvagent serve``'s flags beyond its defaults: none with ``--peer-defaults``; else the matched dtype
    and ``--max-batch``."""
    if args.peer_defaults:
        return []
    return ["--max-batch", str(args.max_batch), *(["--dtype", args.dtype] if args.dtype else [])]


def _vllm_flags(args: argparse.Namespace) -> list[str]:
    """vLLM's extra flags: none with ``--peer-defaults`` (as its users start it), else ``--vllm-args``."""
    return [] if args.peer_defaults else shlex.split(args.vllm_args)


def start_kvagent(tmp: Path, args: argparse.Namespace, repo: Path = REPO, name: str = "kvagent"
                  ) -> Server | str:
    """``kvagent serve`` from the checkout ``repo`` (this one, or ``--baseline-tree`` as ``kvagent-base``)."""
    tuning = _kvagent_tuning(args)
    if repo != REPO:
        if args.dtype not in (None, "float32"):
            return f"{name}: an older tree may not take --dtype {args.dtype} (it runs float32)"
        tuning = [] if args.peer_defaults else ["--max-batch", str(args.max_batch)]
    port = free_port()
    tokens = token_file(tmp, max(args.agents))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(repo)}
    cmd = [
        sys.executable,
        "-m",
        "kvagent.server",
        "--port",
        str(port),
        "--data-dir",
        str(tmp / f"{name}-data"),
        "--token-file",
        str(tokens),
        "--model",
        "smollm2",
        "--kv-cache-items",
        "4",
        "--max-queue",
        str(max(args.agents) + 8),
        "--prefill-chunk",
        str(args.prefill_chunk),
        *tuning,
    ]
    return _launch(
        name,
        cmd,
        env,
        tmp / f"{name}.log",
        f"http://127.0.0.1:{port}",
        "smollm2",
        "/v1/healthz",
        args.start_timeout,
    )


def start_kvagent_vllm(tmp: Path, args: argparse.Namespace) -> Server | str:
    """``kvagent serve --engine vllm``: kvagent's host (endpoint, registry, market) generating on vLLM with
    the KVAgentConnector; run by the vLLM install's python, this checkout's kvagent first on the path."""
    if not Path(args.vllm_python).exists():
        return f"kvagent-vllm: {args.vllm_python} does not exist (give --vllm-python)"
    port = free_port()
    tokens = token_file(tmp, max(args.agents))
    engine_args = {"enforce_eager": True} if "--enforce-eager" in _vllm_flags(args) else {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "4", **OFFLINE,
           "PYTHONPATH": f"{REPO}:{REPO / 'integrations' / 'vllm'}",
           "VLLM_KVAGENT_ENGINE_ARGS": json.dumps({"max_model_len": 8192, **engine_args})}
    cmd = [args.vllm_python, "-m", "kvagent.server", "--port", str(port), "--data-dir",
           str(tmp / "kvagent-vllm-data"), "--token-file", str(tokens), "--model", "smollm2",
           "--engine", "vllm_kvagent.engine:create_engine", "--max-queue", str(max(args.agents) + 8),
           *_kvagent_tuning(args)]
    return _launch("kvagent-vllm", cmd, env, tmp / "kvagent-vllm.log", f"http://127.0.0.1:{port}", "smollm2",
                   "/v1/healthz", args.start_timeout)


def start_vllm(
    tmp: Path, args: argparse.Namespace, model_dir: Path, connector: str | None = None
) -> Server | str:
    """Bare vLLM's OpenAI server; with ``connector`` ``"kvagent"``, the same with the KVAgentConnector (local
    store in the run's temporary directory, no registry); ``"noop"``: with a connector that does nothing
    (``benchmarks/vllm_noop_connector.py``: what vLLM's connector framework costs by itself)."""
    name = {None: "vllm", "kvagent": "vllm-connector", "noop": "vllm-noop-connector"}[connector]
    port = free_port()
    base = (
        shlex.split(args.vllm_cmd)
        if args.vllm_cmd
        else [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    )
    if not args.vllm_cmd and not Path(args.vllm_python).exists():
        return f"{name}: {args.vllm_python} does not exist (give --vllm-python or --vllm-cmd)"
    cmd = [
        *base,
        "--model",
        str(model_dir),
        "--served-model-name",
        "smollm2",
        *(["--dtype", args.dtype] if args.dtype else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "8192",
        *_vllm_flags(args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_KVCACHE_SPACE": "4", **OFFLINE}
    if connector == "noop":
        cmd += ["--kv-transfer-config", json.dumps({
            "kv_connector": "NoopConnector", "kv_connector_module_path": "benchmarks.vllm_noop_connector",
            "kv_role": "kv_both"})]
        env["PYTHONPATH"] = str(REPO)
    elif connector == "kvagent":
        extra = {"model": str(model_dir), "cache_dir": str(tmp / "connector-cache")}
        cmd += ["--kv-transfer-config", json.dumps({
            "kv_connector": "KVAgentConnector", "kv_connector_module_path": "vllm_kvagent",
            "kv_role": "kv_both", "kv_connector_extra_config": extra})]
        env["PYTHONPATH"] = f"{REPO}:{REPO / 'integrations' / 'vllm'}"
    return _launch(
        name,
        cmd,
        env,
        tmp / f"{name}.log",
        f"http://127.0.0.1:{port}",
        "smollm2",
        "/health",
        args.start_timeout,
    )


def start_llamacpp(tmp: Path, args: argparse.Namespace, queue: bool = False) -> Server | str:
    """llama.cpp's OpenAI server as llama-cpp-python users start it (``python -m llama_cpp.server --model``,
    its defaults: 2048-token context, half the cores' threads, one request at a time, its prompt cache off,
    and a new request *interrupting* the one being streamed: concurrent agents then fail, and the table says
    so) on the GGUF shipped with the embedded model (SmolLM2-135M-Instruct, Q4_1 weights: not a matched
    dtype, so it runs in the ``--peer-defaults`` line only). ``queue`` (``llamacpp-queue``): the one flag that
    makes it serve concurrent agents, ``--interrupt_requests False`` (they wait their turn). ``--model_alias``
    only names it."""
    name = "llamacpp-queue" if queue else "llamacpp"
    if not Path(args.llamacpp_python).exists():
        return (f"{name}: {args.llamacpp_python} does not exist (give --llamacpp-python: a venv with "
                "llama-cpp-python[server], docs/benchmarks.md)")
    if not args.peer_defaults:
        return f"{name}: its GGUF has Q4_1 weights, no matched dtype: it runs with --peer-defaults only"
    from kvagent.models import locate_gguf

    port = free_port()
    cmd = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(locate_gguf()),
           "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
           *(["--interrupt_requests", "False"] if queue else [])]
    return _launch(name, cmd, {**os.environ, **OFFLINE}, tmp / f"{name}.log", f"http://127.0.0.1:{port}",
                   "smollm2", "/v1/models", args.start_timeout)


def start_transformers(tmp: Path, args: argparse.Namespace, model_dir: Path) -> Server | str:
    port = free_port()
    cmd = [
        *shlex.split(args.transformers_cmd),
        str(model_dir),
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--dtype", args.dtype] if args.dtype else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **OFFLINE}
    return _launch(
        "transformers",
        cmd,
        env,
        tmp / "transformers.log",
        f"http://127.0.0.1:{port}",
        str(model_dir),
        "/health",
        args.start_timeout,
    )


@dataclass
class Agent:
    ttft_s: float | None = None
    end_s: float = 0.0
    tokens: int = 0
    status: int = 0
    error: str = ""


@dataclass
class Cell:
    server: str
    doc_tokens: int
    agents: int
    principals: str
    wall_s: float
    ttft_median_s: float | None
    ttft_p99_s: float | None
    tokens_per_s: float
    output_tokens: int
    failures: int
    server_errors: int
    errors: list[str] = field(default_factory=list)
    #: kvagent servers: decode-step sequences that read a prefix shared with others in place during the cell
    # (the sum of ``kvagent_batch_shared_prefix_size``); None elsewhere
    shared_prefix_reads: float | None = None


def _pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def _one(
    http: httpx.AsyncClient, srv: Server, messages: list[dict[str, str]], max_tokens: int, t0: float,
    token: str = TOKEN,
) -> Agent:
    a = Agent()
    body = {
        "model": srv.model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage_tokens: int | None = None
    try:
        async with http.stream(
            "POST", srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            a.status = r.status_code
            if r.status_code != 200:
                a.error = (await r.aread()).decode(errors="replace")[:200]
                return a
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        a.tokens += 1
                        if a.ttft_s is None:
                            a.ttft_s = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        a.error = f"{type(exc).__name__}: {exc}"
    a.end_s = time.perf_counter() - t0
    if usage_tokens is not None:
        a.tokens = usage_tokens  # content chunks can merge tokens; the usage count is exact
    if a.tokens == 0 and not a.error:
        a.error = "no tokens"
    return a


def _messages(doc: str, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}]


async def run_cell(srv: Server, doc: str, doc_tokens: int, n: int, max_tokens: int,
                   principals: str = "one") -> Cell:
    """N agents at once; ``principals``: ``one`` (every agent under one token) or ``distinct`` (a token
    each)."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    shared0 = await _shared_reads(srv)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        t0 = time.perf_counter()
        questions = [
            f"In one sentence, what does the text say about {TOPICS[i % len(TOPICS)]}? (agent {i + 1})"
            for i in range(n)
        ]
        tokens = [TOKEN if principals == "one" else agent_token(i) for i in range(n)]
        agents = await asyncio.gather(
            *[_one(http, srv, _messages(doc, q), max_tokens, t0, tok)
              for q, tok in zip(questions, tokens, strict=True)]
        )
    wall = max(a.end_s for a in agents)
    ttfts = [a.ttft_s for a in agents if a.ttft_s is not None]
    out = sum(a.tokens for a in agents)
    failures = [a for a in agents if a.status != 200 or a.error]
    return Cell(
        srv.name,
        doc_tokens,
        n,
        principals,
        round(wall, 3),
        round(statistics.median(ttfts), 3) if ttfts else None,
        round(_pct(ttfts, 99), 3) if ttfts else None,
        round(out / wall, 2) if wall > 0 else 0.0,
        out,
        len(failures),
        sum(1 for a in agents if a.status >= 500),
        sorted({f"{a.status} {a.error}" for a in failures})[:5],
        None if shared0 is None else (await _shared_reads(srv) or 0.0) - shared0,
    )


async def _shared_reads(srv: Server) -> float | None:
    """A kvagent server's ``kvagent_batch_shared_prefix_size_sum`` now (None for other servers)."""
    if srv.name not in KVAGENT_SERVERS:
        return None
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    for line in r.text.splitlines():
        if line.startswith("kvagent_batch_shared_prefix_size_sum "):
            return float(line.split()[1])
    return 0.0


async def warm(srv: Server, doc: str, token: str = TOKEN) -> None:
    async with httpx.AsyncClient(timeout=1800) as http:
        await _one(http, srv, _messages(doc, "What is this text about?"), 1, time.perf_counter(), token)


def publish(srv: Server, doc: str, cache_dir: Path) -> str:
    """Publish ``doc``'s KV on ``srv``, public, by the publisher principal (the SDK reads and uploads it, as
    an agent on another machine would); its key."""
    from kvagent import KVAgent
    from kvagent.config import Config
    from kvagent.costs.policy import PolicyParams
    from kvagent.models import load_model

    loaded = load_model(None, Config.resolve().models_dir)
    agent = KVAgent(loaded.model, tokenizer=loaded.tokenizer, cache_dir=cache_dir, registry_url=srv.url,
                    token=PUBLISHER, policy=PolicyParams(min_tokens=256))
    try:
        return agent.publish(agent.read(doc), "public").key
    finally:
        agent.close()


def document(tokens: int) -> str:
    from kvagent.config import Config
    from kvagent.models import load_model
    from tests.conftest import long_text

    tok = load_model(None, Config.resolve().models_dir).tokenizer
    text = long_text(tokens, tok)
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return str(tok.decode(ids))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--doc-tokens", type=int, nargs="+", default=[1500, 4000])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--principals", nargs="+", default=["one", "distinct"], choices=["one", "distinct"],
                    help="kvagent servers: every agent one principal, and/or each its own (document public)")
    ap.add_argument(
        "--servers",
        nargs="+",
        default=["kvagent", "vllm", "transformers"],
        choices=["kvagent", "kvagent-base", "kvagent-vllm", "vllm", "vllm-connector", "vllm-noop-connector",
                 "llamacpp", "llamacpp-queue", "transformers"],
    )
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout of kvagent, run as the server kvagent-base beside kvagent")
    ap.add_argument(
        "--vllm-python",
        default=str(REPO / ".vllm-venv" / "bin" / "python"),
        help="the python of a vLLM (CPU) install; runs -m vllm.entrypoints.openai.api_server",
    )
    ap.add_argument(
        "--vllm-cmd", default="", help="the whole vLLM server command instead (model and port added)"
    )
    ap.add_argument("--vllm-args", default="", help="extra arguments for the vLLM server")
    ap.add_argument("--llamacpp-python", default=str(REPO / ".llamacpp-venv" / "bin" / "python"),
                    help="a python with llama-cpp-python[server] (the llamacpp server)")
    ap.add_argument("--transformers-cmd", default=f"{Path(sys.executable).parent / 'transformers'} serve")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of every server")
    ap.add_argument("--max-batch", type=int, default=0,
                    help="kvagent serve --max-batch (default: the most agents, as kvagent-vllm gets)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="kvagent serve --prefill-chunk")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of every cell; the table reports medians, the server order rotated each "
                         "repeat")
    ap.add_argument("--peer-defaults", action="store_true",
                    help="every server as its users start it: no dtype, eager, batch-size or other tuning "
                         "flag (vLLM then chooses bf16 and compiles on a CPU with AMX/AVX512-BF16)")
    ap.add_argument("--dtype", default="float32",
                    help="the matched line's dtype, given to every server (ignored with --peer-defaults)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "concurrent_agents.json")
    args = ap.parse_args(argv)
    args.max_batch = args.max_batch or max(args.agents)
    if args.peer_defaults:
        args.dtype = None

    from kvagent.config import Config
    from kvagent.models import ensure_embedded

    model_dir = ensure_embedded(Config.resolve().models_dir)
    docs = {n: document(n) for n in args.doc_tokens}
    starters = {
        "kvagent": lambda tmp: start_kvagent(tmp, args),
        "kvagent-base": lambda tmp: (start_kvagent(tmp, args, args.baseline_tree.resolve(), "kvagent-base")
                                     if args.baseline_tree else "kvagent-base: needs --baseline-tree"),
        "kvagent-vllm": lambda tmp: start_kvagent_vllm(tmp, args),
        "vllm": lambda tmp: start_vllm(tmp, args, model_dir),
        "vllm-connector": lambda tmp: start_vllm(tmp, args, model_dir, connector="kvagent"),
        "vllm-noop-connector": lambda tmp: start_vllm(tmp, args, model_dir, connector="noop"),
        "transformers": lambda tmp: start_transformers(tmp, args, model_dir),
        "llamacpp": lambda tmp: start_llamacpp(tmp, args),
        "llamacpp-queue": lambda tmp: start_llamacpp(tmp, args, queue=True),
    }
    runs: list[Cell] = []
    skipped: dict[str, str] = {}
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="kvagent-concurrent-") as td:
        try:
            for name in args.servers:  # all up at once, so that every repeat can rotate their order
                started = starters[name](Path(td))
                if isinstance(started, str):
                    print(f"skipping {started}", flush=True)
                    skipped[name] = started
                    continue
                servers.append(started)
                for n_doc, doc in docs.items():
                    for mode in _modes(name, args):
                        if mode == "distinct":
                            publish(started, doc, Path(td) / f"publisher-{name}-{n_doc}")
                        asyncio.run(warm(started, doc, TOKEN if mode == "one" else PUBLISHER))
            for r in range(args.repeats):
                for srv in _rotated(servers, r):
                    for n_doc, doc in docs.items():
                        for mode in _modes(srv.name, args):
                            for n in args.agents:
                                cell = asyncio.run(run_cell(srv, doc, n_doc, n, args.max_tokens, mode))
                                runs.append(cell)
                                print(
                                    f"repeat {r + 1}/{args.repeats} {srv.name:>12} doc={n_doc:>5} "
                                    f"agents={n:>3} "
                                    f"principals={mode:>8} wall={cell.wall_s:7.2f}s "
                                    f"ttft median/p99={cell.ttft_median_s}/{cell.ttft_p99_s}s "
                                    f"tok/s={cell.tokens_per_s:7.1f} "
                                    f"failures={cell.failures} 5xx={cell.server_errors} "
                                    f"shared-prefix reads={cell.shared_prefix_reads}",
                                    flush=True,
                                )
        finally:
            for srv in servers:
                srv.stop()
    cells = medians(runs)
    result: dict[str, Any] = {
        "benchmark": "concurrent_agents",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads},
        "settings": {
            "peer_defaults": args.peer_defaults,
            "dtype": args.dtype or "each server's default",
            "vllm_args": " ".join(_vllm_flags(args)),
            "repeats": args.repeats,
            "agents": args.agents,
            "doc_tokens": args.doc_tokens,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "streaming": True,
            "kvagent_max_batch": "default" if args.peer_defaults else args.max_batch,
            "kvagent_prefill_chunk": args.prefill_chunk,
            "principals": args.principals,
        },
        "skipped": skipped,
        "cells": [asdict(c) for c in cells],
        "runs": [asdict(c) for c in runs],
        "ratios": _ratios(cells),
        "vs_vllm": _vs_vllm(cells),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for line in _side_by_side(result["ratios"]):
        print(line)
    for key, v in result["vs_vllm"].items():
        print(f"{key:>40}: wall {v['wall']:.2f}x, TTFT median {v['ttft_median']}x bare vLLM's (same run)")
    print(f"wrote {args.json}")
    return 0


def _modes(name: str, args: argparse.Namespace) -> list[str]:
    return list(args.principals) if name in KVAGENT_SERVERS else ["one"]


def _rotated(servers: list[Server], r: int) -> list[Server]:
    """Repeat ``r``'s order: the list rotated by ``r``, so each server runs first in some repeat (drift on a
    shared machine falls on every server alike)."""
    k = r % len(servers) if servers else 0
    return servers[k:] + servers[:k]


def medians(runs: list[Cell]) -> list[Cell]:
    """One cell per (server, document, agents, principals): the median of its repeats' wall time, TTFT median
    and p99 and tokens per second; failures and 5xx summed over the repeats (any failure shows)."""
    groups: dict[tuple[str, int, int, str], list[Cell]] = {}
    for c in runs:
        groups.setdefault((c.server, c.doc_tokens, c.agents, c.principals), []).append(c)

    def med(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return round(statistics.median(vals), 3) if vals else None

    out = []
    for (server, doc, n, mode), cs in groups.items():
        out.append(Cell(server, doc, n, mode, med([c.wall_s for c in cs]) or 0.0,
                        med([c.ttft_median_s for c in cs]), med([c.ttft_p99_s for c in cs]),
                        med([c.tokens_per_s for c in cs]) or 0.0,
                        int(statistics.median(c.output_tokens for c in cs)),
                        sum(c.failures for c in cs), sum(c.server_errors for c in cs),
                        sorted({e for c in cs for e in c.errors})[:5],
                        med([c.shared_prefix_reads for c in cs])))
    return out


def _vs_vllm(cells: list[Cell]) -> dict[str, dict[str, float | None]]:
    """Each other server's median wall time and TTFT median over bare vLLM's, per document and agent count
    (one principal), from the same run."""
    base = {(c.doc_tokens, c.agents): c for c in cells if c.server == "vllm"}
    out: dict[str, dict[str, float | None]] = {}
    for c in cells:
        b = base.get((c.doc_tokens, c.agents))
        if c.server == "vllm" or c.principals != "one" or b is None or not b.wall_s:
            continue
        ttft = (round(c.ttft_median_s / b.ttft_median_s, 2)
                if c.ttft_median_s is not None and b.ttft_median_s else None)
        key = f"{c.server}/{c.doc_tokens}/{c.agents}"
        out[key] = {"wall": round(c.wall_s / b.wall_s, 2), "ttft_median": ttft}
    return out


def _ratios(cells: list[Cell]) -> dict[str, float]:
    """Wall time of N agents over one agent's, per server, principals mode and document (the goals: at most
    3x; one principal and distinct principals alike); the one-principal rows keep their earlier names
    (``server/doc/agents``), the distinct ones are ``server/distinct/doc/agents``."""
    one = {(c.server, c.principals, c.doc_tokens): c.wall_s for c in cells if c.agents == 1}

    def name(c: Cell) -> str:
        mode = "" if c.principals == "one" else f"{c.principals}/"
        return f"{c.server}/{mode}{c.doc_tokens}/{c.agents}"

    return {
        name(c): round(c.wall_s / one[(c.server, c.principals, c.doc_tokens)], 2)
        for c in cells
        if c.agents > 1 and one.get((c.server, c.principals, c.doc_tokens))
    }


def _side_by_side(ratios: dict[str, float]) -> list[str]:
    """The N-agents-over-one ratios of each kvagent server, one principal beside distinct principals."""
    lines = []
    for key, one in ratios.items():
        server, rest = key.split("/", 1)
        if server in KVAGENT_SERVERS and not rest.startswith("distinct/"):
            distinct = ratios.get(f"{server}/distinct/{rest}")
            doc, n = rest.split("/")
            lines.append(f"{server:>12} doc={doc:>5} agents={n:>3}: one principal {one:.2f}x, "
                         f"distinct principals {'-' if distinct is None else f'{distinct:.2f}x'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
