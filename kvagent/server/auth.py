"""Bearer-token authentication: tokens are data in the registry's database, looked up through a short cache.

A token is stored only as its sha256 digest and a short display prefix (table ``auth_tokens``, made by the
migrations; kvagent.server.token_store writes it). Its id, ``tok_`` + 16 hex derived from the digest, is what
lists, logs and revocations name: never the token. Issued tokens are 256 random bits, so one sha256 is the
right hash (a slow password hash buys nothing against a brute force of 2^256 and would cost every request).
Token-file tokens are whatever an operator wrote: a bootstrap; :func:`weak_tokens` names (by id) those of
under :data:`MIN_BITS` bits, which the server warns about at start.

:class:`TokenTable` answers every request from a per-digest cache that lives ``ttl`` seconds (default 2 s,
``--token-cache-seconds``): a token issued on another node works here at once (an unknown digest asks the
database), and a revocation reaches every node within ``ttl``. Expiry is checked on every request. While
the database cannot be asked, an expired entry still answers for at most ``stale_for`` more seconds
(default ``ttl`` × :data:`STALE_FACTOR`, ``--token-stale-seconds``); after that the lookup fails closed
(StoreError, which the routes answer with 503), so a token revoked just before an outage stops working
on every node within ``ttl + stale_for``.

The JSON token file ``{"<token>": {"principal": "alice", "publish": true, "admin": false, "limits": {...}}}``
is imported into the database at start (see :meth:`TokenStore.import_tokens
<kvagent.server.token_store.TokenStore.import_tokens>`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, StoreError
from .quotas import Limits
from .settings import TOKEN_STALE_FACTOR as STALE_FACTOR

log = logging.getLogger("kvagent.server.auth")

_PRINCIPAL = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}\Z")
#: the cache holds at most this many digests (known and unknown); the older half goes when it is full
_CACHE_MAX = 16_384
#: a token-file token estimated weaker than this many bits is named (by id) in a warning at start
MIN_BITS = 128


@dataclass(frozen=True)
class Principal:
    name: str
    publish: bool = False
    admin: bool = False  # may credit accounts, read the market audit and manage tokens
    limits: Limits = field(default_factory=Limits)  # rate limits and quotas (kvagent.server.quotas)
    token_id: str | None = None  # the id of the token it authenticated with (for logs; never the token)


@dataclass(frozen=True)
class TokenRecord:
    """One stored token, as lists show it: everything but the token (which is not stored)."""

    id: str
    prefix: str
    principal: str
    publish: bool
    admin: bool
    limits: Limits
    source: str  # "file" (bootstrap import) or "api"
    created_at: float
    created_by: str | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None
    replaced_by: str | None = None

    def status(self, now: float | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at:
            return "expired"
        return "active"

    def principal_of(self) -> Principal:
        return Principal(self.principal, self.publish, self.admin, self.limits, self.id)

    def to_json(self) -> dict[str, Any]:
        limits = {k: v for k, v in self.limits.__dict__.items() if v is not None}
        return {"id": self.id, "prefix": self.prefix, "principal": self.principal, "publish": self.publish,
                "admin": self.admin, "limits": limits or None, "source": self.source,
                "created_at": self.created_at, "created_by": self.created_by, "expires_at": self.expires_at,
                "revoked_at": self.revoked_at, "revoked_by": self.revoked_by, "replaced_by": self.replaced_by,
                "status": self.status()}


def valid_principal_name(name: object) -> bool:
    return isinstance(name, str) and bool(_PRINCIPAL.match(name))


#: Principals named ``x402:...`` are wallets (kvagent.payments.wallet_principal): no token may name one, or
#: its holder could spend a wallet's deposits.
WALLET_PREFIX = "x402:"


def token_principal_name(name: object) -> bool:
    """Whether a token may name ``name``: a valid principal that is not a wallet's."""
    return valid_principal_name(name) and not str(name).startswith(WALLET_PREFIX)


def digest(token: str) -> str:
    """The sha256 hex digest a token is stored and looked up by."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_id(token_digest: str) -> str:
    """The public id of the token with this digest: the same on every node, and no help in guessing it."""
    return "tok_" + hashlib.sha256(b"kvagent-token-id:" + token_digest.encode()).hexdigest()[:16]


def display_prefix(token: str) -> str:
    """The first characters of a token, to recognise it in a list (none of a short, hand-written token)."""
    if token.startswith("kva_"):
        return token[:10]
    return token[:4] if len(token) >= 24 else ""


def estimated_bits(token: str) -> float:
    """An upper bound on a token's entropy: its length × log2 of the alphabet its character classes span
    (lowercase, uppercase, digits, punctuation, anything else). ``kva_`` tokens from ``new_token`` score
    ~300; a hand-written ``alice-token-0001`` scores ~98."""
    classes = ((string.ascii_lowercase, 26), (string.ascii_uppercase, 26), (string.digits, 10),
               (string.punctuation, len(string.punctuation)))
    alphabet = sum(n for chars, n in classes if any(c in chars for c in token))
    if any(not c.isascii() or c not in string.printable for c in token):
        alphabet += 1000  # outside ASCII: generous, as an upper bound should be
    return len(token) * math.log2(max(alphabet, 2))


def weak_tokens(tokens: Mapping[str, Principal], min_bits: float = MIN_BITS) -> list[tuple[str, str]]:
    """``(token id, principal)`` of each token of ``tokens`` estimated under ``min_bits`` bits (never the
    token itself)."""
    return [(token_id(digest(t)), p.name) for t, p in tokens.items() if estimated_bits(t) < min_bits]


def parse_token_file(raw: object, source: str = "tokens") -> dict[str, Principal]:
    """The token file's mapping ``{"<token>": {"principal", "publish", "admin", "limits"}}``, validated."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object mapping tokens to principals")
    out: dict[str, Principal] = {}
    for token, info in raw.items():
        if not isinstance(token, str) or len(token) < 8:
            raise ConfigError(f"{source}: tokens must be strings of at least 8 characters")
        if not isinstance(info, dict) or not token_principal_name(info.get("principal")):
            raise ConfigError(f"{source}: each token needs a 'principal' of [A-Za-z0-9_.@:-]{{1,128}}, not "
                              f"starting {WALLET_PREFIX} (wallets)")
        publish = info.get("publish", False)
        if not isinstance(publish, bool):
            raise ConfigError(f"{source}: 'publish' must be true or false")
        admin = info.get("admin", False)
        if not isinstance(admin, bool):
            raise ConfigError(f"{source}: 'admin' must be true or false")
        limits = Limits.from_mapping(info.get("limits"), source)
        out[token] = Principal(info["principal"], publish, admin, limits)
    return out


