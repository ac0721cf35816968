"""The bill of one chat/completion request (kvagent.server.chat_billing): what the pre-charge counts as
cached (none on an x402 host), which artifact's royalty it adds, and the pre-charge, settlement, refund,
receipt headers and kept answer on a real ledger (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from kvagent.costs import market as mk
from kvagent.reuse.info import CacheInfo, CacheStatus
from kvagent.server.auth import Principal
from kvagent.server.chat_billing import ChatBill, precharge_cached, royalty_origin
from kvagent.server.http import not_found
from kvagent.server.ledger import Ledger
from kvagent.server.meta import SQLiteMeta
from kvagent.server.records import OwnerCopies

# 5 per prefilled prompt token, 0.5 per cached one, 20 per output token
PRICES = mk.HostPrices(input_per_mtok=5_000_000, cached_input_per_mtok=500_000, output_per_mtok=20_000_000)
BOB = Principal("bob")
DIGEST = mk.request_digest("/v1/chat/completions", "", {"messages": "..."})
N_PROMPT, MAX_NEW = 100, 10
FOUND = CacheInfo(CacheStatus.PREFIX, "a cached prefix", 80, 20, source="store", origin="local-kv")


def test_the_precharge_counts_the_cache_found_except_on_an_x402_host() -> None:
    assert precharge_cached(80, x402_host=False) == 80
    assert precharge_cached(0, x402_host=False) == 0
    assert precharge_cached(80, x402_host=True) == 0  # the 402's amount is the paid request's


def test_the_royalty_is_owed_to_a_registry_artifact_only() -> None:
    remote = CacheStatus.REMOTE
    assert royalty_origin(None) is None
    assert royalty_origin(CacheInfo(remote, "published", 80, 20, source="registry", origin="k1")) == "k1"
    assert royalty_origin(CacheInfo(remote, "published", 80, 20, source="registry")) is None
    assert royalty_origin(FOUND) is None  # the caller's own store
    assert royalty_origin(CacheInfo(CacheStatus.MEMORY, "in memory", 80, 20, source="memory",
                                    origin="k1")) is None


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    meta = SQLiteMeta(tmp_path / "meta.sqlite3")
    OwnerCopies(meta)
    led = Ledger(meta, PRICES)
    led.credit("bob", 10_000)
    yield led
    meta.close()


def _state(ledger: Ledger, x402: bool = False) -> Any:
    """The server state a bill reads: its ledger, whether x402 is on, and the artifacts bob may see (none)."""
    def visible(key: str, principal: Principal) -> Any:
        raise not_found(key)

    return SimpleNamespace(market=ledger, x402=object() if x402 else None, visible=visible)


def _request(idempotency_key: str | None = None, x402_headers: dict[str, str] | None = None) -> Request:
    headers = [(b"idempotency-key", idempotency_key.encode())] if idempotency_key else []
    return Request({"type": "http", "method": "POST", "scheme": "http", "server": ("testserver", 80),
                    "path": "/v1/chat/completions", "root_path": "", "query_string": b"", "headers": headers,
                    "state": {"x402_headers": x402_headers or {}}})


def _bill(ledger: Ledger, request: Request | None = None, x402: bool = False) -> ChatBill:
    return ChatBill(_state(ledger, x402), BOB, request or _request(), DIGEST, N_PROMPT, MAX_NEW)


async def test_a_paid_answer_is_precharged_then_settled_to_what_it_used(ledger: Ledger) -> None:
    bill = _bill(ledger)
    assert await bill.replay() is None
    await bill.charge(FOUND)
    assert bill.receipt is not None and bill.charged_cached == 80
    assert bill.receipt.amount == 20 * 5 + 40 + 10 * 20 and ledger.balance("bob") == 10_000 - 340
    assert bill.headers()["X-KVAgent-Charged"] == "340"  # a stream's headers: before settling
    await bill.settle(cached_tokens=80, n_generated=4)
    assert bill.given_back == 6 * 20 and ledger.balance("bob") == 10_000 - 220
    headers = bill.headers()
    assert headers == {"X-KVAgent-Receipt": bill.receipt.receipt, "X-KVAgent-Charged": "220",
                       "X-KVAgent-Currency": "uUSD"}


async def test_on_an_x402_host_the_precharge_counts_no_cache_and_settling_gives_the_discount_back(
        ledger: Ledger) -> None:
    bill = _bill(ledger, x402=True)
    await bill.charge(FOUND)
    assert bill.receipt is not None and bill.charged_cached == 0
    assert bill.receipt.amount == 100 * 5 + 10 * 20  # every prompt token as prefilled
    await bill.settle(cached_tokens=80, n_generated=4)
    assert ledger.balance("bob") == 10_000 - (20 * 5 + 40 + 4 * 20)
    assert bill.headers()["X-KVAgent-Charged"] == "220"


async def test_an_unseen_registry_origin_adds_no_royalty(ledger: Ledger) -> None:
    bill = _bill(ledger)
    await bill.charge(CacheInfo(CacheStatus.REMOTE, "published", 80, 20, source="registry", origin="k" * 64))
    assert bill.receipt is not None and bill.receipt.amount == 340


async def test_a_refund_gives_everything_back_and_drops_the_receipt(ledger: Ledger) -> None:
    bill = _bill(ledger)
    await bill.charge(None)  # nothing cached reported: all prefilled
    assert bill.receipt is not None and bill.receipt.amount == 100 * 5 + 10 * 20
    await bill.refund("generation failed: nothing was answered")
    assert bill.receipt is None and ledger.balance("bob") == 10_000 and bill.headers() == {}
    await bill.settle(cached_tokens=0, n_generated=0)  # nothing left to settle
    assert ledger.balance("bob") == 10_000


async def test_a_kept_answer_is_replayed_for_the_same_key_and_charged_zero(ledger: Ledger) -> None:
    first = _bill(ledger, _request("key-1", {"PAYMENT-RESPONSE": "settled"}))
    assert await first.replay() is None
    await first.charge(FOUND)
    await first.settle(cached_tokens=80, n_generated=4)
    assert first.headers()["PAYMENT-RESPONSE"] == "settled"
    await first.keep(b'{"id":"chatcmpl-1"}', "chatcmpl-1")
    assert first.receipt is not None
    again = await _bill(ledger, _request("key-1")).replay()
    assert again is not None and again.body == b'{"id":"chatcmpl-1"}'
    assert again.headers["X-KVAgent-Charged"] == "0" and again.headers["X-KVAgent-Replayed"] == "1"
    assert again.headers["X-KVAgent-Receipt"] == first.receipt.receipt
    assert ledger.balance("bob") == 10_000 - 220


async def test_a_free_host_bills_nothing(tmp_path: Path) -> None:
    meta = SQLiteMeta(tmp_path / "free.sqlite3")
    OwnerCopies(meta)
    try:
        bill = _bill(Ledger(meta))
        await bill.charge(FOUND)
        await bill.settle(cached_tokens=80, n_generated=4)
        await bill.keep(b"{}", "chatcmpl-1")
        assert bill.receipt is None and bill.given_back == 0 and bill.headers() == {}
    finally:
        meta.close()
