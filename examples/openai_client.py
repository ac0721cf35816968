"""Use kvagent from any OpenAI client: two questions about one document, the second resumes from its KV.

Runs offline: it starts ``kvagent serve --model smollm2`` on a free loopback port (as you would run it
yourself), then talks to it with the official ``openai`` package. Any OpenAI-compatible agent framework
(LangChain's ``ChatOpenAI``, LlamaIndex ``OpenAILike``, the OpenAI Agents SDK, curl) works the same way:
point its base URL at ``http://HOST:PORT/v1`` and use a registry token as the API key.

    python examples/openai_client.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import httpx
import openai


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kvagent-openai-example-"))
    (tmp / "tokens.json").write_text(json.dumps({"example-token-01": {"principal": "me"}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "kvagent.server", "--port", str(port), "--data-dir", str(tmp / "data"),
         "--token-file", str(tmp / "tokens.json"), "--model", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=base, api_key="example-token-01")
        doc = resources.files("kvagent").joinpath("data/sample.txt").read_text(encoding="utf-8")
        for question in ("How much does a single adult fare cost?", "Who founded the company?"):
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model="smollm2", temperature=0, max_tokens=48,
                messages=[{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}],
            )
            cache = (r.model_extra or {}).get("kvagent", {}).get("cache", {})
            print(f"Q: {question}\nA: {r.choices[0].message.content}")
            print(
                f"   {r.usage.prompt_tokens} prompt tokens, {r.usage.prompt_tokens_details.cached_tokens} "
                "cached "
                f"(from {cache.get('source') or 'nowhere: prefilled'}), {time.perf_counter() - t0:.2f} s\n"
            )
    finally:
        server.terminate()
        server.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
