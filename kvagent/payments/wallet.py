"""A wallet key: from a key file or ``KVAGENT_WALLET_KEY``; never logged, shown or pickled."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import sdk

WALLET_KEY_ENV = "KVAGENT_WALLET_KEY"
_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


class Wallet:
    """An EVM account: its ``address``, and a signer for the x402 SDK. ``repr`` shows the address only."""

    __slots__ = ("_account", "address")

    def __init__(self, key: str):
        if not _KEY.match(key):
            raise ConfigError("a wallet key must be 32 bytes of hex (64 hex digits, optionally 0x-prefixed)")
        account = sdk.require("eth_account").Account.from_key(key)
        self._account = account
        self.address: str = account.address

    def signer(self) -> Any:
        """The SDK's client signer (``EthAccountSigner``) of this wallet."""
        return sdk.require("x402.mechanisms.evm.signers").EthAccountSigner(self._account)

    def __repr__(self) -> str:
        return f"Wallet({self.address})"

    def __reduce__(self) -> Any:
        raise TypeError("a Wallet holds a private key and is never pickled")


def load_wallet(source: str | os.PathLike[str] | None = None) -> Wallet:
    """The wallet of a key file ``source`` (one hex key; readable by its owner only), or of
    ``KVAGENT_WALLET_KEY`` when ``source`` is ``None``."""
    if source is None:
        key = os.environ.get(WALLET_KEY_ENV, "").strip()
        if not key:
            raise ConfigError(f"no wallet: pass a key file or set {WALLET_KEY_ENV}")
        return Wallet(key)
    path = Path(source)
    try:
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise ConfigError(f"wallet key file {path} is readable by others: chmod 600 it")
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read wallet key file {path}: {exc.strerror}") from exc
    return Wallet(key)
