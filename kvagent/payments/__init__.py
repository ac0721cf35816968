"""x402 payments: a priced kvagent route answers 402 with x402 requirements; a wallet pays them.

Pure helpers apart from I/O and the SDK (``pip install 'kvagent[x402]'``, imported only when used):

- :mod:`.terms` — what a host accepts (network, asset, payee, EIP-712 domain) and the x402
  ``PAYMENT-REQUIRED`` requirements of a quote, with the headers' base64-JSON encoding;
- :mod:`.caps` — a buyer's spend caps (price per load, budget), mapped onto the SDK's spend controls;
- :mod:`.wallet` — a wallet's key from a key file or ``KVAGENT_WALLET_KEY``, never logged or shown;
- :mod:`.payer` — signing a payment for a 402 answer within the caps (the SDK's ``x402ClientSync``).

The server side (verification and settlement through a facilitator, the ledger's deposit) is
kvagent.server.x402 and kvagent.server.deposits.
"""

from .caps import SpendCaps
from .terms import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_RESPONSE_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    X402Terms,
    decode_header,
    encode_header,
    payment_required,
    requirements,
    wallet_principal,
)
from .wallet import Wallet, load_wallet

__all__ = [
    "PAYMENT_REQUIRED_HEADER",
    "PAYMENT_RESPONSE_HEADER",
    "PAYMENT_SIGNATURE_HEADER",
    "SpendCaps",
    "Wallet",
    "X402Terms",
    "decode_header",
    "encode_header",
    "load_wallet",
    "payment_required",
    "requirements",
    "wallet_principal",
]
