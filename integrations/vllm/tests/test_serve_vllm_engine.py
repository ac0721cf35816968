"""``kvagent serve --engine vllm`` as a real process (vLLM on CPU, the embedded SmolLM2), driven by the
official ``openai`` client: greedy replies equal ``transformers.generate`` on the same ids, a document an SDK
agent published to a registry is reused through the connector, concurrent streams stay exact, a client that
goes away mid-stream breaks nothing, per-principal privacy holds, and a bad engine name is a clear error exit.

The engine is named by its ``module:attr`` spec, so the test does not depend on installed entry-point metadata
(``--engine vllm`` resolves to the same factory through the ``kvagent.engines`` entry point).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.vllm

from tests.registry_server import start_server  # noqa: E402
from vllm_procs import INTEGRATION, VLLM_TOKEN  # noqa: E402

ENGINE = "vllm_kvagent.engine:create_engine"
TOKENS: dict[str, dict[str, object]] = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
    "admin-token-0003": {"principal": "operator", "admin": True},
}
ALICE, BOB, ADMIN = "alice-token-0001", "bob-token-000002", "admin-token-0003"
#: the host's token prices: every chat is pre-charged, then settled on what vLLM reused
PRICES = {"currency": "uUSD", "input_per_mtok": 5_000_000, "cached_input_per_mtok": 500_000,
          "output_per_mtok": 20_000_000}


@pytest.fixture(scope="module")
def server(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``kvagent serve --engine vllm --model smollm2`` whose upstream registry is the session's registry."""
    env = {
        "PYTHONPATH": os.pathsep.join([str(INTEGRATION), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_KVAGENT_ENGINE_ARGS": json.dumps(
            {"max_model_len": 2048, "enforce_eager": os.environ.get("KVAGENT_VLLM_COMPILE") != "1"}
        ),
        # loopback, and vLLM's prefill on a shared 2-core machine: fetching a published document pays
        "VLLM_KVAGENT_CONNECTOR": json.dumps(
            {"calibration": False, "bandwidth_bytes_per_s": 1e9, "prefill_tokens_per_s": 300.0}
        ),
        "KVAGENT_REGISTRY_URL": registry.url,
        "KVAGENT_REGISTRY_TOKEN": VLLM_TOKEN,
    }
    work = tmp_path_factory.mktemp("vengine")
    prices = work / "prices.json"
    prices.write_text(json.dumps(PRICES))
    srv = start_server(work / "data", TOKENS, model="smollm2", timeout=900, extra_env=env,
                       extra_args=["--engine", ENGINE, "--max-batch", "4", "--prices", str(prices)])
    from kvagent.client.registry import RegistryClient

    with RegistryClient(srv.url, ADMIN) as admin:
        for name in ("alice", "bob"):
            admin.credit(name, 10**9)
    yield srv
    srv.stop(timeout=60)


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def client(server: Any, token: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0, timeout=600)


def ask(question: str, doc: str | None = None) -> list[dict[str, str]]:
    """A user turn (after the template's default system prompt, as an SDK agent's document read renders)."""
    return [{"role": "user", "content": f"{doc}\n\nQuestion: {question}" if doc else question}]


def reference(reference_model: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy reply of a full prefill of the same ids with plain ``transformers.generate``."""
    import torch

    model, tok = reference_model
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(ids):].tolist()
    return str(tok.decode([t for t in new if t not in stops], skip_special_tokens=True))


def text_of(paragraphs: list[str], start: int, tokens: int, tok: Any) -> str:
    out: list[str] = []
    i = start
    while len(tok.encode("\n\n".join(out), add_special_tokens=False)) < tokens:
        out.append(f"Section {i}. {paragraphs[i % len(paragraphs)]}")
        i += 1
    return "\n\n".join(out)


def streamed(c: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Any]:
    chunks = list(c.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}))
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage


def test_greedy_reply_equals_full_prefill_and_streaming_equals_whole(
    server: Any, reference_model: Any
) -> None:
    c = client(server)
    msgs = ask("Name a colour.")
    whole = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=16)
    text, usage = streamed(c, msgs, 16)
    assert whole.choices[0].message.content == text == reference(reference_model, msgs, 16)
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert whole.model_extra["kvagent"]["cache"]["status"] == "engine"


def test_a_document_an_sdk_agent_published_is_reused(
    server: Any, alice: Any, paragraphs: list[str], reference_model: Any
) -> None:
    body = text_of(paragraphs, 3, 700, reference_model[1])
    doc = alice.read(body)
    alice.publish(doc, "public")
    msgs = ask("What is this text about?", body)
    r = client(server, BOB).chat.completions.create(model="smollm2", messages=msgs, temperature=0,
                                                    max_tokens=16)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= 256, (cached, r.model_extra["kvagent"], server.log()[-3000:])
    assert r.choices[0].message.content == reference(reference_model, msgs, 16)
    assert "from kvagent (registry" in server.log()


def test_a_document_published_to_this_server_is_reused_by_those_who_may_see_it(
    server: Any, paragraphs: list[str], reference_model: Any, tmp_path: Path
) -> None:
    """No upstream registry has it: the host stages what the caller may see for the connector. Alice's
    restricted document is reused for her chat (exact reply, charged on what vLLM reused), never for Bob's;
    once she grants it to Bob, for his too. The ledger stays balanced."""
    from kvagent import KVAgent
    from kvagent.client.registry import RegistryClient
    from kvagent.costs.market import HostPrices, generate_bill

    body = text_of(paragraphs, 21, 700, reference_model[1])
    publisher = KVAgent(cache_dir=tmp_path / "pub", registry_url=server.url, token=ALICE, calibration=False)
    try:
        doc = publisher.read(body)
        handle = publisher.publish(doc, "restricted")
    finally:
        publisher.close()
    n_doc = len(doc.token_ids)
    most = n_doc - 128  # vLLM's CPU backend reuses whole 128-token blocks
    msgs = ask("What is this text about?", body)
    want = reference(reference_model, msgs, 16)
    bob = client(server, BOB).chat.completions.create(model="smollm2", messages=msgs, temperature=0,
                                                      max_tokens=16)
    assert bob.usage.prompt_tokens_details.cached_tokens < 64, (bob.model_extra["kvagent"], n_doc)
    assert bob.choices[0].message.content == want
    with RegistryClient(server.url, ALICE) as account:
        before = account.account_balance()
        r = client(server, ALICE).chat.completions.create(model="smollm2", messages=msgs, temperature=0,
                                                          max_tokens=16)
        spent = before - account.account_balance()
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= most, (cached, n_doc, r.model_extra["kvagent"], server.log()[-3000:])
    assert r.choices[0].message.content == want
    assert "staged" in server.log()
    bill = generate_bill(HostPrices(**PRICES), r.usage.prompt_tokens - cached, cached,  # type: ignore[arg-type]
                         r.usage.completion_tokens, 0)
    assert spent == bill.total, (spent, bill, r.usage)
    with RegistryClient(server.url, ALICE) as owner:
        owner.grant(handle.key, "bob")
    again = client(server, BOB).chat.completions.create(
        model="smollm2", messages=ask("Who wrote it?", body), temperature=0, max_tokens=8)
    assert again.usage.prompt_tokens_details.cached_tokens >= most, again.model_extra["kvagent"]
    audit = httpx.get(server.url + "/v1/market/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert audit["total"] == 0 and audit["unbalanced"] == [], audit


def test_a_deleted_document_is_not_reused_from_a_staged_copy_or_vllms_cache(
    server: Any, paragraphs: list[str], reference_model: Any, tmp_path: Path
) -> None:
    """Issue 34: alice's public document, staged in bob's namespace for his chat (and in vLLM's prefix cache,
    salted by his namespace), is reused by neither once alice deletes it: the staged copy goes with the
    artifact, and vLLM's prefix cache is reset."""
    from kvagent import KVAgent

    body = text_of(paragraphs, 41, 700, reference_model[1])
    publisher = KVAgent(cache_dir=tmp_path / "pub", registry_url=server.url, token=ALICE, calibration=False)
    try:
        doc = publisher.read(body)
        handle = publisher.publish(doc, "public")
    finally:
        publisher.close()
    most = len(doc.token_ids) - 128  # vLLM's CPU backend reuses whole 128-token blocks
    msgs = ask("What is this text about?", body)
    c = client(server, BOB)
    first = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=8)
    assert first.usage.prompt_tokens_details.cached_tokens >= most, first.model_extra["kvagent"]
    r = httpx.delete(f"{server.url}/v1/artifacts/{handle.key}", headers={"Authorization": f"Bearer {ALICE}"},
                     timeout=60)
    assert r.status_code == 204, r.text
    after = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=8)
    assert after.usage.prompt_tokens_details.cached_tokens < 64, after.model_extra["kvagent"]
    assert after.choices[0].message.content == reference(reference_model, msgs, 8)


