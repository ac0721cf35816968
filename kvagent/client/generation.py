"""Remote generation: the registry continues from an artifact's KV and streams the token ids back.

A generate call is retried only until its stream has started, never after a token has been yielded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence

import httpx

from ..engines.params import GenerationParams
from ..errors import RegistryProtocolError, RegistryUnavailableError
from ..kvcache.identity import validate_key
from ..payments.payer import Payer
from .charges import X402, Paid, payment_headers
from .transport import Transport
from .wire import error_for


class GenerationStream:
    """The token ids of one remote generation, in order (iterate once), and what it cost.

    ``charge`` (integer micro-units) and ``receipt`` are known once the stream has started; they belong to
    this call alone, so concurrent generations on one client never see each other's charges. A hosted
    generation is pre-charged for ``max_new_tokens`` (docs/market.md): output it did not produce is refunded
    by the registry afterwards, not reflected here.
    """

    def __init__(self, max_new_tokens: int, x402: X402) -> None:
        self.max_new_tokens = max_new_tokens
        self.paid = Paid()
        self.x402 = x402
        self.start: Callable[[], httpx.Response] | None = None

    @property
    def charge(self) -> int:
        """What the call cost (integer micro-units), see :meth:`X402.charge`."""
        return self.x402.charge(self.paid)

    @property
    def receipt(self) -> str | None:
        return self.paid.receipt

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, None
        if start is None:
            raise RuntimeError("a GenerationStream can be iterated only once")
        resp = start()
        try:
            yield from _ndjson_tokens(resp, self.max_new_tokens)
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"registry generate stream broke: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            resp.close()


class GenerationClient:
    """Generation hosted by a registry, from the KV of an artifact it holds. ``payer`` (a wallet within its
    caps) pays a generation's 402 by x402 when its price is within the call's ``max_price``."""

    def __init__(self, transport: Transport, payer: Payer | None = None) -> None:
        self._t = transport
        self.payer = payer

    def generate_stream(self, key: str, suffix_ids: Sequence[int], params: GenerationParams, *,
                        max_price: int | None = None, idempotency_key: str | None = None) -> GenerationStream:
        """Continue generation on the registry from ``key``'s KV: iterate the result for token ids as they
        arrive.

        Nothing is sent until the first token is asked for. The request is retried until the stream starts,
        never after a token has been yielded; every attempt carries the same ``Idempotency-Key``, so it is
        charged once: the stream's ``charge`` and ``receipt`` say what it cost once it has started. A 402
        with x402 requirements is paid by the client's ``payer`` (within ``max_price`` and its caps) once,
        and every later attempt sends the same signature; RegistryPaymentRequiredError when it may not pay.
        """
        validate_key(key)
        pay = payment_headers(max_price, idempotency_key)
        body = {
            "suffix_ids": [int(t) for t in suffix_ids],
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop_token_ids": list(params.stop_token_ids),
        }
        x402 = X402(self.payer, max_price, "generate")
        stream = GenerationStream(params.max_new_tokens, x402)

        def post() -> httpx.Response:
            try:
                url = f"/v1/artifacts/{key}/generate"
                return self._t.open("POST", url, json=body, headers=x402.headers(pay))
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"registry generate failed: {type(exc).__name__}: {exc}"
                ) from exc

        def start() -> httpx.Response:
            resp = post()
            if x402.payable(resp):
                resp.read()
                resp.close()
                x402.pay(resp)  # once: a later attempt sends the same signature
                resp = post()
            if resp.status_code != 200:
                resp.read()
                resp.close()
                raise x402.refused(resp) or error_for(resp, "generate")
            stream.paid.note(resp)
            x402.served(resp)
            return resp

        stream.start = lambda: self._t.retrying(start)
        return stream


def _ndjson_tokens(resp: httpx.Response, max_new_tokens: int) -> Iterator[int]:
    n = 0
    for line in resp.iter_lines():
        if not line.strip():
            continue
        if len(line) > 4096:
            raise RegistryProtocolError("generate stream line too long")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise RegistryProtocolError(f"generate stream sent malformed JSON: {line[:80]!r}") from exc
        if isinstance(msg, Mapping) and msg.get("done") is True:
            return
        tok = msg.get("token") if isinstance(msg, Mapping) else None
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise RegistryProtocolError(f"generate stream sent an unexpected message: {line[:80]!r}")
        n += 1
        if n > max_new_tokens:
            raise RegistryProtocolError(
                f"generate stream sent more than the {max_new_tokens} tokens asked for"
            )
        yield tok
    raise RegistryUnavailableError("generate stream ended without its done message")
