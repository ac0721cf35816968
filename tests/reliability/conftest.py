"""A registry server process shared by the trust tests (signatures, existence oracle, timing): one start."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.registry_server import ServerProcess, start_server

#: principals of the shared server: alice publishes, mallory publishes and probes, bob and dave only read
TRUST_TOKENS = {
    "alice-token-0001": {"principal": "alice", "publish": True},
    "mallory-token-01": {"principal": "mallory", "publish": True},
    "bob-token-000002": {"principal": "bob", "publish": False},
    "dave-token-00001": {"principal": "dave", "publish": False},
}


@pytest.fixture(scope="session")
def trust_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("trust") / "data", TRUST_TOKENS)
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
