"""``kvagent account withdraw | chain-audit`` go through the registry client (kvagent/client/market.py): its
token, its nodes with failover, its typed errors; against a real HTTP server on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kvagent import cli

TO = "0x00000000000000000000000000000000000000aa"


class Registry:
    """A loopback registry that answers the payout and audit routes and keeps what it was sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], Any]] = []
        self.paid: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> the payout's answer
        self.balance = 700
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                registry.seen.append(("GET", self.path, dict(self.headers), None))
                if self.headers.get("Authorization") != "Bearer admin-token-9":
                    return self._answer(403, {"error": "forbidden", "detail": "admin only"})
                self._answer(200, {"deposits": 2, "deposited": 900, "confirmed": 900, "withdrawn": 0,
                                   "withdrawn_confirmed": 0, "missing": [], "ok": True})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                registry.seen.append(("POST", self.path, dict(self.headers), body))
                key = self.headers.get("Idempotency-Key")
                if not key:
                    return self._answer(422, {"error": "idempotency_key_required", "detail": "send one"})
                if key in registry.paid:
                    return self._answer(200, {**registry.paid[key], "replayed": True})
                if body["amount"] > registry.balance:
                    return self._answer(409, {"error": "insufficient_balance", "detail": "too much",
                                              "balance": registry.balance})
                registry.balance -= body["amount"]
                registry.paid[key] = {"principal": "bob", "amount": body["amount"], "to": body["to"],
                                      "status": "sent", "transaction": "0x01", "receipt": "w-1",
                                      "replayed": False, "balance": registry.balance, "currency": "usd"}
                self._answer(200, registry.paid[key])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry()
    yield reg
    reg.server.shutdown()
    reg.server.server_close()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_withdraw_and_chain_audit_use_the_clients_nodes_token_and_errors(
        registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = f"{closed_port_url()},{registry.url}"  # the first node refuses: the client moves on
    bob = ["--registry", nodes, "--token", "bob-token-9", "account"]
    args = [*bob, "withdraw", "500", "--to", TO, "--idempotency-key", "cli-1", "--json"]
    assert cli.main(args) == 0 and cli.main(args) == 0  # the same key twice: paid out once
    first, again = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["status"] == "sent" and again["replayed"] is True and registry.balance == 200
    posts = [s for s in registry.seen if s[0] == "POST"]
    assert [(p[1], p[2]["Authorization"], p[2]["Idempotency-Key"], p[3]) for p in posts] == [
        ("/v1/account/withdraw", "Bearer bob-token-9", "cli-1", {"amount": 500, "to": TO})] * 2
    # above the balance: the registry's 409 is the client's typed error, said on stderr, exit 2
    assert cli.main([*bob, "withdraw", "201", "--to", TO, "--principal", "alice"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert "HTTP 409" in err and "insufficient_balance" in err and registry.balance == 200
    assert registry.seen[-1][3] == {"amount": 201, "to": TO, "principal": "alice"}
    assert len(registry.seen[-1][2]["Idempotency-Key"]) == 32  # a fresh key when none is given
    # the audit: admin only (403 is an auth error), then its answer
    assert cli.main([*bob, "chain-audit"]) == 2
    assert "HTTP 403: forbidden admin only (check the token)" in " ".join(capsys.readouterr().err.split())
    admin = ["--registry", nodes, "--token", "admin-token-9", "account", "chain-audit"]
    assert cli.main([*admin, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli.main(admin) == 0 and capsys.readouterr().out.startswith("ok: 2 deposits of 900")
