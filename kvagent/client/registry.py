"""Client of the kvagent registry HTTP API (docs/registry-api.md).

One ``httpx.Client`` (connection reuse, explicit timeouts) behind a small retry policy: idempotent
calls are retried on connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``) with
exponential backoff and jitter, a bounded number of attempts and a bounded total delay. A
generate call is retried only until its stream has started. Every response is validated strictly:
anything unexpected is a ``RegistryError``, never a ``KeyError`` or a half-parsed object.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from ..artifacts import format as art
from ..artifacts import signing
from ..artifacts.signing import Signature
from ..artifacts.source import GiveUp, Handle
from ..engines.params import GenerationParams
from ..errors import (
    ArtifactError,
    ArtifactIntegrityError,
    KVAgentError,
    PaymentError,
    RegistryAuthError,
    RegistryConflictError,
    RegistryDownloadAbandonedError,
    RegistryError,
    RegistryNotImplementedError,
    RegistryPaymentRequiredError,
    RegistryProtocolError,
    RegistryRejectedError,
    RegistryUnavailableError,
)
from ..kvcache.identity import validate_key
from ..payments.http import settlement
from ..payments.payer import Payer, Payment
from ..payments.terms import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER, decode_header

T = TypeVar("T")
VISIBILITIES = ("restricted", "public")
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=20.0, write=20.0, pool=3.0)
_MAX_JSON_BYTES = 1 << 20
_MAX_RETRY_AFTER_S = 30.0
_HEX64_LEN, _SIG_HEX_LEN = 64, 128


@dataclass(frozen=True)
class Download:
    """One artifact download: its bytes, how long it took, and what it cost (nothing is kept on the client).

    ``charge``: integer micro-units charged by this call (0: free, or a replay of a purchase already paid);
    ``receipt``: the purchase's ``X-KVAgent-Receipt`` (for a dispute), None when nothing was sold.
    """

    data: bytearray
    seconds: float
    charge: int = 0
    receipt: str | None = None


@dataclass(frozen=True)
class VerifiedDownload:
    """A downloaded artifact after its checks (tree hash, header == handle, signature), and what it cost."""

    artifact: art.Artifact
    data: bytearray
    seconds: float
    charge: int = 0
    receipt: str | None = None


def sign(header: art.ArtifactHeader, private_key: Any) -> str:
    """The ``X-KVAgent-Signature`` value of an ed25519-v3 signature of ``header`` (see
    kvagent.artifacts.signing)."""
    return signing.sign(header, private_key).header_value()


def verify_signature(handle: Handle, trusted_keys: Collection[str]) -> None:
    """Raise ArtifactIntegrityError unless ``handle`` is v3- (or v2-) signed over its header by one of
    ``trusted_keys``."""
    if handle.signature is None:
        raise ArtifactIntegrityError(f"artifact {handle.key[:16]}… is unsigned but trusted keys are required")
    signing.verify(handle.signature, handle.header, trusted_keys)


# -- strict parsing of responses --------------------------------------------------------------
def _hex(v: Any, n: int, what: str) -> str:
    if not isinstance(v, str) or len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise RegistryProtocolError(
            f"registry sent {what} that is not {n} lowercase hex characters: {v!r:.80}"
        )
    return v


def parse_handle(obj: Any, *, key: str | None = None, limits: art.Limits = art.DEFAULT_LIMITS) -> Handle:
    """Validate a handle JSON object; ``key`` is the key it must describe."""
    if not isinstance(obj, Mapping):
        raise RegistryProtocolError(f"registry handle must be a JSON object, got {type(obj).__name__}")
    missing = {"key", "header", "size", "visibility", "owner", "blob_url", "signature"} - set(obj)
    if missing:
        raise RegistryProtocolError(f"registry handle lacks {sorted(missing)}")
    hkey = _hex(obj["key"], _HEX64_LEN, "a handle key")
    if key is not None and hkey != key:
        raise RegistryProtocolError(f"asked for {key[:16]}… but the registry answered with {hkey[:16]}…")
    if not isinstance(obj["header"], Mapping):
        raise RegistryProtocolError("registry handle's header is not a JSON object")
    try:
        header = art.header_from_mapping(obj["header"], limits)
    except ArtifactError as exc:
        raise RegistryProtocolError(f"registry handle carries an invalid artifact header: {exc}") from exc
    if header.key != hkey:
        raise RegistryProtocolError(f"handle {hkey[:16]}… carries the header of {header.key[:16]}…")
    size = obj["size"]
    max_size = 8 + limits.max_container_header + limits.max_payload_bytes
    if isinstance(size, bool) or not isinstance(size, int) or not header.payload_bytes < size <= max_size:
        raise RegistryProtocolError(
            f"handle size {size!r:.40} is impossible for a {header.payload_bytes}-byte payload (limit "
            f"{max_size})"
        )
    if obj["visibility"] not in VISIBILITIES:
        raise RegistryProtocolError(f"unknown visibility {obj['visibility']!r:.40}")
    if not isinstance(obj["owner"], str):
        raise RegistryProtocolError("handle owner must be a string")
    url = obj["blob_url"]
    if not isinstance(url, str) or not url.startswith("/") or url.startswith("//"):
        raise RegistryProtocolError(f"blob_url must be a path on the registry, got {url!r:.80}")
    price, currency = obj.get("price"), obj.get("currency")
    if price is not None and (isinstance(price, bool) or not isinstance(price, int) or price < 0):
        raise RegistryProtocolError(f"handle price must be a non-negative integer, got {price!r:.40}")
    if currency is not None and not isinstance(currency, str):
        raise RegistryProtocolError("handle currency must be a string")
    return Handle(
        hkey, header, size, obj["visibility"], obj["owner"], url, _parse_signature(obj["signature"]),
        price, currency,
    )


def _parse_signature(sig: Any) -> Signature | None:
    if sig is None:
        return None
    if not isinstance(sig, Mapping) or sig.get("alg") not in signing.ALGS:
        raise RegistryProtocolError(f"unsupported signature record {sig!r:.80}")
    return Signature(
        sig["alg"],
        _hex(sig.get("public_key"), _HEX64_LEN, "a public key"),
        _hex(sig.get("signature"), _SIG_HEX_LEN, "a signature"),
    )


def _json(resp: httpx.Response) -> Any:
    if len(resp.content) > _MAX_JSON_BYTES:
        raise RegistryProtocolError(f"registry JSON response of {len(resp.content)} bytes is too large")
    try:
        return json.loads(resp.content)
    except (ValueError, RecursionError) as exc:
        raise RegistryProtocolError(f"registry sent malformed JSON ({resp.status_code}): {exc}") from exc


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after")
    try:
        return min(max(float(raw), 0.0), _MAX_RETRY_AFTER_S) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_for(resp: httpx.Response, what: str) -> RegistryError:
    """Translate a non-success status into the matching RegistryError (the body's detail included)."""
    detail = ""
    try:
        body = json.loads(resp.content[:4096]) if resp.content else None
        if isinstance(body, Mapping):
            detail = f": {body.get('error', '')} {str(body.get('detail', ''))[:300]}".rstrip()
    except (ValueError, RecursionError, httpx.ResponseNotRead):
        detail = ""
    msg = f"registry {what} failed with HTTP {resp.status_code}{detail}"
    code = resp.status_code
    if code == 402:
        return RegistryPaymentRequiredError(msg, _quote(resp))
    if code == 501:
        return RegistryNotImplementedError(msg)
    if code == 429 or code >= 500 and code != 501:
        return RegistryUnavailableError(msg, retry_after=_retry_after(resp))
    if code in (401, 403):
        return RegistryAuthError(msg + " (check the token)")
    if code == 409:
        return RegistryConflictError(msg)
    if code in (413, 422):
        return RegistryRejectedError(msg)
    return RegistryError(msg)


def _quote(resp: httpx.Response) -> dict[str, Any]:
    """The machine-readable quote of a 402 answer (validated; empty if the registry sent none)."""
    try:
        q = json.loads(resp.content[:4096]).get("quote")
    except (ValueError, RecursionError, AttributeError, httpx.ResponseNotRead):
        return {}
    if not isinstance(q, Mapping):
        return {}
    ints = all(isinstance(q.get(f), int) and not isinstance(q.get(f), bool) for f in ("price", "balance"))
    if not ints or not isinstance(q.get("currency"), str):
        return {}
    return {f: q.get(f) for f in ("key", "price", "currency", "balance", "reason")}


def _payment_headers(max_price: int | None, idempotency_key: str | None) -> dict[str, str]:
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    if max_price is not None:
        headers["X-KVAgent-Max-Price"] = str(int(max_price))
    return headers


def _int_field(body: Any, name: str, what: str) -> int:
    v = body.get(name) if isinstance(body, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RegistryProtocolError(f"registry {what} answer lacks an integer {name!r}")
    return v


class _Deadline:
    """A limit on one call's total time, every attempt and back-off included (None: the client's timeouts)."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a registry call timeout must be positive, got {seconds!r}")
        self.seconds = seconds
        self._end = time.monotonic() + seconds if seconds is not None else None
        self.last_error = ""  # what the last attempt failed with, named when the deadline passes

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic()) if self._end is not None else float("inf")

    def kw(self, what: str, base: httpx.Timeout) -> dict[str, Any]:
        """The per-request ``timeout``: the client's own, shortened to what is left; raises once it has
        passed."""
        if self._end is None:
            return {}
        left = self.left()
        if left <= 0.001:
            after = f" after {self.last_error}" if self.last_error else ""
            raise RegistryUnavailableError(
                f"registry {what} gave up: its {self.seconds:.2f} s deadline passed{after}"
            )

        def cap(t: float | None) -> float:
            return left if t is None else min(left, t)

        return {
            "timeout": httpx.Timeout(
                connect=cap(base.connect), read=cap(base.read), write=cap(base.write), pool=cap(base.pool)
            )
        }

    def cap(self, wait: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
        """``wait``, never sleeping past the deadline."""
        return lambda state: min(float(wait(state)), self.left())


class _Wait:
    """Retry-After when the server sent one, else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float):
        self._backoff = wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RegistryUnavailableError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))


