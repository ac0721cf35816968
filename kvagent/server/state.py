"""The server's state shared by every route module: settings, tokens, metadata, blobs, metrics and the model
host."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request

from ..errors import ConfigError, PaymentError, StoreError
from ..kvcache.identity import validate_key
from .auth import Principal, TokenTable, read_token_file
from .blobs import BlobStore, open_blobs
from .http import ApiError, not_found
from .meta import ArtifactRow, MetaStore, open_meta
from .metrics import Metrics
from .quotas import Quotas
from .records import OwnerCopies, visible_row
from .settings import Settings
from .token_store import TokenStore

if TYPE_CHECKING:
    from .host import ModelHost
    from .ledger import Ledger
    from .x402 import X402Gateway
    from .x402_setup import X402Host

log = logging.getLogger("kvagent.server")

#: The buyer of a request with neither a bearer token nor a payment (x402 on): it sees public artifacts and
#: their 402 quotes, and buys nothing until it signs a payment (``x402:`` names never hold a token).
ANONYMOUS = "x402:anonymous"


@dataclass
class State:
    """What every route module shares (built once by ``build_state``)."""

    settings: Settings
    tokens: TokenTable
    meta: MetaStore
    blobs: BlobStore
    metrics: Metrics
    host: ModelHost | None  # the model this node serves, if any
    market: Ledger  # prices, accounts and charges
    quotas: Quotas  # rate limits and quotas per principal
    copies: OwnerCopies  # later publishers' own records of hidden keys
    token_store: TokenStore | None = None  # the tokens in the database (the admin API changes them)
    x402_host: X402Host | None = None  # x402 payments (the --x402-* options), or None

    @property
    def x402(self) -> X402Gateway | None:
        """The x402 gateway of the priced routes (None: no x402, 402s carry the JSON quote alone)."""
        return self.x402_host.gateway if self.x402_host is not None else None

    @property
    def model_host(self) -> ModelHost | None:
        """``host`` (the name routes used while ``host`` was untyped)."""
        return self.host

    def serving(self) -> ModelHost:
        """The model this node serves (routes call this once they have answered a node without one)."""
        if self.host is None:
            raise ApiError(404, "not_found", "this node serves no model")
        return self.host

    def principal(self, request: Request) -> Principal:
        p = self.authenticate(request.headers.get("authorization"))
        request.state.principal = p.name
        request.state.token_id = p.token_id
        return p

    def buyer(self, request: Request, paying: bool = True) -> Principal:
        """Who buys: the bearer's principal as :meth:`principal` says; with x402 on and no ``Authorization``,
        the wallet its ``PAYMENT-SIGNATURE`` names (a claim its settlement proves: a wallet buyer is served
        nothing it has not paid for) or, with none or when not ``paying`` (a lookup: an unproven claim must
        not see what is granted to that wallet), :data:`ANONYMOUS` (it may see public artifacts and their
        402s, nothing else)."""
        if self.x402 is None or request.headers.get("authorization") is not None:
            return self.principal(request)
        from ..payments.terms import PAYMENT_SIGNATURE_HEADER, wallet_principal
        from .x402 import claimed

        sig = request.headers.get(PAYMENT_SIGNATURE_HEADER) if paying else None
        name = ANONYMOUS
        if sig is not None:
            try:
                name = wallet_principal(claimed(sig)[0])
            except PaymentError as exc:
                raise ApiError(400, "payment_invalid", str(exc), extra={"reason": exc.reason}) from exc
        request.state.principal, request.state.token_id, request.state.x402_wallet = name, None, True
        return Principal(name)

    def account_holder(self, request: Request) -> str:
        """Whose account a read is of: the bearer's principal; with x402 on and no ``Authorization``, the
        wallet that signed the request's ``X-KVAgent-Wallet-Auth`` (kvagent.payments.signin: an EIP-191
        signature of the method, path and a time within its window)."""
        from ..payments.signin import WALLET_AUTH_HEADER, verify
        from ..payments.terms import wallet_principal

        signed = request.headers.get(WALLET_AUTH_HEADER)
        if self.x402 is None or request.headers.get("authorization") is not None or signed is None:
            return self.principal(request).name
        try:
            address = verify(signed, request.method, request.url.path)
        except ConfigError as exc:
            self.metrics.auth_failures.labels("wallet").inc()
            raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from exc
        request.state.principal, request.state.token_id = wallet_principal(address), None
        return wallet_principal(address)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; 401 for a missing, unknown, expired or revoked
        token (counted in ``kvagent_auth_failures_total`` by reason; logs name the token's id, never the
        token)."""
        try:
            p, reason, tid = self.tokens.check(authorization)
        except StoreError as exc:
            self.metrics.auth_failures.labels("unavailable").inc()
            log.warning("cannot check a bearer token: %s", exc)
            raise ApiError(503, "unavailable", "cannot check the token now: the database is unavailable",
                           {"Retry-After": "1"}) from exc
        if p is None:
            self.metrics.auth_failures.labels(reason).inc()
            if tid is not None:
                log.info("refused %s token %s", reason, tid)
            detail = {"expired": "the bearer token has expired", "revoked": "the bearer token was revoked"}
            raise ApiError(401, "unauthorized", detail.get(reason, "missing or invalid bearer token"),
                           {"WWW-Authenticate": "Bearer"})
        return p

    def known_principal(self, name: str) -> bool:
        """Whether an active token names ``name`` (the market credits only known principals)."""
        return self.tokens.known_principal(name)

    def visible(self, key: str, principal: Principal) -> ArtifactRow:
        validate_key(key)
        row = visible_row(self.meta, self.copies, key, principal.name)  # the caller's own copy included
        if row is None:
            raise not_found(key)
        return row

    def owned(self, key: str, principal: Principal) -> ArtifactRow:
        row = self.visible(key, principal)
        if row.owner != principal.name:
            raise ApiError(403, "forbidden", "only the artifact's owner may do this")
        return row