def read_token_file(path: Path) -> dict[str, Principal]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read token file {path}: {exc}") from exc
    return parse_token_file(raw, source=str(path))


class TokenSource(Protocol):
    """Where :class:`TokenTable` finds tokens: the database (TokenStore) or a fixed mapping."""

    def by_digest(self, token_digest: str) -> TokenRecord | None: ...

    def known_principal(self, name: str) -> bool: ...


class _Mapping:
    """A fixed set of tokens held in memory (tools and tests that run without a database)."""

    def __init__(self, tokens: Mapping[str, Principal]):
        self._records = {}
        for token, p in tokens.items():
            d = digest(token)
            self._records[d] = TokenRecord(token_id(d), display_prefix(token), p.name, p.publish, p.admin,
                                           p.limits, "file", 0.0)

    def by_digest(self, token_digest: str) -> TokenRecord | None:
        return self._records.get(token_digest)

    def known_principal(self, name: str) -> bool:
        return any(r.principal == name for r in self._records.values())


#: why an Authorization header was refused (the label of kvagent_auth_failures_total)
FAILURE_REASONS = ("missing", "malformed", "unknown", "expired", "revoked")


class TokenTable:
    """Maps bearer tokens to principals through a cache of ``ttl`` seconds in front of ``source``; while
    ``source`` raises StoreError, an expired entry answers ``stale_for`` seconds more (default ``ttl`` ×
    STALE_FACTOR), then the lookup raises."""

    def __init__(self, source: TokenSource, ttl: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, stale_for: float | None = None):
        self.source, self.ttl, self.clock, self.wall = source, float(ttl), clock, wall
        self.stale_for = self.ttl * STALE_FACTOR if stale_for is None else float(stale_for)
        # digest -> (record or None, its principal, fresh until (clock))
        self._cache: dict[str, tuple[TokenRecord | None, Principal | None, float]] = {}
        self._lock = threading.Lock()
        self._stale_warned = 0.0

    @classmethod
    def from_mapping(cls, raw: object, source: str = "tokens") -> TokenTable:
        """A table of the tokens of a token-file mapping, held in memory (no database)."""
        return cls(_Mapping(parse_token_file(raw, source)))

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        return cls(_Mapping(read_token_file(path)))

    # -- the request path -----------------------------------------------------------------------
    def check(self, authorization: str | None) -> tuple[Principal | None, str, str | None]:
        """``(principal, "ok", token id)`` for a valid ``Authorization: Bearer <token>`` value, else
        ``(None, reason, token id or None)`` with a reason of :data:`FAILURE_REASONS`.

        Raises StoreError when the database cannot be asked and no answer for this token is cached, or the
        cached one expired more than ``stale_for`` seconds ago."""
        if not authorization:
            return None, "missing", None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, "malformed", None
        rec, principal = self._entry(digest(token))
        if rec is None:
            return None, "unknown", None
        if rec.revoked_at is not None:
            return None, "revoked", rec.id
        if rec.expires_at is not None and self.wall() >= rec.expires_at:
            return None, "expired", rec.id
        return principal, "ok", rec.id

    def lookup(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer <token>`` header value, or None."""
        return self.check(authorization)[0]

    def is_cached(self, authorization: str | None) -> bool:
        """Whether :meth:`lookup` would answer without asking the database (so it may run on the event
        loop)."""
        if not authorization:
            return True
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return True
        e = self._cache.get(digest(token))
        return e is not None and e[2] > self.clock()

    def _entry(self, d: str) -> tuple[TokenRecord | None, Principal | None]:
        now = self.clock()
        e = self._cache.get(d)
        if e is not None and e[2] > now:
            return e[0], e[1]
        try:
            rec = self.source.by_digest(d)
        except StoreError:
            # a database outage: the last answer stands for stale_for seconds past its expiry, then no more
            # (the lookup may have waited out a pool timeout: the clock is read again)
            now = self.clock()
            if e is None or now >= e[2] + self.stale_for:
                raise
            if now - self._stale_warned > 30:
                self._stale_warned = now
                log.warning("token lookups answered from the cache (for at most %.3g s past their expiry): "
                            "the database is unavailable", self.stale_for)
            return e[0], e[1]
        principal = rec.principal_of() if rec is not None else None
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                for k in list(self._cache)[: _CACHE_MAX // 2]:
                    self._cache.pop(k, None)
            self._cache.pop(d, None)
            self._cache[d] = (rec, principal, now + self.ttl)
        return rec, principal

    def forget(self) -> None:
        """Drop the cache (after this node changed tokens: it sees its own change at once)."""
        with self._lock:
            self._cache.clear()

    def known_principal(self, name: str) -> bool:
        """Whether an active (unrevoked, unexpired) token names ``name`` (e.g. before crediting it)."""
        return self.source.known_principal(name)
