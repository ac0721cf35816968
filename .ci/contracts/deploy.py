"""Deploy KVUSD (compiled by compile.mjs) on a dev chain and mint test balances; print the token's address.

Standard library only (JSON-RPC over urllib), so .ci/chain.sh runs before any virtual environment exists:
anvil's dev accounts are unlocked, so ``eth_sendTransaction`` needs no signing here.
Usage: python3 deploy.py RPC_URL COMPILED_JSON NAME VERSION MINT_AMOUNT ADDRESS...
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def rpc(url: str, method: str, *params: object) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    if "error" in out:
        raise SystemExit(f"{method}: {out['error']}")
    return out["result"]


def word(n: int) -> str:
    return f"{n:064x}"


def encode_strings(*values: str) -> str:
    """ABI encoding of a tuple of strings (the constructor's arguments)."""
    heads, tails, offset = [], [], 32 * len(values)
    for v in values:
        data = v.encode()
        padded = data.hex() + "00" * (-len(data) % 32)
        heads.append(word(offset))
        tails.append(word(len(data)) + padded)
        offset += 32 + len(padded) // 2
    return "".join(heads) + "".join(tails)


def send(url: str, sender: str, to: str | None, data: str) -> dict:
    tx = {"from": sender, "data": data, "gas": hex(5_000_000)}
    if to is not None:
        tx["to"] = to
    h = rpc(url, "eth_sendTransaction", tx)
    for _ in range(300):
        receipt = rpc(url, "eth_getTransactionReceipt", h)
        if receipt:
            if int(receipt["status"], 16) != 1:  # type: ignore[index]
                raise SystemExit(f"transaction {h} reverted")
            return receipt  # type: ignore[return-value]
        time.sleep(0.05)
    raise SystemExit(f"no receipt for {h}")


def main(argv: list[str]) -> None:
    url, compiled, name, version, mint = argv[:5]
    holders = argv[5:]
    c = json.load(open(compiled))
    deployer = rpc(url, "eth_accounts")[0]  # type: ignore[index]
    receipt = send(url, deployer, None, c["bytecode"] + encode_strings(name, version))
    token = receipt["contractAddress"]
    selector = c["methods"]["mint(address,uint256)"]
    for h in holders:
        send(url, deployer, token, "0x" + selector + word(int(h, 16)) + word(int(mint)))
    print(token)


if __name__ == "__main__":
    main(sys.argv[1:])
