"""Buying KV caches from a real registry process on loopback, on SQLite and on PostgreSQL: a 402 quote,
a credit, a purchase and the statement; a retried download charged once; a refund after a host running
the model proves an artifact poisoned; 64 concurrent buyers buying from 3 publishers.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvagent import cli
from kvagent.artifacts import format as art
from kvagent.client.registry import RegistryClient
from kvagent.engines.hf import TransformersEngine
from kvagent.engines.params import GenerationParams
from kvagent.errors import (
    RegistryAuthError,
    RegistryConflictError,
    RegistryPaymentRequiredError,
    RegistryRejectedError,
)
from kvagent.models import model_fingerprint
from kvagent.tiers.verification import verify_kv
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
    "erin-token-00001": {"principal": "erin"},  # the adjustments test's
    "frank-token-0001": {"principal": "frank"},  # the reused Idempotency-Key test's
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
        assert (
            again.data == first.data
            and again.receipt == first.receipt
            and (first.charge, again.charge) == (700, 0)
        )
        receipt = first.receipt
        raw = httpx.get(server.url + h.blob_url, headers={"Authorization": f"Bearer {token_of('carol')}",
                                                          "Idempotency-Key": key})
        # the registry's own answer: the blob (local) or a presigned redirect (S3), with the payment headers
        assert raw.status_code == (307 if server.on_s3 else 200)
        assert raw.headers["X-KVAgent-Receipt"] == receipt
        assert (raw.headers["X-KVAgent-Charged"], raw.headers["X-KVAgent-Replayed"]) == ("0", "1")  # no money
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
        # the buyer's own check
        report = verify_kv(TransformersEngine(model), art.decode(bought.data).kv, "full")
        assert not report.ok
        d = bob.dispute(
            h.key, receipt, layer=1, position=20, difference=report.max_rel_diff, detail=report.reason
        )
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
                assert (
                    len(got.data) == h.size and got.receipt and got.charge == prices[(b + j) % N_PUBLISHERS]
                )
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
            earned += sum(
                line["amount"] for line in pub.statement()["sales"] if line["key"] == handles[i].key
            )
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
    from kvagent.costs.policy import PolicyParams

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
    assert agent.resolver.registry_tier.spent == 1000
    assert client(server, "dave-token-00001").account_balance() == 4000
    agent.close()


def _admin_post(srv: ServerProcess, path: str, body: dict[str, Any],
                key: str | None = None) -> httpx.Response:
    headers = {"Authorization": "Bearer admin-token-0001", **({"Idempotency-Key": key} if key else {})}
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=30)


def test_admin_adjustments_and_credits_to_known_principals(server: ServerProcess,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A mistaken credit is undone by a debit with a reason (its own kind, in the statement and the audit);
    a debit never overdraws unless a debt is recorded; money goes only to principals a token names; a
    repeated Idempotency-Key posts nothing and says so."""
    ghost = _admin_post(server, "/v1/account/credit", {"principal": "ghost-not-in-token-file", "amount": 5})
    assert (ghost.status_code, ghost.json()["error"]) == (422, "unknown_principal"), ghost.text
    assert "ghost-not-in-token-file" in ghost.json()["detail"]
    r = _admin_post(server, "/v1/account/adjust", {"principal": "ghost-2", "amount": 5, "reason": "x"})
    assert (r.status_code, r.json()["error"]) == (422, "unknown_principal")
    r = _admin_post(server, "/v1/account/credit", {"principal": "#mint", "amount": 5, "create": True})
    assert r.status_code == 422  # the system accounts are out of reach
    made = _admin_post(server, "/v1/account/credit", {"principal": "later-user", "amount": 5, "create": True})
    assert made.status_code == 200 and made.json()["balance"] == 5  # an explicit create
    with client(server, token_of("erin")) as erin, client(server, "admin-token-0001") as admin:
        start = erin.account_balance()
        first = _admin_post(server, "/v1/account/credit", {"principal": "erin", "amount": 1000}, key="pi_42")
        again = _admin_post(server, "/v1/account/credit", {"principal": "erin", "amount": 1000}, key="pi_42")
        assert first.json()["credited"] == 1000 and first.json()["replayed"] is False
        assert again.json()["receipt"] == first.json()["receipt"] and again.json()["credited"] == 0
        assert again.json()["replayed"] is True and again.headers["X-KVAgent-Replayed"] == "1"
        assert erin.account_balance() == start + 1000
        r = _admin_post(server, "/v1/account/credit", {"principal": "erin", "amount": 999}, key="pi_42")
        assert r.status_code == 422  # the key belongs to another credit
        # the mistaken credit undone: a debit with a reason, once however often it is sent
        body = {"principal": "erin", "amount": -1000, "reason": "credited twice by mistake (pi_42)"}
        fix = _admin_post(server, "/v1/account/adjust", body, key="fix-pi_42")
        assert fix.status_code == 200, fix.text
        assert _admin_post(server, "/v1/account/adjust", body, key="fix-pi_42").json()["adjusted"] == 0
        assert fix.json()["adjusted"] == -1000 and erin.account_balance() == start
        for bad in ({"principal": "erin", "amount": -1}, {"principal": "erin", "amount": -1, "reason": ""},
                    {"principal": "erin", "amount": 0, "reason": "r"},
                    {"principal": "erin", "amount": -(10**15) - 1, "reason": "r"}):
            assert _admin_post(server, "/v1/account/adjust", bad).status_code == 422, bad
        over = _admin_post(server, "/v1/account/adjust", {"principal": "erin", "amount": -(start + 1),
                                                          "reason": "chargeback"})
        assert (over.status_code, over.json()["error"]) == (409, "insufficient_balance")
        assert over.json()["balance"] == start
        debt = admin.adjust("erin", -(start + 1), "chargeback of spent money", allow_negative=True)
        assert debt["balance"] == -1 and debt["adjusted"] == -(start + 1)
        assert admin.adjust("erin", 1, "debt forgiven")["balance"] == 0
        with pytest.raises(RegistryAuthError):
            erin.adjust("erin", 10**6, "I would like more")
        s = erin.statement()
        reasons = [(a["amount"], a["reason"]) for a in s["adjustments"]]
        assert reasons[-3:] == [(-1000, "credited twice by mistake (pi_42)"),
                                (-(start + 1), "chargeback of spent money"), (1, "debt forgiven")]
        a = audit(server)
        assert a["unbalanced"] == [] and a["total"] == 0 and "erin" not in a["negative"]
        assert a["adjustments"][0]["by"] == "operator" and a["adjustments"][0]["reason"] == "debt forgiven"
    base = ["--registry", server.url, "--token", "admin-token-0001", "account"]
    assert cli.main([*base, "adjust", "erin", "7", "--reason", "goodwill", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balance"] == 7
    assert cli.main([*base, "adjust", "erin", "-7", "--reason", "goodwill reversed",
                     "--idempotency-key", "g1"]) == 0
    assert "adjusted erin by -7" in capsys.readouterr().out
    assert cli.main([*base, "credit", "ghost-not-in-token-file", "5"]) != 0


def test_a_second_dispute_returns_the_first(server: ServerProcess) -> None:
    """Filed again, or by 8 threads at once, a receipt's dispute is one dispute (201 once, then 200)."""
    h_blob = make_artifact(make_kv(tokens=24, seed=404), publisher="alice")[1]  # not the host's model: open
    with client(server, token_of("alice")) as alice, client(server, token_of("carol")) as carol, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(h_blob, visibility="public", price=10)
        admin.credit("carol", 100)
        receipts = []
        for _ in range(2):
            receipts.append(str(carol.download_blob(h).receipt))
    auth = {"Authorization": f"Bearer {token_of('carol')}"}
    before = len(httpx.get(server.url + "/v1/account/disputes", headers=auth).json()["disputes"])
    url = f"{server.url}/v1/artifacts/{h.key}/disputes"
    first = httpx.post(url, json={"receipt": receipts[0], "detail": "first"}, headers=auth, timeout=30)
    second = httpx.post(url, json={"receipt": receipts[0], "detail": "second"}, headers=auth, timeout=30)
    assert (first.status_code, second.status_code) == (201, 200), (first.text, second.text)
    assert second.json() == first.json() and second.headers["X-KVAgent-Replayed"] == "1"
    assert first.json()["status"] == "open"
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(8)

    def file() -> None:
        barrier.wait()
        answers.append(httpx.post(url, json={"receipt": receipts[1]}, headers=auth, timeout=60))

    threads = [threading.Thread(target=file) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(r.status_code for r in answers) == [200] * 7 + [201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(httpx.get(server.url + "/v1/account/disputes", headers=auth).json()["disputes"]) == before + 2
    with client(server, token_of("carol")) as carol:  # the SDK takes a repeat's 200 as a first's 201
        assert carol.dispute(h.key, receipts[1])["id"] == answers[0].json()["id"]


def test_charged_headers_add_up_to_what_the_ledger_moved(server: ServerProcess) -> None:
    """64 concurrent buyers on a real server (SQLite and PostgreSQL), each buying, retrying with the same
    Idempotency-Key (also two requests of one key at once), refused by 402s: the sum of every answer's
    X-KVAgent-Charged equals what left the buyers' accounts, replays report 0, and money is conserved."""
    prices = [130, 170, 210]
    handles = []
    for i in range(N_PUBLISHERS):
        with client(server, token_of(f"pub{i}")) as pub:
            blob = make_artifact(make_kv(tokens=24, seed=500 + i), publisher=f"pub{i}")[1]
            handles.append(pub.publish(blob, visibility="public", price=prices[i]))
    credit = 600
    with client(server, "admin-token-0001") as admin:
        for b in range(N_BUYERS):
            admin.credit(f"buyer{b}", credit)
    before = audit(server)
    start = {}
    for b in range(N_BUYERS):
        with client(server, token_of(f"buyer{b}")) as c:
            start[b] = c.account_balance()
    charged: dict[int, int] = {b: 0 for b in range(N_BUYERS)}
    receipts: dict[str, int] = {}  # receipt -> the charge its first answer reported
    replays, refused = [0], [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_BUYERS, timeout=120)

    def get(http: httpx.Client, h: Any, key: str) -> httpx.Response:
        return http.get(h.blob_url, headers={"Idempotency-Key": key})

    def buy(b: int) -> None:
        auth = {"Authorization": f"Bearer {token_of(f'buyer{b}')}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=120) as http:
            barrier.wait()
            for j in range(5):
                h = handles[(b + j) % N_PUBLISHERS]
                key = f"bb{b}-{j}-{uuid.uuid4().hex[:8]}"
                tries = 2 + (j == 0)
                if j == 1:  # two requests of one key at once: one purchase
                    with ThreadPoolExecutor(2) as pool:
                        answers = [f.result() for f in [pool.submit(get, http, h, key) for _ in range(2)]]
                else:
                    answers = [get(http, h, key) for _ in range(tries)]
                for r in answers:
                    if r.status_code == 402:
                        assert r.json()["quote"]["reason"] == "insufficient_balance"
                        assert "X-KVAgent-Charged" not in r.headers
                        with lock:
                            refused[0] += 1
                        continue
                    if server.on_s3:  # a presigned redirect carries the payment headers, not the bytes
                        assert r.status_code == 307 and r.headers["location"], r.text[:200]
                    else:
                        assert r.status_code == 200 and len(r.content) == h.size, r.text[:200]
                    amount = int(r.headers["X-KVAgent-Charged"])
                    rcpt = r.headers["X-KVAgent-Receipt"]
                    with lock:
                        charged[b] += amount
                        if r.headers.get("X-KVAgent-Replayed") == "1":
                            assert amount == 0
                            replays[0] += 1
                        else:
                            assert amount == prices[(b + j) % N_PUBLISHERS] and rcpt not in receipts
                            receipts[rcpt] = amount

    def buyer(b: int) -> None:
        try:
            buy(b)
        except BaseException as exc:  # a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=buyer, args=(b,)) for b in range(N_BUYERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]
    after = audit(server)
    assert after["negative"] == {} and after["unbalanced"] == [] and after["total"] == 0
    assert after["money_issued"] == before["money_issued"]  # money only moved
    sales = after["transactions"]["sale"] - before["transactions"].get("sale", 0)
    assert sales == len(receipts) and replays[0] >= N_BUYERS and refused[0] > 0
    moved = 0
    for b in range(N_BUYERS):
        with client(server, token_of(f"buyer{b}")) as c:
            balance = c.account_balance()
        assert balance >= 0 and start[b] - balance == charged[b], (b, start[b], balance, charged[b])
        moved += start[b] - balance
    assert sum(charged.values()) == moved == sum(receipts.values())
    earned = 0
    for i in range(N_PUBLISHERS):
        with client(server, token_of(f"pub{i}")) as pub:
            earned += sum(x["amount"] for x in pub.statement()["sales"] if x["key"] == handles[i].key)
    assert earned + (after["host"] - before["host"]) == moved  # every charged micro-unit went somewhere


def test_a_chat_completion_reports_what_it_moved(server: ServerProcess) -> None:
    """A non-streamed chat completion is settled before it answers: X-KVAgent-Charged is the prepayment less
    any unused output tokens given back, exactly the buyer's balance change; its replay reports 0."""
    with client(server, "admin-token-0001") as admin:
        admin.credit("bob", 100_000)
    auth = {"Authorization": f"Bearer {token_of('bob')}"}
    model = httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "t5 t6 t7 t8 t1"}]}
    with client(server, token_of("bob")) as bob:
        start = bob.account_balance()
        key = uuid.uuid4().hex
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                       headers={**auth, "Idempotency-Key": key})
        assert r.status_code == 200, r.text
        spent = start - bob.account_balance()
        assert int(r.headers["X-KVAgent-Charged"]) == spent > 0
        again = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120,
                           headers={**auth, "Idempotency-Key": key})
        assert again.status_code == 200 and again.headers["X-KVAgent-Replayed"] == "1"
        assert again.headers["X-KVAgent-Charged"] == "0" and bob.account_balance() == start - spent
        assert again.json() == r.json()  # the stored answer, not a new generation (its id would differ)