def test_private_prompts_stay_with_their_principal(
    server: Any, paragraphs: list[str], reference_model: Any
) -> None:
    secret = "Alice's private notes. " + text_of(paragraphs, 11, 500, reference_model[1])
    msgs = ask("Summarise.", secret)
    a = client(server, ALICE)
    first = a.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=4)
    again = a.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=4)
    bob = client(server, BOB).chat.completions.create(model="smollm2", messages=msgs, temperature=0,
                                                      max_tokens=4)
    assert again.usage.prompt_tokens_details.cached_tokens > 0.5 * again.usage.prompt_tokens
    assert bob.usage.prompt_tokens_details.cached_tokens == 0, bob.model_extra["kvagent"]
    replies = {r.choices[0].message.content for r in (first, again, bob)}
    assert len(replies) == 1, replies


def test_concurrent_streams_are_exact_and_a_disconnect_breaks_none(server: Any, reference_model: Any) -> None:
    questions = ["Name a fruit.", "Name a planet.", "Name a river.", "Name a tree."]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = streamed(client(server), ask(questions[i]), 20)[0]
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def hang_up() -> None:  # a fifth client reads two chunks of a long reply, then goes away
        body = {"model": "smollm2", "messages": ask("Tell a long story."), "temperature": 0,
                "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600,
                          headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 3:
                    break

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)] + [threading.Thread(target=hang_up)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i, q in enumerate(questions):
        assert results[i] == reference(reference_model, ask(q), 20), q
    after = client(server).chat.completions.create(model="smollm2", messages=ask("Name a colour."),
                                                   temperature=0, max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length")
    aborted = [int(n) for n in re.findall(r"cancelled after (\d+) tokens", server.log())]
    assert aborted and min(aborted) < 200, "the hung-up request was not aborted in vLLM"


def test_guided_json_and_hosted_generate_run_on_vllm(
    server: Any, model_dir: Path, paragraphs: list[str], reference_model: Any, tmp_path: Path
) -> None:
    import torch
    from kvagent import KVAgent

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["city", "year"]}
    r = client(server).chat.completions.create(
        model="smollm2", temperature=0, max_tokens=12,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        messages=[{"role": "user", "content": "Paris was founded long ago. Give city and year."}],
    )
    out = json.loads(r.choices[0].message.content or "")
    assert set(out) == {"city", "year"} and isinstance(out["year"], int)
    # /generate on an artifact published to this host: vLLM gets the artifact's ids plus the suffix
    model, tok = reference_model
    publisher = KVAgent(cache_dir=tmp_path / "pub", registry_url=server.url, token=ALICE, calibration=False)
    try:
        doc = publisher.read(text_of(paragraphs, 7, 300, tok))
        handle = publisher.publish(doc, "public")
        suffix = list(publisher.template.question_ids(tok, "What is it about?"))  # type: ignore[union-attr]
    finally:
        publisher.close()
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    body = {"suffix_ids": suffix, "max_new_tokens": 12, "stop_token_ids": stops}
    resp = httpx.post(f"{server.url}/v1/artifacts/{handle.key}/generate", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {BOB}"})
    assert resp.status_code == 200, resp.text
    lines = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
    got = [x["token"] for x in lines if "token" in x]
    ids = [*doc.token_ids, *suffix]
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])[0, len(ids):].tolist()
    ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in stops), len(ref))]
    assert got == ref and lines[-1]["done"] is True


@pytest.mark.parametrize(
    ("engine", "expected"),
    [("nosuch", "unknown engine 'nosuch'"), ("vllm_kvagent.nope:create", "cannot be imported")],
)
def test_a_bad_engine_is_a_clear_error_exit(tmp_path: Path, engine: str, expected: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INTEGRATION), str(Path(__file__).parents[3])])}
    proc = subprocess.run(
        [sys.executable, "-m", "kvagent.server", "--data-dir", str(tmp_path), "--model", "smollm2",
         "--engine", engine],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "install" in proc.stderr, proc.stderr[-2000:]
