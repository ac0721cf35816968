"""One KVAgent shared by 16 threads buys 16 differently priced artifacts at once from a real registry
process: each read's CacheInfo reports its own charge, and the charges add up to what the ledger took."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kvagent import CacheInfo, KVAgent
from kvagent.costs.policy import PolicyParams
from tests.test_market_e2e import client, model, model_dir, server, token_of  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

N_THREADS = 16


def test_16_threads_on_one_agent_each_see_their_own_charge(server, model: Any, tmp_path: Path) -> None:  # noqa: F811
    docs = [[(11 * i + 7 * j + 3) % 500 + 3 for i in range(400)] for j in range(N_THREADS)]
    prices = [100 * (j + 1) for j in range(N_THREADS)]  # all below the 5 µ/token prefill of 400 tokens
    publisher = KVAgent(model, cache_dir=tmp_path / "pub", registry_url=server.url, token=token_of("alice"),
                        calibration=False)
    for ids, price in zip(docs, prices, strict=True):
        publisher.publish(publisher.read_ids(ids), "public", price=price)
    publisher.close()
    with client(server, "admin-token-0001") as admin:
        admin.credit("dave", 20_000)
    with client(server, token_of("dave")) as dave:
        start = dave.account_balance()
        bought_before = sum(line["amount"] for line in dave.statement()["purchases"])
    buyer = KVAgent(model, cache_dir=tmp_path / "buyer", registry_url=server.url, token=token_of("dave"),
                    policy=PolicyParams(min_tokens=64, prefill_tokens_per_s=20), calibration=False)
    infos: dict[int, CacheInfo] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_THREADS, timeout=60)

    def read(j: int) -> None:
        try:
            barrier.wait()
            infos[j] = buyer.read_ids(docs[j]).cache
        except BaseException as exc:  # a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(j,)) for j in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]
    for j in range(N_THREADS):
        assert infos[j].status == "remote", infos[j].reason
        assert infos[j].charged == prices[j], (j, infos[j].charged, infos[j].reason)
        assert f"bought for {prices[j]} " in infos[j].reason
    reported = sum(info.charged for info in infos.values())
    with client(server, token_of("dave")) as dave:
        assert start - dave.account_balance() == reported == sum(prices)
        bought = sum(line["amount"] for line in dave.statement()["purchases"]) - bought_before
    assert bought == reported and buyer.resolver.registry_tier.spent == reported
    buyer.close()
