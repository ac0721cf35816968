"""The SDK's registry client pays a download's x402 402 from a wallet, within its caps, against anvil and a
real x402 route (test_x402_http.py's stand-in shop: the server's gateway, facilitator and ledger): paid once,
charged once, and every refusal leaves the chain and the budget as they were."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from kvagent.artifacts.source import Handle  # noqa: E402
from kvagent.client.registry import RegistryClient  # noqa: E402
from kvagent.errors import RegistryPaymentRequiredError  # noqa: E402
from kvagent.payments import SpendCaps, Wallet  # noqa: E402
from kvagent.payments.payer import Payer  # noqa: E402
from kvagent.payments.terms import X402Terms  # noqa: E402
from kvagent.server.ledger import Ledger  # noqa: E402
from kvagent.server.x402 import X402Gateway  # noqa: E402
from tests._kvfixtures import make_artifact, make_kv  # noqa: E402
from tests.test_x402_http import BLOB, KEY, PRICE, host_address, ledger, shop  # noqa: E402,F401
from tests.x402_chain import NETWORK, Chain, chain_or_skip, serve  # noqa: E402


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


@pytest.fixture
def shop_url(chain: Chain, ledger: Ledger) -> Iterator[str]:  # noqa: F811
    terms = X402Terms(NETWORK, chain.token, host_address(chain), chain.token_name, chain.token_version)
    gw = X402Gateway.in_process(terms, chain.keys["facilitator"], chain.rpc)
    with serve(shop(gw, ledger)) as (url, _):
        yield url


def handle() -> Handle:
    header, _ = make_artifact(make_kv(8))  # any header: the stand-in route serves BLOB under KEY
    return Handle(KEY, header, len(BLOB), "public", "alice", "/blob", None, PRICE, "uUSD")


def payer(chain: Chain, key: str, caps: SpendCaps | None = None) -> Payer:
    return Payer(Wallet(key), caps, allowed_assets=[(NETWORK, chain.token)])


# buyers 30.. of the funded list (test_x402_http.py uses 20.., test_x402_chain.py the first and the last 32)
def buyer_key(chain: Chain, i: int) -> str:
    return str(chain.keys["buyers"][30 + i])


def test_x402_client_pays_the_402_once_and_reports_the_charge(chain: Chain, shop_url: str) -> None:
    wallet = payer(chain, buyer_key(chain, 0), SpendCaps(max_price_per_load=PRICE, budget=3 * PRICE))
    host0, buyer0 = chain.balance(host_address(chain)), chain.balance(wallet.wallet.address)
    with RegistryClient(shop_url, payer=wallet, retries=2, backoff_initial=0.01) as c:  # no token
        got = c.download_blob(handle(), max_price=PRICE)
    assert bytes(got.data) == BLOB and got.charge == PRICE and got.receipt
    assert chain.balance(host_address(chain)) - host0 == PRICE
    assert buyer0 - chain.balance(wallet.wallet.address) == PRICE
    assert wallet.caps.spent == PRICE


def test_x402_client_never_signs_above_the_load_limit_or_budget(chain: Chain, shop_url: str) -> None:
    host0 = chain.balance(host_address(chain))
    for caps, limit, why in (
        (SpendCaps(max_price_per_load=PRICE - 1), None, "price_above_cap"),  # the wallet's own cap
        (SpendCaps(), PRICE - 1, "price_above_cap"),  # the read's limit (the tier's cap and budget left)
        (SpendCaps(budget=PRICE - 1), None, "budget_exhausted"),
    ):
        wallet = payer(chain, buyer_key(chain, 1), caps)
        with RegistryClient(shop_url, payer=wallet, retries=2, backoff_initial=0.01) as c:
            with pytest.raises(RegistryPaymentRequiredError) as e:
                c.download_blob(handle(), max_price=limit)
        assert why in e.value.quote["x402"] and e.value.quote["price"] == PRICE
        assert wallet.caps.spent == 0
    assert chain.balance(host_address(chain)) == host0  # nothing signed, nothing moved


def test_x402_client_underfunded_wallet_is_refused_and_gets_its_budget_back(chain: Chain,
                                                                             shop_url: str) -> None:
    wallet = payer(chain, str(chain.keys["unfunded"]), SpendCaps(budget=10 * PRICE))
    host0 = chain.balance(host_address(chain))
    with RegistryClient(shop_url, payer=wallet, retries=3, backoff_initial=0.01) as c:
        with pytest.raises(RegistryPaymentRequiredError) as e:
            c.download_blob(handle(), max_price=PRICE)
    assert "not taken" in e.value.quote["x402"], e.value.quote
    assert wallet.caps.spent == 0 and chain.balance(host_address(chain)) == host0


def test_x402_client_without_a_wallet_keeps_todays_402(chain: Chain, shop_url: str) -> None:
    with RegistryClient(shop_url, retries=2, backoff_initial=0.01) as c:
        with pytest.raises(RegistryPaymentRequiredError) as e:
            c.download_blob(handle(), max_price=PRICE)
    assert "x402" not in e.value.quote and e.value.quote["reason"] == "insufficient_balance"
