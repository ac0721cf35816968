"""End to end against anvil and real host processes: a wallet-only KVAgent (no token) buys a document
another principal published at a price. It gets a 402 with x402 requirements, pays, resumes from the
registry's KV, and answers as a local full prefill does; the chain and the ledger move by exactly the
price. Every refusal (underfunded wallet, price above the cap, facilitator down) prefills locally with the
reason recorded and moves nothing. The publisher then withdraws its royalty, sent on chain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from eth_account import Account  # noqa: E402

from kvagent import KVAgent  # noqa: E402
from kvagent.costs.policy import PolicyParams  # noqa: E402
from tests.registry_server import ServerProcess, start_server  # noqa: E402
from tests.test_market_e2e import PRICES, model, model_dir  # noqa: E402,F401  (fixtures)
from tests.x402_chain import NETWORK, Chain, chain_or_skip  # noqa: E402

pytestmark = pytest.mark.slow

TOKENS: dict[str, dict[str, Any]] = {
    "admin-token-0001": {"principal": "operator", "admin": True},
    "alice-token-0001": {"principal": "alice", "publish": True},
}
ALICE, ADMIN = "alice-token-0001", "admin-token-0001"
PRICE = 1_500  # below the default 5 µ/token local prefill cost of a 400-token document
N = 400


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


def key_file(path: Path, key: str) -> Path:
    path.write_text(key)
    path.chmod(0o600)
    return path


def host_address(chain: Chain) -> str:
    return str(Account.from_key(chain.keys["host"]).address)


def x402_args(chain: Chain) -> list[str]:
    return ["--x402-network", NETWORK, "--x402-asset", chain.token, "--x402-token-name", chain.token_name,
            "--x402-token-version", chain.token_version]


def host(base: Path, tiny: Path, extra: list[str]) -> ServerProcess:
    base.mkdir(parents=True, exist_ok=True)
    (base / "prices.json").write_text(json.dumps(PRICES))
    return start_server(base / "data", TOKENS, model=str(tiny),
                        extra_args=["--prices", str(base / "prices.json"), *extra])


@pytest.fixture(scope="module")
def paid_host(chain: Chain, model_dir: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
              ) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("x402-host")
    srv = host(base, model_dir, [
        *x402_args(chain), "--x402-wallet", str(key_file(base / "host.key", chain.keys["host"])),
        "--x402-facilitator-key", str(key_file(base / "facilitator.key", chain.keys["facilitator"])),
        "--x402-rpc", chain.rpc,
    ])
    yield srv
    srv.stop()


def doc(j: int) -> list[int]:
    return [(13 * i + 5 * j + 1) % 500 + 3 for i in range(N)]


def publish(srv: ServerProcess, lm: Any, ids: list[int], tmp: Path) -> None:
    alice = KVAgent(lm, cache_dir=tmp / "alice", registry_url=srv.url, token=ALICE, calibration=False)
    alice.publish(alice.read_ids(ids), "public", price=PRICE)
    alice.close()


def buyer(srv: ServerProcess, lm: Any, chain: Chain, key: str, tmp: Path, **caps: Any) -> KVAgent:
    """A wallet-only agent: no token, only a key file (and the test chain's token allowed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return KVAgent(lm, cache_dir=tmp / "buyer", registry_url=srv.url, calibration=False,
                   wallet=key_file(tmp / "wallet.key", key), wallet_assets=f"{NETWORK}/{chain.token}",
                   policy=PolicyParams(min_tokens=64, prefill_tokens_per_s=20), **caps)


