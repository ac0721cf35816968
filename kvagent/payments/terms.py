"""What a host accepts in payment, and the x402 v2 wire format of its requirements (pure: no SDK needed).

One token unit is one micro-unit of the ledger's currency: USDC and the test chain's KVUSD have 6 decimals, so
an amount of ``uUSD`` is the same integer on chain and in the ledger, with no rounding.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

PAYMENT_REQUIRED_HEADER = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE_HEADER = "PAYMENT-RESPONSE"
X402_VERSION = 2
SCHEME = "exact"
#: Longest header value accepted (a signed exact payload is about 1 KB in base64).
MAX_HEADER = 16_384
#: The ledger principal of a buyer known only by its wallet.
WALLET_PREFIX = "x402:"

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_NETWORK = re.compile(r"^eip155:[0-9]{1,20}$")


@dataclass(frozen=True)
class X402Terms:
    """A host's x402 terms: the CAIP-2 ``network``, the token ``asset`` it is paid in, its ``pay_to`` wallet,
    and the token's EIP-712 domain (``token_name``, ``token_version``) that the buyer signs against."""

    network: str
    asset: str
    pay_to: str
    token_name: str
    token_version: str
    max_timeout_seconds: int = 300

    def __post_init__(self) -> None:
        if not _NETWORK.match(self.network):
            raise ConfigError(f"x402 network must be a CAIP-2 EVM id like eip155:8453, got {self.network!r}")
        for what, v in (("asset", self.asset), ("pay_to", self.pay_to)):
            if not _ADDRESS.match(v):
                raise ConfigError(f"x402 {what} must be a 0x-prefixed 20-byte address, got {v!r}")
        if not self.token_name or not self.token_version:
            raise ConfigError("x402 needs the token's EIP-712 name and version (USDC: 'USD Coin', '2')")
        if not 10 <= self.max_timeout_seconds <= 3600:
            raise ConfigError("x402 max_timeout_seconds must be 10..3600")


def requirements(terms: X402Terms, amount: int) -> dict[str, Any]:
    """The ``exact`` requirements of paying ``amount`` token units (= micro-units) to the host (wire form)."""
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ConfigError(f"an x402 amount is a positive integer of token units, got {amount!r}")
    return {
        "scheme": SCHEME,
        "network": terms.network,
        "asset": terms.asset,
        "amount": str(amount),
        "payTo": terms.pay_to,
        "maxTimeoutSeconds": terms.max_timeout_seconds,
        "extra": {"name": terms.token_name, "version": terms.token_version},
    }


def payment_required(terms: X402Terms, amount: int, url: str, description: str = "",
                     error: str = "") -> dict[str, Any]:
    """The x402 v2 ``PAYMENT-REQUIRED`` object of a 402 answer for ``url`` at ``amount``."""
    out: dict[str, Any] = {
        "x402Version": X402_VERSION,
        "resource": {"url": url, "description": description, "mimeType": "application/octet-stream"},
        "accepts": [requirements(terms, amount)],
    }
    if error:
        out["error"] = error
    return out


def encode_header(obj: dict[str, Any]) -> str:
    """An x402 header's value: base64 of compact JSON."""
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode("ascii")


def decode_header(value: str) -> dict[str, Any]:
    """The JSON object of an x402 header's value (ConfigError when it is not base64 JSON of an object)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_HEADER:
        raise ConfigError(f"an x402 header must be 1..{MAX_HEADER} characters")
    try:
        obj = json.loads(base64.b64decode(value.encode("ascii"), validate=True))
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise ConfigError("an x402 header must be base64-encoded JSON") from exc
    if not isinstance(obj, dict):
        raise ConfigError("an x402 header must hold a JSON object")
    return obj


def wallet_principal(address: str) -> str:
    """The ledger principal of a buyer known only by its wallet address (lowercase, so one per wallet)."""
    if not isinstance(address, str) or not _ADDRESS.match(address):
        raise ConfigError(f"not a wallet address: {address!r}")
    return WALLET_PREFIX + address.lower()
