"""Buying KV caches from a real registry process on loopback, on SQLite and on PostgreSQL: a 402 quote,
a credit, a purchase and the statement; a retried download charged once; a refund after a host running
the model proves an artifact poisoned; 64 concurrent buyers buying from 3 publishers.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvagent import artifact as art
from kvagent import cli
from kvagent.engine import GenerationParams, TransformersEngine
from kvagent.errors import RegistryAuthError, RegistryPaymentRequiredError
from kvagent.models import model_fingerprint
from kvagent.registry import RegistryClient
from kvagent.verification import verify_kv
from tests._kvfixtures import TEMPLATE_HASH, TOKENIZER_FP, make_artifact, make_kv
from tests.conftest import save_tiny_llama
from tests.registry_server import ServerProcess, start_server
from tests.test_server_postgres import _postgres_dsn

pytestmark = pytest.mark.slow

N_BUYERS, N_PUBLISHERS = 64, 3
PRICES = {"currency": "uUSD", "input_per_mtok": 5_000_000, "cached_input_per_mtok": 500_000,
          "output_per_mtok": 20_000_000, "commission_bps": 1000}
TOKENS: dict[str, dict[str, Any]] = {
    "admin-token-0001": {"principal": "operator", "admin": True},
    "alice-token-0001": {"principal": "alice", "publish": True},
    "mallory-token-01": {"principal": "mallory", "publish": True},
    "bob-token-000001": {"principal": "bob"},
    "carol-token-0001": {"principal": "carol"},
    "dave-token-00001": {"principal": "dave"},  # a buyer no other test funds
    **{f"pub-token-{i:04d}": {"principal": f"pub{i}", "publish": True} for i in range(N_PUBLISHERS)},
    **{f"buyer-token-{i:04d}": {"principal": f"buyer{i}"} for i in range(N_BUYERS)},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama and a 512-word tokenizer for it: the host loads both."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=7)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", eos_token="t1", bos_token="t2")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           model_dir: Path) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp(f"market-{request.param}")
    (base / "prices.json").write_text(json.dumps(PRICES))
    extra = ["--prices", str(base / "prices.json")]
    schema = None
    if request.param == "postgres":
        import psycopg
        from psycopg.conninfo import make_conninfo

        dsn = _postgres_dsn()
        schema = f"kvmarket_{secrets.token_hex(6)}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        extra += ["--postgres-dsn", make_conninfo(dsn, options=f"-c search_path={schema}")]
    srv = start_server(base / "data", TOKENS, model=str(model_dir), extra_args=extra)
    try:
        yield srv
    finally:
        srv.stop()
        if schema is not None:
            with psycopg.connect(_postgres_dsn(), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def client(srv: ServerProcess, token: str) -> RegistryClient:
    return RegistryClient(srv.url, token, retries=2, backoff_initial=0.01)


def token_of(principal: str) -> str:
    return next(t for t, info in TOKENS.items() if info["principal"] == principal)


def audit(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(srv.url + "/v1/market/audit", headers={"Authorization": "Bearer admin-token-0001"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_402_quote_then_credit_purchase_and_statement(server: ServerProcess,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    kv = make_kv(tokens=40, seed=101)
    with client(server, token_of("alice")) as alice, client(server, token_of("bob")) as bob, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(make_artifact(kv, publisher="alice")[1], visibility="public", price=1200)
        assert alice.price(h.key)["price"] == 1200
        # nothing served without money: a 402 with a machine-readable quote and no artifact bytes
        r = httpx.get(server.url + h.blob_url, headers={"Authorization": "Bearer bob-token-000001"})
        assert r.status_code == 402 and r.json()["quote"] == {
            "key": h.key, "price": 1200, "currency": "uUSD", "balance": 0, "reason": "insufficient_balance"}
        assert "X-KVAgent-Receipt" not in r.headers
        with pytest.raises(RegistryPaymentRequiredError) as e:
            bob.download_blob(h)
        assert e.value.quote["price"] == 1200
        with pytest.raises(RegistryAuthError):  # only an admin credits
            bob.credit("bob", 10**6)
        assert admin.credit("bob", 5000)["balance"] == 5000
        with pytest.raises(RegistryPaymentRequiredError) as e:
            bob.download_blob(h, max_price=1199)
        assert e.value.quote["reason"] == "price_above_max" and bob.account_balance() == 5000
        blob = bob.download_blob(h, max_price=1200)
        assert art.decode(blob.data).header.key == h.key and blob.receipt and blob.charge == 1200
        assert bob.account() == {"principal": "bob", "balance": 3800, "currency": "uUSD"}
        s = bob.statement()
        assert s["credits"] == 5000 and s["purchases"] == [
            {"key": h.key, "loads": 1, "amount": 1200, "royalties": 0, "refunds": 0}]
        assert alice.statement()["sales"] == [
            {"key": h.key, "loads": 1, "amount": 1080, "royalties": 0, "refunds": 0}]
        assert alice.set_price(h.key, 0) == 0
        free = bob.download_blob(h)  # free now: no transaction, no receipt
        assert (free.receipt, free.charge) == (None, 0) and bob.account_balance() == 3800
    # the same through the command line
    base = ["--registry", server.url, "--token"]
    assert cli.main([*base, "admin-token-0001", "account", "credit", "bob", "200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balance"] == 4000
    assert cli.main([*base, "bob-token-000001", "account", "balance", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balance"] == 4000
    assert cli.main([*base, "bob-token-000001", "account", "statement"]) == 0
    assert "purchases:" in capsys.readouterr().out
    assert cli.main([*base, "bob-token-000001", "account", "credit", "bob", "1"]) == 2  # not an admin


def test_retry_with_same_idempotency_key_charges_once(server: ServerProcess, model: Any) -> None:
    kv = make_kv(tokens=30, seed=202)
    with client(server, token_of("alice")) as alice, client(server, token_of("carol")) as carol, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(make_artifact(kv, publisher="alice")[1], visibility="public", price=700)
        admin.credit("carol", 1000)
        before = audit(server)["transactions"].get("sale", 0)
        key = uuid.uuid4().hex
        first = carol.download_blob(h, idempotency_key=key)
        again = carol.download_blob(h, idempotency_key=key)  # e.g. the connection broke and the SDK retried
        assert again.data == first.data and again.receipt == first.receipt and (first.charge, again.charge) == (700, 0)
        assert carol.account_balance() == 300 and audit(server)["transactions"]["sale"] == before + 1
        with pytest.raises(RegistryPaymentRequiredError):  # a new key is a new purchase, and 300 < 700
            carol.download_blob(h)


def _artifact(model: Any, seed: int, n: int, publisher: str, poison: bool = False) -> bytes:
    """The artifact of a KV of random ids computed by ``model``; ``poison`` alters one position of its
    last layer's values (the checksum is computed after, so only re-verification can tell)."""
    ids = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    kv = TransformersEngine(model).prefill(ids)
    if poison:
        values = list(kv.values)
        values[-1] = values[-1].clone()
        values[-1][:, :, 20, :] += 0.75
        kv = type(kv)(keys=kv.keys, values=tuple(values), token_ids=kv.token_ids)
    return art.encode(kv, model_fingerprint=model_fingerprint(model), tokenizer_fingerprint=TOKENIZER_FP,
                      template_hash=TEMPLATE_HASH, publisher=publisher)[1]