def balance(srv: ServerProcess, token: str) -> int:
    r = httpx.get(srv.url + "/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return int(r.json()["balance"])


def audit(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(srv.url + "/v1/market/audit", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


# buyers 35.. of the funded list (other x402 tests use 0.., 20.., 30.. and the last 32)
def buyer_key(chain: Chain, i: int) -> str:
    return str(chain.keys["buyers"][35 + i])


def test_x402_wallet_only_agent_buys_resumes_and_answers_as_a_full_prefill(
        chain: Chain, paid_host: ServerProcess, model: Any, tmp_path: Path) -> None:  # noqa: F811
    ids = doc(0)
    publish(paid_host, model, ids, tmp_path)
    # the route answers an unpaid request 402 with x402 requirements beside today's quote
    blob = httpx.get(f"{paid_host.url}/v1/artifacts/{_key(model, ids, tmp_path)}")
    assert blob.status_code == 200, blob.text
    r = httpx.get(paid_host.url + blob.json()["blob_url"])
    assert r.status_code == 402 and "PAYMENT-REQUIRED" in r.headers and r.json()["quote"]["price"] == PRICE
    host0 = chain.balance(host_address(chain))
    alice0, commission0 = balance(paid_host, ALICE), audit(paid_host)["host"]
    agent = buyer(paid_host, model, chain, buyer_key(chain, 0), tmp_path, max_price_per_load=2 * PRICE,
                  budget=10 * PRICE)
    payer0 = chain.balance(agent.runtime.registry.payer.wallet.address)  # type: ignore[union-attr]
    got = agent.read_ids(ids)
    assert got.cache.status == "remote", got.cache.reason
    assert got.cache.charged == PRICE and f"bought for {PRICE} " in got.cache.reason
    answer = agent.ask_ids(got, [7, 8, 9], max_new_tokens=12, mode="local")
    reference = agent.generate_full([*ids, 7, 8, 9], max_new_tokens=12)
    assert answer.token_ids == reference.token_ids
    # the chain: the wallet paid the host exactly the price
    assert chain.balance(host_address(chain)) - host0 == PRICE
    assert payer0 - chain.balance(agent.runtime.registry.payer.wallet.address) == PRICE  # type: ignore[union-attr]
    # the ledger: the publisher's royalty, the host's commission, and the books still sum to zero
    commission = PRICE * PRICES["commission_bps"] // 10_000
    assert balance(paid_host, ALICE) - alice0 == PRICE - commission
    a = audit(paid_host)
    assert a["host"] - commission0 == commission and a["total"] == 0 and not a["unbalanced"]
    agent.close()
    # the publisher withdraws its royalty (`kvagent account withdraw`): sent on chain from the host's wallet
    from kvagent import cli

    dest = str(Account.create().address)
    args = ["--registry", paid_host.url, "--token", ALICE, "account", "withdraw", str(PRICE - commission),
            "--to", dest, "--idempotency-key", "e2e-withdraw-1", "--json"]
    assert cli.main(args) == 0
    assert chain.balance(dest) == PRICE - commission and balance(paid_host, ALICE) == alice0
    assert chain.balance(host_address(chain)) - host0 == commission  # the commission stays with the host


def test_x402_wallet_only_agent_pays_for_a_hosted_generation(
        chain: Chain, paid_host: ServerProcess, model: Any, tmp_path: Path) -> None:  # noqa: F811
    """``mode="remote"``: the host generates from its copy of the document and the wallet pays the 402 of
    the generation by x402 (before, the SDK's generate stream could not pay, and a wallet-only agent fell
    back to answering locally). The answer equals a full prefill's; the chain moves by exactly what the
    answer says it was charged; the books still sum to zero."""
    ids = doc(3)
    publish(paid_host, model, ids, tmp_path)
    agent = buyer(paid_host, model, chain, buyer_key(chain, 3), tmp_path, max_price_per_load=4 * PRICE,
                  budget=10 * PRICE)
    wallet = agent.runtime.registry.payer.wallet.address  # type: ignore[union-attr]
    handle = agent.read_ids(ids)
    assert handle.cache.status == "remote" and handle.cache.charged == PRICE, handle.cache.reason
    host0, wallet0 = chain.balance(host_address(chain)), chain.balance(wallet)
    remote = agent.ask_ids(handle, [7, 8, 9], max_new_tokens=12, mode="remote")
    assert remote.cache.status == "remote-generate", remote.cache.reason
    assert remote.token_ids == agent.generate_full([*ids, 7, 8, 9], max_new_tokens=12).token_ids
    charged = remote.cache.charged
    assert charged > PRICE  # the publisher's price, and the host's for the tokens
    assert chain.balance(host_address(chain)) - host0 == charged
    assert wallet0 - chain.balance(wallet) == charged
    assert agent.runtime.registry.payer.caps.spent == PRICE + charged  # type: ignore[union-attr]
    a = audit(paid_host)
    assert a["total"] == 0 and not a["unbalanced"] and not a["negative"]
    agent.close()


def _key(lm: Any, ids: list[int], tmp: Path) -> str:
    a = KVAgent(lm, cache_dir=tmp / "keys", calibration=False)
    try:
        return a.key_of(ids)
    finally:
        a.close()


def test_x402_refusals_prefill_locally_and_move_nothing(
        chain: Chain, paid_host: ServerProcess, model: Any, tmp_path: Path) -> None:  # noqa: F811
    ids = doc(1)
    publish(paid_host, model, ids, tmp_path)
    host0 = chain.balance(host_address(chain))
    deposits0 = audit(paid_host)["transactions"]
    # an underfunded wallet: a 402, a payment the facilitator refuses, a local prefill
    poor = buyer(paid_host, model, chain, str(chain.keys["unfunded"]), tmp_path / "poor",
                 max_price_per_load=2 * PRICE)
    got = poor.read_ids(ids)
    assert got.cache.status == "prefill" and "x402" in got.cache.reason and "not taken" in got.cache.reason
    assert poor.runtime.registry.payer.caps.spent == 0  # type: ignore[union-attr]
    poor.close()
    # a price above the cap: never signed, never sent
    capped = buyer(paid_host, model, chain, buyer_key(chain, 1), tmp_path / "capped",
                   max_price_per_load=PRICE - 1)
    wallet0 = chain.balance(capped.runtime.registry.payer.wallet.address)  # type: ignore[union-attr]
    got = capped.read_ids(ids)
    assert got.cache.status == "prefill" and f"price {PRICE} µUSD exceeds" in got.cache.reason
    assert chain.balance(capped.runtime.registry.payer.wallet.address) == wallet0  # type: ignore[union-attr]
    capped.close()
    assert chain.balance(host_address(chain)) == host0
    assert audit(paid_host)["transactions"] == deposits0  # nothing posted


def test_x402_facilitator_down_prefills_and_charges_nothing(
        chain: Chain, model_dir: Path, model: Any, tmp_path: Path) -> None:  # noqa: F811
    """A host whose hosted facilitator goes away: the agent's payment is answered 503, never retried, its
    budget given back; it prefills, and neither the chain nor the ledger moves."""
    import time

    from tests.test_x402_chain import hosted_facilitator

    ids = doc(2)
    with hosted_facilitator(chain) as (fac_url, fac):
        srv = host(tmp_path / "down", model_dir, [*x402_args(chain), "--x402-pay-to", host_address(chain),
                                                  "--x402-facilitator", fac_url])
        try:
            publish(srv, model, ids, tmp_path)
            fac.should_exit = True  # the facilitator goes down
            time.sleep(0.5)
            host0, txns0 = chain.balance(host_address(chain)), audit(srv)["transactions"]
            agent = buyer(srv, model, chain, buyer_key(chain, 2), tmp_path, max_price_per_load=2 * PRICE)
            payer = agent.runtime.registry.payer  # type: ignore[union-attr]
            wallet0 = chain.balance(payer.wallet.address)
            t0 = time.monotonic()
            got = agent.read_ids(ids)
            assert got.cache.status == "prefill" and "x402" in got.cache.reason, got.cache.reason
            assert "payment_unavailable" in got.cache.reason and time.monotonic() - t0 < 5  # not retried
            assert payer.caps.spent == 0 and chain.balance(payer.wallet.address) == wallet0
            assert chain.balance(host_address(chain)) == host0
            assert audit(srv)["transactions"] == txns0
            agent.close()
        finally:
            srv.stop()