def test_a_stop_string_ends_a_chat_and_only_the_tokens_up_to_it_are_paid(server: ServerProcess) -> None:
    """A chat reply cut by a stop string that spans two tokens: usage counts the tokens up to the one that
    completes it, and the buyer pays exactly the host's price of those (whole and streamed answers)."""
    from kvagent.costs.market import HostPrices, generate_bill

    prices = HostPrices(**PRICES)
    with client(server, "admin-token-0001") as admin:
        admin.credit("erin", 100_000)
    auth = {"Authorization": f"Bearer {token_of('erin')}"}
    model = httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"]
    body: dict[str, Any] = {"model": model, "max_tokens": 16, "temperature": 0,
                            "messages": [{"role": "user", "content": "t9 t8 t7 t30 t31"}]}
    free = httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth, timeout=120).json()
    words = free["choices"][0]["message"]["content"].split(" ")
    assert free["usage"]["completion_tokens"] == len(words) == 16, free  # one word per token, no stop token
    stop = words[3][-1] + " " + words[4][:2]  # ends word 3, begins word 4
    cut = next(j for j in range(len(words)) if stop in " ".join(words[: j + 1]))
    with client(server, token_of("erin")) as erin:
        for stream in (False, True):
            start = erin.account_balance()
            r = httpx.post(server.url + "/v1/chat/completions", headers=auth, timeout=120,
                           json={**body, "stop": [stop], "stream": stream,
                                 **({"stream_options": {"include_usage": True}} if stream else {})})
            assert r.status_code == 200, r.text
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                usage = chunks[-1]["usage"]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                reason = next(c["choices"][0]["finish_reason"] for c in chunks
                              if c["choices"] and c["choices"][0]["finish_reason"])
            else:
                usage = r.json()["usage"]
                text = r.json()["choices"][0]["message"]["content"]
                reason = r.json()["choices"][0]["finish_reason"]
            assert reason == "stop" and stop not in text and (text + stop).startswith(" ".join(words[:cut]))
            assert usage["completion_tokens"] == cut + 1, (stream, usage, cut)
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            paid = generate_bill(prices, usage["prompt_tokens"] - cached, cached, cut + 1, 0).total
            assert start - erin.account_balance() == paid, (stream, usage)
            if not stream:
                assert int(r.headers["X-KVAgent-Charged"]) == paid


