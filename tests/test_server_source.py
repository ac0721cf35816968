"""The server's own registry as a resolver source (kvagent.server.source): what it offers a caller."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kvagent.server import source as src
from kvagent.server.auth import Principal
from kvagent.server.http import ApiError
from tests.test_server_postgres import row


def test_an_engine_that_reports_reuse_after_the_charge_is_offered_no_priced_artifact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sell=False`` (vLLM's chats, charged before vLLM says what it reused): a priced artifact is offered to
    its owner only, unpriced ones to all who may see them; ``sell=True`` (the transformers path, which bills
    the royalty) offers every visible one. What the caller may not see is never offered."""
    free, priced = row(1, owner="alice"), row(2, owner="alice")
    hidden = row(3, owner="carol", visibility="restricted")
    rows = {r.key: r for r in (free, priced, hidden)}
    prices = {priced.key: 50}

    def visible(key: str, p: Principal) -> Any:
        r = rows[key]
        if r.visibility != "public" and r.owner != p.name:
            raise ApiError(404, "not_found", "no such artifact")
        return r

    st = SimpleNamespace(visible=visible, market=SimpleNamespace(price=lambda key, owner: prices.get(key, 0)),
                         meta=SimpleNamespace(longest_prefix=lambda hashes, who: (hashes[0], 1)))
    monkeypatch.setattr(src, "handle", lambda r: r.key)
    monkeypatch.setattr(src, "parse_handle", lambda key: SimpleNamespace(key=key))

    def offered(who: str, sell: bool) -> set[str]:
        s = src.ServerSource(st, Principal(who), sell=sell)  # type: ignore[arg-type]
        by_key = {k for k in rows if s.lookup(k) is not None}
        by_prefix = {k for k in rows if s.lookup_prefix([k]) is not None}
        assert by_key == by_prefix
        return by_key

    assert offered("bob", sell=True) == {free.key, priced.key}
    assert offered("bob", sell=False) == {free.key}
    assert offered("alice", sell=False) == {free.key, priced.key}
    assert offered("carol", sell=False) == {free.key, hidden.key}