def test_refund_after_a_proven_poisoned_artifact(server: ServerProcess, model: Any) -> None:
    blob = _artifact(model, 5, 48, "mallory", poison=True)
    honest = _artifact(model, 6, 48, "alice")
    with client(server, token_of("mallory")) as mallory, client(server, token_of("alice")) as alice, \
            client(server, token_of("bob")) as bob, client(server, "admin-token-0001") as admin:
        h = mallory.publish(blob, visibility="public", price=900)
        ok = alice.publish(honest, visibility="public", price=100)
        admin.credit("bob", 1000)
        start = bob.account_balance()
        bought = bob.download_blob(h)
        receipt = bought.receipt
        assert receipt and bob.account_balance() == start - 900
        report = verify_kv(TransformersEngine(model), art.decode(bought.data).kv, "full")  # the buyer's own check
        assert not report.ok
        d = bob.dispute(h.key, receipt, layer=1, position=20, difference=report.max_rel_diff, detail=report.reason)
        assert d["status"] == "refunded" and d["refund_receipt"], d
        assert bob.account_balance() == start
        # quarantined: nobody else is served it, and everything answers as for a missing key
        with client(server, token_of("carol")) as carol:
            assert carol.lookup(h.key) is None
        r = httpx.get(server.url + h.blob_url, headers={"Authorization": "Bearer carol-token-0001"})
        assert r.status_code == 404
        assert bob.dispute(h.key, receipt)["status"] == "refunded"  # and never refunded twice
        assert bob.account_balance() == start
        # an honest artifact's dispute is re-verified and rejected: no refund
        honest_receipt = str(bob.download_blob(ok).receipt)
        d2 = bob.dispute(ok.key, honest_receipt, detail="I just do not like it")
        assert d2["status"] == "rejected" and bob.account_balance() == start - 100
        with pytest.raises(Exception, match="404"):  # a receipt is its buyer's only
            alice.dispute(ok.key, honest_receipt)
    a = audit(server)
    assert a["unbalanced"] == [] and a["total"] == 0


