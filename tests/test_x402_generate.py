"""Hosted generation paid by x402 on a real ``kvagent serve`` running a model, against the test chain: a
wallet without a token pays the generation's pre-charge (``exact``), is served, and the same
``PAYMENT-SIGNATURE`` again never generates again (nor settles again)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")

from kvagent.client.registry import RegistryClient  # noqa: E402
from kvagent.payments import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_header  # noqa: E402
from kvagent.payments.http import request_paying, settlement  # noqa: E402
from tests.registry_server import ServerProcess, start_server  # noqa: E402
from tests.test_market_e2e import PRICES, _artifact, _metric, model, model_dir  # noqa: E402,F401
from tests.test_x402_server import ALICE, TOKENS, audit, balance, buyer, host_address, x402_args  # noqa: E402
from tests.x402_chain import Chain, chain_or_skip  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain() -> Chain:
    return chain_or_skip()


@pytest.fixture(scope="module")
def gen_server(chain: Chain, tmp_path_factory: pytest.TempPathFactory, model_dir: Path  # noqa: F811
               ) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("x402-gen")
    (base / "prices.json").write_text(json.dumps(PRICES))
    srv = start_server(base / "data", TOKENS, model=str(model_dir),
                       extra_args=["--prices", str(base / "prices.json"), *x402_args(chain, base)])
    try:
        yield srv
    finally:
        srv.stop()


def settled_metric(srv: ServerProcess, name: str, want: float) -> float:
    """The metric once it reads ``want`` (a stream counts its tokens right after its last line), or as it
    stands after 30 s."""
    deadline = time.monotonic() + 30
    while (got := _metric(srv, name)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_x402_paid_generation_is_never_generated_twice(chain: Chain, gen_server: ServerProcess,
                                                       model: Any) -> None:  # noqa: F811
    h = RegistryClient(gen_server.url, "alice-token-0001").publish(_artifact(model, 21, 64, "alice"),
                                                                   visibility="public", price=50)
    url = f"{gen_server.url}/v1/artifacts/{h.key}/generate"
    body = {"suffix_ids": [1, 2, 3], "max_new_tokens": 5}
    charge = 15 + 32 + 100 + 50  # 3 input at 5, 64 cached at 0.5, 5 output at 20, the publisher's 50
    host0, alice0 = chain.balance(host_address(chain)), balance(gen_server, ALICE)
    tokens0 = _metric(gen_server, "kvagent_generated_tokens_total")
    p = buyer(chain, 10, cap=1_000)
    with httpx.Client(timeout=120) as c:
        first = c.post(url, json=body)
        assert first.status_code == 402 and first.json()["quote"]["price"] == charge
        assert decode_header(first.headers[PAYMENT_REQUIRED_HEADER])["accepts"][0]["amount"] == str(charge)
        r, payment = request_paying(c, "POST", url, p, json=body)
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines[-1]["done"] and lines[-1]["generated"] == 5 and settlement(r) is not None
        assert r.headers["X-KVAgent-Charged"] == str(charge) and payment is not None
        assert settled_metric(gen_server, "kvagent_generated_tokens_total", tokens0 + 5) == tokens0 + 5
        again = c.post(url, json=body, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.status_code == 409 and again.json()["error"] == "idempotency_key_already_served"
        assert again.json()["receipt"] == r.headers["X-KVAgent-Receipt"]
        other = c.post(url, json={**body, "suffix_ids": [4, 5, 6]},
                       headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert other.status_code == 422  # another request: never served on this payment
    assert _metric(gen_server, "kvagent_generated_tokens_total") == tokens0 + 5  # never generated again
    assert chain.balance(host_address(chain)) - host0 == charge  # settled once
    assert balance(gen_server, ALICE) - alice0 == 45  # 50 less the 10% commission
    a = audit(gen_server)
    assert a["total"] == 0 and not a["unbalanced"] and not a["negative"]


def test_x402_client_pays_a_generation_within_its_caps_and_refuses_above_them(
        chain: Chain, gen_server: ServerProcess, model: Any) -> None:  # noqa: F811
    """The SDK's generate stream pays a generation's 402 from its wallet (no token): the tokens come, the
    stream's charge is what the chain moved; a wallet whose cap is below the price signs nothing, sends
    nothing and gets RegistryPaymentRequiredError saying why."""
    from kvagent.engines.params import GenerationParams
    from kvagent.errors import RegistryPaymentRequiredError

    h = RegistryClient(gen_server.url, "alice-token-0001").publish(_artifact(model, 22, 64, "alice"),
                                                                   visibility="public", price=50)
    charge = 15 + 32 + 100 + 50  # as above: 3 input, 64 cached, 5 output, the publisher's 50
    params = GenerationParams(max_new_tokens=5)
    host0 = chain.balance(host_address(chain))
    with RegistryClient(gen_server.url, payer=buyer(chain, 13, cap=1_000)) as client:
        stream = client.generate_stream(h.key, [1, 2, 3], params, max_price=1_000)
        assert len(list(stream)) == 5 and stream.charge == charge and stream.receipt
    assert chain.balance(host_address(chain)) - host0 == charge
    capped = buyer(chain, 14, cap=charge - 1)
    with RegistryClient(gen_server.url, payer=capped) as client:
        with pytest.raises(RegistryPaymentRequiredError, match="generate needs a payment this agent refused"):
            list(client.generate_stream(h.key, [1, 2, 3], params))
    assert capped.caps.spent == 0 and chain.balance(host_address(chain)) - host0 == charge
    a = audit(gen_server)
    assert a["total"] == 0 and not a["unbalanced"] and not a["negative"]


def test_x402_paid_chat_on_a_priced_host_keeps_the_give_back_on_the_wallets_balance(
        chain: Chain, gen_server: ServerProcess) -> None:
    from kvagent.payments.signin import WALLET_AUTH_HEADER, sign

    model_id = httpx.get(gen_server.url + "/v1/models", headers=ALICE).json()["data"][0]["id"]
    body = {"model": model_id, "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "t5 t6 t7 t8 t1"}]}
    url = gen_server.url + "/v1/chat/completions"
    host0 = chain.balance(host_address(chain))
    p = buyer(chain, 11, cap=10_000)
    with httpx.Client(timeout=120) as c:
        first = c.post(url, json=body)
        assert first.status_code == 402 and PAYMENT_REQUIRED_HEADER in first.headers
        price = int(decode_header(first.headers[PAYMENT_REQUIRED_HEADER])["accepts"][0]["amount"])
        r, payment = request_paying(c, "POST", url, p, json=body)
        assert r.status_code == 200, r.text
        assert settlement(r) is not None and payment is not None
        charged = int(r.headers["X-KVAgent-Charged"])
        assert 0 < charged <= price
        tokens = _metric(gen_server, "kvagent_generation_tokens_total")
        again = c.post(url, json=body, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        assert again.status_code == 200 and again.headers["X-KVAgent-Replayed"] == "1"
        assert again.json() == r.json()  # the stored answer, not a new generation
        assert _metric(gen_server, "kvagent_generation_tokens_total") == tokens
        path = "/v1/account/statement"
        key = str(chain.keys["buyers"][51])
        s = c.get(gen_server.url + path, headers={WALLET_AUTH_HEADER: sign(key, "GET", path)}).json()
    assert chain.balance(host_address(chain)) - host0 == price  # exact: the whole pre-charge, once
    assert s["deposited"] == price and s["balance"] == price - charged  # what was not used stays its own
    a = audit(gen_server)
    assert a["total"] == 0 and not a["unbalanced"] and not a["negative"]


def test_x402_chat_price_does_not_depend_on_whose_cache_the_prompt_is_in(
        chain: Chain, gen_server: ServerProcess) -> None:
    """The 402 is priced for an anonymous caller, the paid request for the wallet, whose private prompt cache
    may hold the prompt already: an x402 pre-charge counts no prompt token as cached (the settlement gives
    the cache's discount back), so the amount signed for is the amount checked."""
    model_id = httpx.get(gen_server.url + "/v1/models", headers=ALICE).json()["data"][0]["id"]
    body = {"model": model_id, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "a wallet asks this twice: t3 t1 t4 t1 t5"}]}
    url = gen_server.url + "/v1/chat/completions"
    p = buyer(chain, 30, cap=10_000)
    with httpx.Client(timeout=120) as c:
        first, pay1 = request_paying(c, "POST", url, p, json=body)
        assert first.status_code == 200 and pay1 is not None, first.text
        assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # the same prompt again (another request: more tokens): the wallet's own cache holds its KV now
        second, pay2 = request_paying(c, "POST", url, p, json={**body, "max_tokens": 5})
        assert second.status_code == 200 and pay2 is not None, second.text
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        usage = second.json()["usage"]
        uncached = 5 * usage["prompt_tokens"] + 20 * usage["completion_tokens"]  # PRICES, per token
        assert int(second.headers["X-KVAgent-Charged"]) < uncached  # the cache's discount was given back