def test_a_stop_token_ends_a_hosted_generate_and_only_the_tokens_up_to_it_are_paid(
    server: ServerProcess, model: Any
) -> None:
    blob = _artifact(model, 11, 64, "alice")
    with client(server, token_of("alice")) as alice, client(server, token_of("carol")) as carol, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(blob, visibility="public", price=50)
        admin.credit("carol", 10_000)
        full = list(carol.generate_stream(h.key, [4, 5, 6], GenerationParams(max_new_tokens=8)))
        stop = full[2]
        cut = full.index(stop)
        start = carol.account_balance()
        toks = list(carol.generate_stream(h.key, [4, 5, 6], GenerationParams(max_new_tokens=8,
                                                                             stop_token_ids=(stop,))))
        assert toks == full[: cut + 1]
        # 3 input tokens at 5 uUSD, 64 cached at 0.5, the tokens up to the stop at 20, the publisher's 50;
        # the server settles right after its last line, which the client may have read before
        want = start - (15 + 32 + 20 * (cut + 1) + 50)
        deadline = time.monotonic() + 30
        while carol.account_balance() != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert carol.account_balance() == want


def _metric(srv: ServerProcess, name: str) -> float:
    import re

    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _settled(c: RegistryClient, want: int) -> int:
    """The balance once it is ``want`` (a generation settles right after its last line), or as it stands."""
    deadline = time.monotonic() + 30
    while (got := c.account_balance()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_a_reused_idempotency_key_never_generates_again(server: ServerProcess, model: Any) -> None:
    """Issue 34's attack, black box: a funded buyer pays one 1-token chat with Idempotency-Key X (official
    openai client). X again with other prompts and max_tokens=64 is refused (422, idempotency_key_reused);
    X with the same request replays the stored answer; a streamed chat's key, repeated, is 409 already
    served. No token is generated for any repeat and the balance moves once per first request."""
    import openai

    with client(server, "admin-token-0001") as admin:
        admin.credit("frank", 1_000_000)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=token_of("frank"), max_retries=0)
    model_id = oa.models.list().data[0].id
    frank = client(server, token_of("frank"))
    start = frank.account_balance()
    x = {"Idempotency-Key": uuid.uuid4().hex}
    ask: dict[str, Any] = {"model": model_id, "temperature": 0,
                           "messages": [{"role": "user", "content": "t5 t6"}]}
    first = oa.chat.completions.with_raw_response.create(**ask, max_tokens=1, extra_headers=x)
    answer = first.parse()
    paid = int(first.headers["X-KVAgent-Charged"])
    assert paid > 0 and answer.usage is not None and answer.usage.completion_tokens == 1
    assert frank.account_balance() == start - paid
    tokens = _metric(server, "kvagent_generation_tokens_total")
    for prompt in ("t9 t10 t11", "t12 t13 t14 t15"):
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            oa.chat.completions.create(model=model_id, temperature=0, max_tokens=64, extra_headers=x,
                                       messages=[{"role": "user", "content": prompt}])
        assert refused.value.code == "idempotency_key_reused", refused.value.body
        assert isinstance(refused.value.body, dict) and refused.value.body["receipt"] == first.headers[
            "X-KVAgent-Receipt"]
    with pytest.raises(openai.UnprocessableEntityError):  # the same messages, more tokens: another request
        oa.chat.completions.create(**ask, max_tokens=64, extra_headers=x)
    again = oa.chat.completions.with_raw_response.create(**ask, max_tokens=1, extra_headers=x)
    assert again.parse().model_dump() == answer.model_dump()  # the stored answer, the same id included
    assert (again.headers["X-KVAgent-Replayed"], again.headers["X-KVAgent-Charged"]) == ("1", "0")
    assert again.headers["X-KVAgent-Receipt"] == first.headers["X-KVAgent-Receipt"]
    assert _metric(server, "kvagent_generation_tokens_total") == tokens
    assert frank.account_balance() == start - paid
    # a streamed chat keeps no answer: its key again is "already served", never a new stream
    y = {"Idempotency-Key": uuid.uuid4().hex}
    streamed = oa.chat.completions.with_raw_response.create(**ask, max_tokens=2, stream=True, extra_headers=y)
    assert len([c for c in streamed.parse() if c.choices and c.choices[0].delta.content]) >= 1
    paid_stream = start - paid - _settled(frank, start - paid - int(streamed.headers["X-KVAgent-Charged"]))
    tokens = _metric(server, "kvagent_generation_tokens_total")
    with pytest.raises(openai.ConflictError) as served:
        oa.chat.completions.create(**ask, max_tokens=2, stream=True, extra_headers=y)
    assert served.value.code == "idempotency_key_already_served"
    assert served.value.body["receipt"] == streamed.headers["X-KVAgent-Receipt"]  # type: ignore[index]
    assert _metric(server, "kvagent_generation_tokens_total") == tokens
    assert frank.account_balance() == start - paid - paid_stream
    # four copies of one request at once: one generates and is charged, the others wait on its key, then
    # are refused (409, it is still running) or replay its stored answer
    z = {"Authorization": f"Bearer {token_of('frank')}", "Idempotency-Key": uuid.uuid4().hex}
    body = {**ask, "max_tokens": 3}
    before = frank.account_balance()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(server.url + "/v1/chat/completions", json=body,
                                                     headers=z, timeout=120), range(4)))
    fresh = [a for a in answers if a.status_code == 200 and "X-KVAgent-Replayed" not in a.headers]
    assert len(fresh) == 1, [a.text for a in answers]
    for a in answers:
        assert a.status_code in (200, 409), a.text
        assert a.json() == fresh[0].json() if a.status_code == 200 else (
            a.json()["error"]["code"] == "idempotency_key_already_served")
    assert _metric(server, "kvagent_generation_tokens_total") == tokens + fresh[0].json()["usage"][
        "completion_tokens"]
    assert before - frank.account_balance() == int(fresh[0].headers["X-KVAgent-Charged"]) > 0
    frank.close()