def handle(row: ArtifactRow) -> dict[str, Any]:
    return {
        "key": row.key,
        "header": json.loads(row.header_json),
        "size": row.size,
        "visibility": row.visibility,
        "owner": row.owner,
        "blob_url": f"/v1/artifacts/{row.key}/blob",
        "signature": json.loads(row.signature_json) if row.signature_json else None,
    }


def handle_json(row: ArtifactRow, **extra: Any) -> bytes:
    """``handle(row)`` (plus ``extra`` fields) as JSON bytes: the stored header and signature JSON are spliced
    in, not re-encoded (the lookup hot path)."""
    head = json.dumps({"key": row.key, "size": row.size, "visibility": row.visibility, "owner": row.owner,
                       "blob_url": f"/v1/artifacts/{row.key}/blob", **extra}, separators=(",", ":"))
    return f'{head[:-1]},"header":{row.header_json},"signature":{row.signature_json or "null"}}}'.encode()


def sized(settings: Settings, engine: Any) -> tuple[int, int]:
    """``max_batch`` and ``max_queue``: the settings' where given, else sized for ``engine``'s model on this
    machine (:mod:`kvagent.server.sizing`), logged."""
    from . import sizing

    batch = settings.max_batch
    if batch is None:
        available = sizing.available_memory(str(engine.device))
        per_token = engine.layout.bytes_per_token(engine.dtype)
        batch = sizing.default_max_batch(available, per_token, engine.max_positions)
        log.info("--max-batch %d: %.1f GiB available x %.2f / (%d KV bytes per token x %s positions), in "
                 "[%d, %d]", batch, available / 2**30, sizing.KV_FRACTION, per_token,
                 engine.max_positions or sizing.FALLBACK_CONTEXT, sizing.MIN_BATCH, sizing.MAX_BATCH)
    queue = settings.max_queue if settings.max_queue is not None else sizing.default_max_queue(batch)
    return batch, queue


def build_state(settings: Settings) -> State:
    """Open the data dir and database, clean up after crashes, and load the model (if any)."""
    from .x402_setup import open_x402

    x402_host = open_x402(settings)  # a bad or uninstalled --x402-* fails before anything is opened
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    bootstrap = read_token_file(settings.token_file) if settings.token_file else None
    meta = open_meta(data_dir, settings.postgres_dsn, migrate=settings.migrate)
    token_store = TokenStore(meta)
    if bootstrap is not None:
        report = token_store.import_tokens(bootstrap, f"token file {settings.token_file}")
        log.info("token file %s: %d added, %d updated, %d earlier file tokens not in it (still active), "
                 "%d weak",
                 settings.token_file, report.added, report.updated, len(report.absent), len(report.weak))
    tokens = TokenTable(token_store, ttl=settings.token_cache_s, stale_for=settings.token_stale_s)
    blobs = open_blobs(settings.blobs, data_dir)
    copies = OwnerCopies(meta)
    blobs.cleanup(lambda: [*meta.blob_names(), *copies.blob_names()], settings.orphan_grace_s)
    host = None
    if settings.model:
        from ..config import Config
        from ..plugins import load_engine_factory
        from .host import ModelHost, load_host_agent, model_path

        models_dir = Path(settings.models_dir) if settings.models_dir else Config.from_env().models_dir
        engine_factory = load_engine_factory(settings.engine)  # a bad engine fails before the model loads
        agent = load_host_agent(settings.model, models_dir, data_dir / "host-cache",
                                prompt_cache_bytes=settings.prompt_cache_bytes, **settings.host_options())
        max_batch, max_queue = sized(settings, agent.engine)
        host = ModelHost(agent, settings.model, settings.kv_cache_items, max_batch,
                         engine_factory, model_path(settings.model, models_dir), settings.prefill_chunk)
        settings = replace(settings, max_batch=max_batch, max_queue=max_queue)
        host.warm_up()  # before the server listens: its first decisions rest on measurements
        log.info("serving model %s in %s on the %s engine (fingerprint %s…)", settings.model,
                 str(host.engine.dtype).removeprefix("torch."), settings.engine, host.fingerprint[:16])
    from .ledger import open_ledger

    market = open_ledger(meta, settings.prices_file, settings.currency)
    metrics = Metrics()
    # the host's decisions, checked against their cost
    if host is not None and host.agent.resolver.cost is not None:
        host.agent.resolver.cost.observers.append(metrics.observe_outcome)
    return State(settings, tokens, meta, blobs, metrics, host, market, Quotas(meta), copies, token_store,
                 x402_host)