def test_64_concurrent_buyers_from_3_publishers(server: ServerProcess) -> None:
    """Afterwards: no balance negative, every transaction sums to zero, money unchanged, charges == loads.
    On PostgreSQL (row locks across connections); SQLite serialises every writer in one process."""
    if "--postgres-dsn" not in server.args:
        pytest.skip("the concurrent-buyers race runs against PostgreSQL")
    prices = [300, 500, 700]
    handles = []
    for i in range(N_PUBLISHERS):
        with client(server, token_of(f"pub{i}")) as pub:
            blob = make_artifact(make_kv(tokens=24, seed=300 + i), publisher=f"pub{i}")[1]
            handles.append(pub.publish(blob, visibility="public", price=prices[i]))
    credit = 1000  # enough for some purchases, not all: some buyers get 402s
    with client(server, "admin-token-0001") as admin:
        for b in range(N_BUYERS):
            admin.credit(f"buyer{b}", credit)
    before = audit(server)
    served: list[tuple[str, str, int]] = []
    refused = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(N_BUYERS, timeout=60)

    errors: list[BaseException] = []

    def buyer(b: int) -> None:
        try:
            buy(b)
        except BaseException as exc:  # a thread's failure must fail the test
            errors.append(exc)

    def buy(b: int) -> None:
        with client(server, token_of(f"buyer{b}")) as c:
            barrier.wait()
            for j in range(4):
                h = handles[(b + j) % N_PUBLISHERS]
                key = f"b{b}-{j}"
                try:
                    got = c.download_blob(h, idempotency_key=key)
                    if j == 0:
                        again = c.download_blob(h, idempotency_key=key)  # a retry: must not charge again
                        assert again.charge == 0 and again.receipt == got.receipt
                except RegistryPaymentRequiredError:
                    with lock:
                        refused[0] += 1
                    continue
                assert len(got.data) == h.size and got.receipt and got.charge == prices[(b + j) % N_PUBLISHERS]
                with lock:
                    served.append((f"buyer{b}", str(got.receipt), got.charge))

    threads = [threading.Thread(target=buyer, args=(b,)) for b in range(N_BUYERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]
    after = audit(server)
    assert after["negative"] == {} and after["unbalanced"] == [] and after["total"] == 0
    assert after["money_issued"] == before["money_issued"]  # money only moved
    sales = after["transactions"]["sale"] - before["transactions"].get("sale", 0)
    assert sales == len(served) == len({r for _, r, _ in served}) and refused[0] > 0
    spent = sum(p for _, _, p in served)
    balances = {}
    for b in range(N_BUYERS):
        with client(server, token_of(f"buyer{b}")) as c:
            balances[f"buyer{b}"] = c.account_balance()
    assert all(v >= 0 for v in balances.values())
    for b in range(N_BUYERS):
        assert balances[f"buyer{b}"] == credit - sum(p for who, _, p in served if who == f"buyer{b}")
    earned = 0
    for i in range(N_PUBLISHERS):
        with client(server, token_of(f"pub{i}")) as pub:
            earned += sum(line["amount"] for line in pub.statement()["sales"] if line["key"] == handles[i].key)
    assert earned + (after["host"] - before["host"]) == spent  # every charged micro-unit went somewhere


def test_hosted_generate_is_charged_and_pays_a_royalty(server: ServerProcess, model: Any) -> None:
    blob = _artifact(model, 9, 64, "alice")
    with client(server, token_of("alice")) as alice, client(server, token_of("carol")) as carol, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(blob, visibility="public", price=50)
        admin.credit("carol", 10_000)
        start, royalty_before = carol.account_balance(), _royalties(alice, h.key)
        stream = carol.generate_stream(h.key, [1, 2, 3], GenerationParams(max_new_tokens=5))
        toks = list(stream)
        assert len(toks) == 5 and stream.receipt and stream.charge == 15 + 32 + 100 + 50
        # 3 input tokens at 5 uUSD, 64 cached at 0.5, 5 output at 20, plus the publisher's 50
        assert carol.account_balance() == start - (15 + 32 + 100 + 50)
        assert _royalties(alice, h.key) == royalty_before + 45  # 50 less the 10% commission


def _royalties(c: RegistryClient, key: str) -> int:
    return sum(int(line["royalties"]) for line in c.statement()["sales"] if line["key"] == key)


def test_the_sdk_buys_within_its_limits_and_prefills_on_402(server: ServerProcess, model: Any,
                                                           tmp_path: Path) -> None:
    """KVAgent's money settings: a 402 or a price above the limit is a local prefill with the reason, never an
    error; a purchase within them is made, said in the reason, and charged once."""
    from kvagent import KVAgent
    from kvagent.policy import PolicyParams

    ids = [(7 * i + 3) % 500 + 3 for i in range(600)]
    alice = KVAgent(model, cache_dir=tmp_path / "a", registry_url=server.url, token="alice-token-0001")
    alice.publish(alice.read_ids(ids), "public", price=1000)
    alice.close()
    fetch_pays = PolicyParams(min_tokens=64, prefill_tokens_per_s=20)  # time favours fetching: money decides

    def buyer(name: str, **kw: Any) -> KVAgent:
        return KVAgent(model, cache_dir=tmp_path / name, registry_url=server.url, token="dave-token-00001",
                       policy=fetch_pays, calibration=False, **kw)

    broke = buyer("broke").read_ids(ids)  # dave has no money yet: 402
    assert broke.cache.status == "prefill" and "not bought" in broke.cache.reason, broke.cache.reason
    client(server, "admin-token-0001").credit("dave", 5000)
    capped = buyer("capped", max_price_per_load=500).read_ids(ids)
    assert capped.cache.status == "prefill" and "exceeds the 500" in capped.cache.reason, capped.cache.reason
    agent = buyer("funded", budget=4000)
    doc = agent.read_ids(ids)
    assert doc.cache.status == "remote" and "bought for 1000" in doc.cache.reason, doc.cache.reason
    assert agent.resolver.spent == 1000 and client(server, "dave-token-00001").account_balance() == 4000
    agent.close()
