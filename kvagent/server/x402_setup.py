"""The host's x402 from its settings (the ``--x402-*`` options): its gateway (payment requirements,
verification, settlement) and, when the host's wallet key is kept here, the sender of payouts.

Nothing of the x402 SDK is imported unless an ``--x402-*`` option is set; then an incomplete configuration or
a missing SDK fails the start, saying what to set or install (``pip install 'kvagent[x402]'``). Keys are read
from files (owner-only) or the environment, never logged and never put in the settings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..payments import sdk
from ..payments.terms import X402Terms
from .settings import Settings

if TYPE_CHECKING:
    from .withdrawals import TokenSender
    from .x402 import X402Gateway

WALLET_KEY_ENV = "KVAGENT_X402_WALLET_KEY"
FACILITATOR_KEY_ENV = "KVAGENT_X402_FACILITATOR_KEY"
#: USDC's EIP-712 domain (name, version), the default token.
USDC_DOMAIN = ("USD Coin", "2")
_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


@dataclass
class X402Host:
    """A host's x402: the ``gateway``, the ``payouts`` sender (None without the host's key) and the chain's
    ``rpc`` (None with a hosted facilitator and no payouts: no chain audit then)."""

    gateway: X402Gateway
    payouts: TokenSender | None
    rpc: str | None


def read_key(path: Path | None, env: str, what: str) -> str | None:
    """A hex private key from the owner-only file ``path``, else from ``env``; None when neither is given."""
    if path is None:
        key = os.environ.get(env, "").strip()
        if not key:
            return None
    else:
        try:
            if os.name == "posix" and Path(path).stat().st_mode & 0o077:
                raise ConfigError(f"{what} key file {path} is readable by others: chmod 600 it")
            key = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} key file {path}: {exc.strerror}") from exc
    if not _KEY.match(key):
        raise ConfigError(f"the {what} key must be 32 bytes of hex (64 hex digits, optionally 0x-prefixed)")
    return key


def open_x402(settings: Settings) -> X402Host | None:
    """The host's x402 (None when no ``--x402-*`` option is set: the server behaves as without it)."""
    if not settings.x402_configured:
        return None
    sdk.require("x402")  # before anything else: say what to install
    sdk.require("x402.mechanisms.evm.exact")
    from .withdrawals import TokenSender
    from .x402 import X402Gateway

    wallet_key = read_key(settings.x402_wallet, WALLET_KEY_ENV, "host wallet")
    pay_to = settings.x402_pay_to
    if wallet_key is not None:
        address = str(sdk.require("eth_account").Account.from_key(wallet_key).address)
        if pay_to is not None and pay_to.lower() != address.lower():
            raise ConfigError("--x402-pay-to differs from the address of --x402-wallet's key")
        pay_to = address
    if pay_to is None:
        raise ConfigError(f"x402 needs the host's wallet: --x402-wallet KEYFILE (or {WALLET_KEY_ENV}) or "
                          "--x402-pay-to ADDRESS")
    if settings.x402_network is None or settings.x402_asset is None:
        raise ConfigError("x402 needs --x402-network (CAIP-2, e.g. eip155:8453) and --x402-asset (the token)")
    name, version = USDC_DOMAIN
    terms = X402Terms(settings.x402_network, settings.x402_asset, pay_to,
                      settings.x402_token_name or name, settings.x402_token_version or version)
    if settings.x402_facilitator is not None:
        gateway = X402Gateway.hosted(terms, settings.x402_facilitator)
    else:
        fac_key = read_key(settings.x402_facilitator_key, FACILITATOR_KEY_ENV, "facilitator")
        if fac_key is None or settings.x402_rpc is None:
            raise ConfigError("x402 needs a facilitator: --x402-facilitator URL (hosted), or "
                              f"--x402-facilitator-key KEYFILE (or {FACILITATOR_KEY_ENV}) and --x402-rpc URL "
                              "to run one in process")
        gateway = X402Gateway.in_process(terms, fac_key, settings.x402_rpc)
    payouts = None
    if wallet_key is not None and settings.x402_rpc is not None:
        payouts = TokenSender(settings.x402_rpc, gateway.terms.asset, wallet_key)
    return X402Host(gateway, payouts, settings.x402_rpc)