def test_a_reused_idempotency_key_never_generates_again_on_hosted_generate(server: ServerProcess,
                                                                          model: Any) -> None:
    """The same for /v1/artifacts/{key}/generate: the key with another suffix or max_new_tokens is 422, with
    the same request 409 already served; and a generation refunded before its first token leaves a key that
    never serves again (not even for a valid request). Charged exactly once, no tokens generated again."""
    with client(server, token_of("alice")) as alice, client(server, token_of("frank")) as frank, \
            client(server, "admin-token-0001") as admin:
        h = alice.publish(_artifact(model, 13, 64, "alice"), visibility="public", price=50)
        admin.credit("frank", 100_000)
        start = frank.account_balance()

        def gen(suffix: list[int], n: int, key: str) -> Any:
            params = GenerationParams(max_new_tokens=n)
            return frank.generate_stream(h.key, suffix, params, idempotency_key=key)

        key = uuid.uuid4().hex
        stream = gen([1, 2, 3], 1, key)
        assert len(list(stream)) == 1 and stream.charge == 15 + 32 + 20 + 50
        assert _settled(frank, start - stream.charge) == start - stream.charge
        tokens = _metric(server, "kvagent_generated_tokens_total")
        for suffix, n in (([4, 5, 6], 64), ([1, 2, 3], 64)):
            with pytest.raises(RegistryRejectedError, match="another request"):
                list(gen(suffix, n, key))
        with pytest.raises(RegistryConflictError, match="already served"):
            list(gen([1, 2, 3], 1, key))
        auth = {"Authorization": f"Bearer {token_of('frank')}", "Idempotency-Key": key}
        raw = httpx.post(server.url + f"/v1/artifacts/{h.key}/generate", json={"suffix_ids": [1, 2, 3],
                         "max_new_tokens": 1}, headers=auth, timeout=60)
        assert raw.status_code == 409 and raw.json()["error"] == "idempotency_key_already_served"
        assert raw.json()["receipt"] == stream.receipt and "X-KVAgent-Receipt" not in raw.headers
        assert _metric(server, "kvagent_generated_tokens_total") == tokens
        assert frank.account_balance() == start - stream.charge
        # a generation that fails before its first token is refunded; its key never serves again
        bad = uuid.uuid4().hex
        with pytest.raises(RegistryRejectedError):
            list(gen([10**6], 8, bad))
        assert frank.account_balance() == start - stream.charge  # refunded
        with pytest.raises(RegistryRejectedError, match="another request"):  # the old hole: free tokens
            list(gen([1, 2], 8, bad))
        auth["Idempotency-Key"] = bad
        again = httpx.post(server.url + f"/v1/artifacts/{h.key}/generate", json={"suffix_ids": [10**6],
                           "max_new_tokens": 8}, headers=auth, timeout=60)
        assert again.status_code == 409 and again.json()["error"] == "idempotency_key_refunded", again.text
        assert _metric(server, "kvagent_generated_tokens_total") == tokens
        assert frank.account_balance() == start - stream.charge