class RegistryClient:
    """Talks to a registry. ``trusted_keys`` (hex ed25519 public keys) makes signatures mandatory.

    ``payer`` (a wallet within its caps) pays a download's 402 by x402 when the price is within the call's
    ``max_price``; a wallet-only agent needs no token to buy public priced artifacts.

    ``base_url`` may name several stateless nodes of one registry (a list, or one comma-separated
    string): a refused connection moves to the next node at once, and any other failed attempt is
    retried on the next node.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_seconds: float = 20.0,
        backoff_initial: float = 0.2,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] | None = None,
        trusted_keys: Collection[str] | None = None,
        limits: art.Limits = art.DEFAULT_LIMITS,
        payer: Payer | None = None,
    ) -> None:
        if retries < 1:
            raise ValueError("retries counts attempts and must be at least 1")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_urls = _node_urls(base_url)
        self.base_url = self.base_urls[0]
        self._owns_client = client is None
        self._http = client or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        if client is not None:
            client.base_url = httpx.URL(self.base_url)
            client.headers.update(headers)
        self.trusted_keys = frozenset(k.lower() for k in trusted_keys) if trusted_keys is not None else None
        self.limits = limits
        self.payer = payer  # pays a priced download's x402 402 from a wallet (kvagent.payments)
        self._retry_kw: dict[str, Any] = dict(
            stop=stop_after_attempt(retries) | stop_after_delay(max_retry_seconds),
            wait=_Wait(backoff_initial, 5.0),
            retry=retry_if_exception_type(RegistryUnavailableError),
            reraise=True,
        )
        if len(self.base_urls) > 1:
            self._retry_kw["before_sleep"] = lambda _state: self._next_node()
        if sleep is not None:
            self._retry_kw["sleep"] = sleep

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------
    def _retrying(self, fn: Callable[[], T], deadline: _Deadline | None = None) -> T:
        kw = self._retry_kw
        if deadline is None or deadline.seconds is None:
            return Retrying(**kw)(fn)
        kw = {**kw, "stop": kw["stop"] | stop_after_delay(deadline.seconds), "wait": deadline.cap(kw["wait"])}

        def attempt() -> T:
            try:
                return fn()
            except RegistryUnavailableError as exc:
                if "deadline passed" not in str(exc):
                    deadline.last_error = str(exc)[:300]
                raise

        return Retrying(**kw)(attempt)

    def _next_node(self) -> None:
        """Send what follows to the next registry node."""
        i = self.base_urls.index(self.base_url) if self.base_url in self.base_urls else -1
        self.base_url = self.base_urls[(i + 1) % len(self.base_urls)]
        self._http.base_url = httpx.URL(self.base_url)

    def _send(self, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
        for _ in range(len(self.base_urls)):
            try:
                return self._http.request(method, url, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # never reached the node: any request is safe to send to the next one at once
                err: httpx.TransportError = exc
                if len(self.base_urls) > 1:
                    self._next_node()
            except httpx.TransportError as exc:
                err = exc
                break
        raise RegistryUnavailableError(
            f"registry {what} at {self.base_url} failed: {type(err).__name__}: {err}"
        ) from err

    # -- API --------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self._http.get("/v1/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def lookup(self, key: str, *, timeout: float | None = None) -> Handle | None:
        """The handle of ``key``, or None if the registry has none visible to us.

        ``timeout`` bounds the whole call, retries included (a stalled registry then costs at most that).
        """
        validate_key(key)
        deadline = _Deadline(timeout)

        def once() -> Handle | None:
            resp = self._send(
                "GET", f"/v1/artifacts/{key}", "lookup", **deadline.kw("lookup", self._http.timeout)
            )
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise _error_for(resp, "lookup")
            return parse_handle(_json(resp), key=key, limits=self.limits)

        return self._retrying(once, deadline)

    def lookup_prefix(
        self, block_hashes: Sequence[str], *, timeout: float | None = None
    ) -> tuple[Handle, int] | None:
        """The artifact sharing the longest block-hash prefix with ``block_hashes`` and how many blocks.

        ``timeout`` bounds the whole call, retries included.
        """
        hashes = [_hex(h, _HEX64_LEN, "a block hash") for h in block_hashes]
        if not hashes:
            return None
        deadline = _Deadline(timeout)

        def once() -> tuple[Handle, int] | None:
            resp = self._send(
                "POST", "/v1/lookup/prefix", "prefix lookup", json={"block_hashes": hashes[:4096]},
                **deadline.kw("prefix lookup", self._http.timeout),
            )
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                raise _error_for(resp, "prefix lookup")
            body = _json(resp)
            if not isinstance(body, Mapping) or not {"key", "blocks", "handle"} <= set(body):
                raise RegistryProtocolError("prefix lookup answer must hold key, blocks and handle")
            blocks = body["blocks"]
            if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 < blocks <= len(hashes):
                raise RegistryProtocolError(f"prefix lookup matched {blocks!r:.20} of {len(hashes)} blocks")
            return parse_handle(
                body["handle"], key=_hex(body["key"], _HEX64_LEN, "a key"), limits=self.limits
            ), blocks

        return self._retrying(once, deadline)

    def download_blob(self, handle: Handle, *, max_price: int | None = None,
                      idempotency_key: str | None = None, give_up: GiveUp | None = None) -> Download:
        """The artifact bytes of ``handle``, streamed and cut off at the handle's declared size.

        Every attempt carries the same ``Idempotency-Key`` (a fresh one per call unless given), so a
        retried download is charged once; a priced artifact above ``max_price`` or the balance raises
        RegistryPaymentRequiredError (not retried). The returned ``Download`` says what this call cost.
        ``give_up(received, size, seconds)``, asked as the bytes come in, returns why to stop (raising
        RegistryDownloadAbandonedError, not retried) or None to go on.
        """
        pay = _payment_headers(max_price, idempotency_key)
        paid = _Paid()
        x402 = _X402(self.payer, max_price)
        t0 = time.perf_counter()

        def attempt(headers: dict[str, str], started: float) -> bytearray | httpx.Response:
            """One GET of the blob: its bytes, or a 402 answer that the wallet may pay (read)."""
            with self._http.stream("GET", handle.blob_url, headers=headers) as resp:
                # a presigned object-store URL: bytes bypass the registry
                if resp.status_code in _REDIRECTS:
                    resp.read()
                    paid.note(resp)
                    x402.served(resp)
                    req = self._http.build_request("GET", _presigned_location(resp))
                    # the bearer token never goes to the object store
                    req.headers.pop("authorization", None)
                    obj = self._http.send(req, stream=True)
                    try:
                        # expired or refused: the next attempt asks for a fresh URL
                        if obj.status_code != 200:
                            obj.read()
                            raise RegistryUnavailableError(
                                f"object store answered HTTP {obj.status_code} for {handle.key[:16]}…"
                            )
                        return _read_blob(obj, handle, give_up, started)
                    finally:
                        obj.close()
                if resp.status_code != 200:
                    resp.read()
                    if x402.payable(resp):
                        return resp
                    raise x402.refused(resp) or _error_for(resp, "download")
                paid.note(resp)
                x402.served(resp)
                return _read_blob(resp, handle, give_up, started)

        def once() -> bytearray:
            started = time.perf_counter()  # give_up judges this attempt's speed, not earlier attempts'
            try:
                got = attempt(x402.headers(pay), started)
                if isinstance(got, httpx.Response):  # a 402 the wallet pays: once, then the same signature
                    x402.pay(got)
                    got = attempt(x402.headers(pay), started)
                    if isinstance(got, httpx.Response):
                        raise _error_for(got, "download")
                return got
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"download of {handle.key[:16]}… failed: {type(exc).__name__}: {exc}"
                ) from exc

        data = self._retrying(once)
        charge = paid.charge if paid.charge or not x402.settled else x402.settled
        return Download(data, time.perf_counter() - t0, charge, paid.receipt)

    def download_verified(
        self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
        idempotency_key: str | None = None, give_up: GiveUp | None = None,
    ) -> VerifiedDownload:
        """Download, verify (tree hash, header == handle, signature when keys are trusted) and decode;
        ``give_up`` as for ``download_blob``."""
        got = self.download_blob(
            handle, max_price=max_price, idempotency_key=idempotency_key, give_up=give_up
        )
        artifact = art.decode(got.data, expect=expect, limits=self.limits)
        if artifact.header != handle.header:
            raise ArtifactIntegrityError(
                f"downloaded artifact header differs from the registry's handle for {handle.key[:16]}…"
            )
        if self.trusted_keys is not None:
            verify_signature(handle, self.trusted_keys)
        return VerifiedDownload(artifact, got.data, got.seconds, got.charge, got.receipt)

    def download(self, handle: Handle, expect: art.Expectation, *, max_price: int | None = None,
                 idempotency_key: str | None = None) -> art.Artifact:
        return self.download_verified(
            handle, expect, max_price=max_price, idempotency_key=idempotency_key
        ).artifact

    def publish(self, blob: bytes, visibility: str = "restricted", signing_key: Any = None,
                price: int | None = None) -> Handle:
        """Publish artifact bytes under their header's key (PUT is idempotent for identical bytes);
        ``price`` (micro-units per load) is set before the artifact becomes visible."""
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
        header = art.read_header(blob, self.limits)
        headers = {"X-KVAgent-Visibility": visibility, "Content-Type": "application/octet-stream"}
        if price is not None:
            headers["X-KVAgent-Price"] = str(int(price))
        if signing_key is not None:
            headers["X-KVAgent-Signature"] = sign(header, signing_key)

        def once() -> Handle:
            resp = self._send("PUT", f"/v1/artifacts/{header.key}", "publish", content=blob, headers=headers)
            if resp.status_code not in (200, 201):
                raise _error_for(resp, "publish")
            return parse_handle(_json(resp), key=header.key, limits=self.limits)

        return self._retrying(once)

    def grant(self, key: str, principal: str) -> None:
        """Let ``principal`` see a restricted artifact we own."""
        validate_key(key)

        def once() -> None:
            resp = self._send(
                "POST", f"/v1/artifacts/{key}/entitlements", "grant", json={"principal": principal}
            )
            if resp.status_code not in (200, 201, 204):
                raise _error_for(resp, "grant")

        self._retrying(once)

    def generate_stream(self, key: str, suffix_ids: Sequence[int], params: GenerationParams, *,
                        max_price: int | None = None, idempotency_key: str | None = None) -> GenerationStream:
        """Continue generation on the registry from ``key``'s KV: iterate the result for token ids as they
        arrive.

        Nothing is sent until the first token is asked for. The request is retried until the stream starts,
        never after a token has been yielded; every attempt carries the same ``Idempotency-Key``, so it is
        charged once: the stream's ``charge`` and ``receipt`` say what it cost once it has started.
        """
        validate_key(key)
        pay = _payment_headers(max_price, idempotency_key)
        body = {
            "suffix_ids": [int(t) for t in suffix_ids],
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop_token_ids": list(params.stop_token_ids),
        }
        stream = GenerationStream(params.max_new_tokens)

        def start() -> httpx.Response:
            try:
                req = self._http.build_request(
                    "POST", f"/v1/artifacts/{key}/generate", json=body, headers=pay
                )
                resp = self._http.send(req, stream=True)
            except httpx.TransportError as exc:
                raise RegistryUnavailableError(
                    f"registry generate failed: {type(exc).__name__}: {exc}"
                ) from exc
            if resp.status_code != 200:
                resp.read()
                resp.close()
                raise _error_for(resp, "generate")
            stream.paid.note(resp)
            return resp

        stream.start = lambda: self._retrying(start)
        return stream

    # -- market -----------------------------------------------------------------------------
    def _call(self, method: str, url: str, what: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        def once() -> Any:
            resp = self._send(method, url, what, **kw)
            if resp.status_code not in ok:
                raise _error_for(resp, what)
            body = _json(resp)
            if not isinstance(body, Mapping):
                raise RegistryProtocolError(f"registry {what} answer must be a JSON object")
            return body

        return self._retrying(once)

    def account(self) -> dict[str, Any]:
        """``{"principal", "balance", "currency"}`` of our account (balance in integer micro-units)."""
        body = self._call("GET", "/v1/account", "account")
        _int_field(body, "balance", "account")
        return dict(body)

    def account_balance(self) -> int:
        return _int_field(self._call("GET", "/v1/account", "account"), "balance", "account")

    def statement(self) -> dict[str, Any]:
        """Our purchases and sales per artifact (loads, amounts, royalties, refunds), credits and balance."""
        body = self._call("GET", "/v1/account/statement", "statement")
        _int_field(body, "balance", "statement")
        return dict(body)

    def credit(self, principal: str, amount: int, memo: str = "", *, create: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Admin only: credit ``principal`` with ``amount`` micro-units. Retried under one Idempotency-Key
        (``idempotency_key``, or a fresh one per call), so a retry never credits twice; a replay answers
        ``"replayed": true`` and ``"credited": 0``. ``create`` credits a principal no token names yet."""
        body: dict[str, Any] = {"principal": principal, "amount": int(amount), "memo": memo}
        if create:
            body["create"] = True
        return self._admin_money("/v1/account/credit", "credit", body, idempotency_key)

    def adjust(self, principal: str, amount: int, reason: str, *, allow_negative: bool = False,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Admin only: correct ``principal``'s balance by ``amount`` (negative debits) with a mandatory
        ``reason``; a debit below zero is refused (409) unless ``allow_negative`` records a debt. Retried
        under one Idempotency-Key like :meth:`credit`."""
        body = {"principal": principal, "amount": int(amount), "reason": reason,
                "allow_negative": allow_negative}
        return self._admin_money("/v1/account/adjust", "adjustment", body, idempotency_key)

    def _admin_money(self, url: str, what: str, body: dict[str, Any],
                     idempotency_key: str | None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        answer = self._call("POST", url, what, json=body, headers=headers)
        _int_field(answer, "balance", what)
        return dict(answer)

    def price(self, key: str) -> dict[str, Any]:
        """``{"key", "price", "currency", "balance"}``: what one load of ``key`` costs us."""
        validate_key(key)
        body = self._call("GET", f"/v1/artifacts/{key}/price", "price")
        _int_field(body, "price", "price")
        return dict(body)

    def set_price(self, key: str, price: int) -> int:
        """Set the price per load of an artifact we own (micro-units; 0 makes it free)."""
        validate_key(key)
        body = self._call("PUT", f"/v1/artifacts/{key}/price", "set price", json={"price": int(price)})
        return _int_field(body, "price", "set price")

    def dispute(self, key: str, receipt: str, *, layer: int | None = None, position: int | None = None,
                difference: float | None = None, detail: str = "") -> dict[str, Any]:
        """Dispute a purchase whose verification failed; the answer says ``refunded``, ``rejected`` or
        ``open``."""
        validate_key(key)
        body = {"receipt": receipt, "layer": layer, "position": position, "difference": difference,
                "detail": detail[:500]}
        # 201: a new dispute; 200: the receipt's dispute filed before, as it stands
        return dict(self._call("POST", f"/v1/artifacts/{key}/disputes", "dispute", json=body, ok=(200, 201)))


_REDIRECTS = (301, 302, 303, 307, 308)


class _Paid:
    """What one call was charged, summed over its attempts (a replayed purchase adds nothing)."""

    def __init__(self) -> None:
        self.charge = 0
        self.receipt: str | None = None

    def note(self, resp: httpx.Response) -> None:
        """Add a paid answer's amount and keep its receipt id (``X-KVAgent-Charged`` /
        ``X-KVAgent-Receipt``)."""
        receipt = resp.headers.get("x-kvagent-receipt")
        if receipt:
            self.receipt = receipt
        charged = resp.headers.get("x-kvagent-charged", "0")
        if charged.isdigit() and resp.headers.get("x-kvagent-replayed") != "1":
            self.charge += int(charged)


class _X402:
    """One download's x402 payment: signed at most once, from the first 402 that carries requirements, and
    sent again unchanged on every later attempt (the host settles one signature once, so a retry never pays
    twice). What was settled comes back in ``PAYMENT-RESPONSE``."""

    def __init__(self, payer: Payer | None, limit: int | None) -> None:
        self.payer, self.limit = payer, limit
        self.payment: Payment | None = None
        self.settled = 0  # token units (= micro-units) the host settled for this download

    def headers(self, base: dict[str, str]) -> dict[str, str]:
        return base if self.payment is None else {**base, PAYMENT_SIGNATURE_HEADER: self.payment.header}

    def payable(self, resp: httpx.Response) -> bool:
        """A 402 with x402 requirements, and a wallet that has not paid this download yet."""
        return (resp.status_code == 402 and self.payer is not None and self.payment is None
                and PAYMENT_REQUIRED_HEADER in resp.headers)

    def pay(self, resp: httpx.Response) -> None:
        """Sign a payment for a 402 (never retried: RegistryPaymentRequiredError when the caps refuse)."""
        assert self.payer is not None
        try:
            self.payment = self.payer.pay(resp.headers[PAYMENT_REQUIRED_HEADER], self.limit)
        except PaymentError as exc:
            quote = {**_quote(resp), "x402": f"not paid: {exc.reason or 'declined'} ({exc})"}
            raise RegistryPaymentRequiredError(f"registry download needs a payment this agent refused: {exc}",
                                               quote) from exc

    def served(self, resp: httpx.Response) -> None:
        if self.payment is not None and settlement(resp) is not None:
            self.settled = self.payment.amount

    def refused(self, resp: httpx.Response) -> RegistryError | None:
        """After a payment was sent: the host refused it (402) or could not settle it (503
        ``payment_unavailable``): nothing moved, the budget gets it back, and the download is not retried."""
        if self.payment is None or self.payer is None:
            return None
        code = _error_code(resp)
        if resp.status_code == 402 or (resp.status_code == 503 and code.startswith("payment")):
            self.payer.unsettled(self.payment)
            why = _x402_error(resp) or code or f"HTTP {resp.status_code}"
            amount, self.payment = self.payment.amount, None
            base = _error_for(resp, "download")
            quote = {**_quote(resp), "x402": f"paid {amount} but not taken: {why}"}
            msg = f"{base} (x402 payment of {amount} not settled: {why})"
            return RegistryPaymentRequiredError(msg, quote)
        return None


def _error_code(resp: httpx.Response) -> str:
    try:
        body = json.loads(resp.content[:4096]) if resp.content else None
    except (ValueError, RecursionError, httpx.ResponseNotRead):
        return ""
    code = body.get("error") if isinstance(body, Mapping) else None
    return code if isinstance(code, str) else ""


def _x402_error(resp: httpx.Response) -> str:
    """The ``error`` of a 402's ``PAYMENT-REQUIRED`` header (why a payment was refused), if any."""
    raw = resp.headers.get(PAYMENT_REQUIRED_HEADER)
    if raw is None:
        return ""
    try:
        err = decode_header(raw).get("error")
    except KVAgentError:
        return ""
    return str(err)[:200] if err else ""


