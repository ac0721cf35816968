"""A wallet proves who it is to a host without a token: it signs (EIP-191, ``personal_sign``) a challenge that
names the request and the time, and sends it in ``X-KVAgent-Wallet-Auth``. The host recovers the address
and accepts it within :data:`WINDOW_S` of its clock (a captured header replays at most that long, and only for
the same method and path, which are reads)."""

from __future__ import annotations

import re
import time

from ..errors import ConfigError
from . import sdk

WALLET_AUTH_HEADER = "X-KVAgent-Wallet-Auth"
#: How far a challenge's time may be from the host's clock, either way.
WINDOW_S = 300
_HEADER = re.compile(r"^(0x[0-9a-fA-F]{40}):([0-9]{1,12}):(0x[0-9a-fA-F]{130})$")


def challenge(method: str, path: str, ts: int) -> str:
    """The text a wallet signs to make ``method path`` at unix time ``ts``."""
    return f"kvagent wallet auth\n{method.upper()} {path}\n{ts}"


def sign(wallet_key: str, method: str, path: str, ts: int | None = None) -> str:
    """The ``X-KVAgent-Wallet-Auth`` value of ``method path`` signed by ``wallet_key`` (now, by default)."""
    eth = sdk.require("eth_account")
    ts = int(time.time()) if ts is None else ts
    acct = eth.Account.from_key(wallet_key)
    msg = eth.messages.encode_defunct(text=challenge(method, path, ts))
    sig = acct.sign_message(msg).signature
    return f"{acct.address}:{ts}:0x{bytes(sig).hex().removeprefix('0x')}"


def verify(header: str, method: str, path: str, now: float | None = None) -> str:
    """The address that signed ``header`` for ``method path`` within the window (ConfigError otherwise)."""
    m = _HEADER.match(header.strip()) if isinstance(header, str) else None
    if m is None:
        raise ConfigError(f"{WALLET_AUTH_HEADER} must be ADDRESS:UNIX_TIME:SIGNATURE (0x-hex, 65 bytes)")
    address, ts, sig = m.group(1), int(m.group(2)), m.group(3)
    now = time.time() if now is None else now
    if abs(now - ts) > WINDOW_S:
        raise ConfigError(f"{WALLET_AUTH_HEADER} is expired or from the future (window {WINDOW_S} s)")
    eth = sdk.require("eth_account")
    try:
        signer = eth.Account.recover_message(eth.messages.encode_defunct(text=challenge(method, path, ts)),
                                             signature=sig)
    except Exception as exc:  # a signature that recovers to nothing
        raise ConfigError(f"{WALLET_AUTH_HEADER} signature is invalid") from exc
    if str(signer).lower() != address.lower():
        raise ConfigError(f"{WALLET_AUTH_HEADER} is not signed by {address}")
    return str(signer)
