"""The x402 tests' chain: anvil with KVUSD deployed, started by ``.ci/chain.sh`` (``.ci/chain.env``).

Without ``KVAGENT_TEST_CHAIN_RPC`` the chain tests skip, except under ``CI=true`` where they fail (as the
PostgreSQL and S3 tests do).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

ENV = "KVAGENT_TEST_CHAIN_RPC"
NETWORK = "eip155:31337"


@dataclass(frozen=True)
class Chain:
    rpc: str
    token: str
    token_name: str
    token_version: str
    keys: dict[str, Any]  # facilitator, host, buyers, unfunded (hex private keys)
    contract: Any  # the web3 contract of KVUSD

    def balance(self, address: str) -> int:
        return int(self.contract.functions.balanceOf(address).call())


def chain_or_skip() -> Chain:
    rpc = os.environ.get(ENV)
    if not rpc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{ENV} is not set under CI=true; run .ci/chain.sh and source .ci/chain.env")
        pytest.skip(f"{ENV} not set (run .ci/chain.sh and source .ci/chain.env)")
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(rpc))
    abi = json.load(open(os.environ["KVAGENT_TEST_CHAIN_ABI"]))["abi"]
    token = Web3.to_checksum_address(os.environ["KVAGENT_TEST_CHAIN_TOKEN"])
    return Chain(rpc, token, os.environ["KVAGENT_TEST_CHAIN_TOKEN_NAME"],
                 os.environ["KVAGENT_TEST_CHAIN_TOKEN_VERSION"],
                 json.load(open(os.environ["KVAGENT_TEST_CHAIN_ACCOUNTS"])),
                 w3.eth.contract(address=token, abi=abi))


@contextmanager
def serve(app: Any) -> Iterator[tuple[str, Any]]:
    """``app`` served by uvicorn on a loopback port (real HTTP, in a thread); yields (URL, server)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not (server.started and server.servers):
        assert t.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        t.join(10)