class GenerationStream:
    """The token ids of one remote generation, in order (iterate once), and what it cost.

    ``charge`` (integer micro-units) and ``receipt`` are known once the stream has started; they belong to
    this call alone, so concurrent generations on one client never see each other's charges. A hosted
    generation is pre-charged for ``max_new_tokens`` (docs/market.md): output it did not produce is refunded
    by the registry afterwards, not reflected here.
    """

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.paid = _Paid()
        self.start: Callable[[], httpx.Response] | None = None

    @property
    def charge(self) -> int:
        return self.paid.charge

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


def _node_urls(base_url: str | Sequence[str]) -> list[str]:
    """The registry node URLs of ``base_url`` (a list, or one comma-separated string)."""
    raw = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = [u.strip().rstrip("/") for u in raw if u.strip()]
    if not urls:
        raise ValueError("RegistryClient needs at least one registry URL")
    return urls


def _presigned_location(resp: httpx.Response) -> str:
    url = resp.headers.get("location", "")
    if not url.startswith(("https://", "http://")) or len(url) > 8192:
        raise RegistryProtocolError(f"registry redirected a download to {url[:80]!r}, not an http(s) URL")
    return url


def _read_blob(resp: httpx.Response, handle: Handle, give_up: GiveUp | None, started: float) -> bytearray:
    """The body of a blob response, checked against the handle's declared size; ``give_up`` (see
    ``RegistryClient.download_blob``) is asked after each chunk, with the seconds since ``started``."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) != handle.size:
        raise ArtifactIntegrityError(
            f"registry serves {declared} bytes for {handle.key[:16]}… but its handle says {handle.size}"
        )
    buf = bytearray()
    for chunk in resp.iter_bytes():
        buf += chunk
        if len(buf) > handle.size:
            raise ArtifactIntegrityError(
                f"download of {handle.key[:16]}… exceeded its declared {handle.size} bytes"
            )
        if give_up is not None and len(buf) < handle.size:
            seconds = time.perf_counter() - started
            why = give_up(len(buf), handle.size, seconds)
            if why:
                raise RegistryDownloadAbandonedError(why, len(buf), seconds)
    if len(buf) != handle.size:
        raise RegistryUnavailableError(
            f"download of {handle.key[:16]}… stopped at {len(buf)}/{handle.size} bytes"
        )
    return buf


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
