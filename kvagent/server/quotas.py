"""Per-principal rate limits and quotas, kept in the metadata database so they hold across server processes.

Configured per token in the token file (``"limits": {"rps": 20, "upload_bytes_per_day": ..., "stored_bytes":
..., "concurrent_generates": 2}``; a limit left out is unlimited):

* ``rps`` — authenticated requests per one-second window (fixed windows: a burst at a window edge may
  reach twice the rate for an instant). Over it: 429 ``rate_limited``, ``Retry-After`` to the next window.
* ``upload_bytes_per_day`` — bytes received by publish per UTC day (failed uploads count too). Over it:
  429 ``upload_quota``, ``Retry-After`` to the next UTC midnight.
* ``concurrent_generates`` — generations streaming at once; a lease expires after ``LEASE_SECONDS`` if its
  process died. Over it: 429 ``too_many_generates``, ``Retry-After: 1``.
* ``stored_bytes`` — total size of the artifacts a principal owns (its own records of others' keys too).
Over it: 413 ``storage_quota``: it does
  not clear with time, so it is final (not retried) until the owner deletes artifacts.

Every check is one short transaction; a principal without limits costs no database work.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, KVAgentError
from .http import ApiError, authorization_of, error_response
from .meta import MetaStore

DAY = 86_400
LEASE_SECONDS = 600.0
_KEEP_WINDOWS = 120  # rate windows older than this many seconds are swept


@dataclass(frozen=True)
class Limits:
    """One principal's limits; None means unlimited."""

    rps: int | None = None
    upload_bytes_per_day: int | None = None
    stored_bytes: int | None = None
    concurrent_generates: int | None = None

    @classmethod
    def from_mapping(cls, raw: object, source: str = "tokens") -> Limits:
        """Parse a token's ``"limits"`` object: positive integers (``null`` or absent: unlimited)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: 'limits' must be a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"{source}: unknown limits {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        for name, value in raw.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(
                    f"{source}: limit {name!r} must be a positive integer or null, got {value!r}"
                )
        return cls(**dict(raw))

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rps, self.upload_bytes_per_day, self.stored_bytes,
                                           self.concurrent_generates))


def retry_after_window(now: float) -> int:
    """Whole seconds until the next one-second window (at least 1, as Retry-After is whole seconds)."""
    return max(1, math.ceil(math.floor(now) + 1 - now))


def retry_after_day(now: float) -> int:
    """Whole seconds until the next UTC midnight."""
    return max(1, math.ceil((math.floor(now / DAY) + 1) * DAY - now))


def too_many(code: str, detail: str, retry_after: int) -> ApiError:
    return ApiError(429, code, detail, {"Retry-After": str(retry_after)})


class Quotas:
    """Checks and charges limits in ``meta``'s database; ``clock`` is injectable for tests."""

    def __init__(self, meta: MetaStore, clock: Callable[[], float] = time.time):
        self.meta, self.clock = meta, clock

    # -- requests per second ----------------------------------------------------------------
    def hit(self, principal: str, limits: Limits) -> None:
        """Count one request; raise 429 when this window already holds ``limits.rps`` of them."""
        if limits.rps is None:
            return
        now = self.clock()
        win = math.floor(now)
        q = self.meta.q
        with self.meta.transaction() as cur:
            cur.execute(
                q(
                    "INSERT INTO quota_rate (principal, win, n) VALUES (?,?,1) "
                    "ON CONFLICT (principal, win) DO UPDATE SET n = quota_rate.n + 1"
                ),
                (principal, win),
            )
            cur.execute(q("SELECT n FROM quota_rate WHERE principal = ? AND win = ?"), (principal, win))
            n = int(cur.fetchone()[0])
            if win % 16 == 0:
                cur.execute(q("DELETE FROM quota_rate WHERE win < ?"), (win - _KEEP_WINDOWS,))
        if n > limits.rps:
            raise too_many("rate_limited", f"more than {limits.rps} requests per second",
                           retry_after_window(now))

    # -- uploads ---------------------------------------------------------------------------
    def uploaded_today(self, principal: str) -> int:
        day = math.floor(self.clock() / DAY)
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q("SELECT bytes FROM quota_upload WHERE principal = ? AND day = ?"),
                (principal, day),
            )
            r = cur.fetchone()
        return int(r[0]) if r else 0

    def check_upload(self, principal: str, limits: Limits, used: int, incoming: int) -> None:
        """Raise 429 if ``used`` (uploaded today before this request) + ``incoming`` exceeds the daily
        quota."""
        cap = limits.upload_bytes_per_day
        if cap is not None and used + incoming > cap:
            raise too_many("upload_quota", f"uploads are limited to {cap} bytes per UTC day",
                           retry_after_day(self.clock()))

    def charge_upload(self, principal: str, limits: Limits, n_bytes: int) -> None:
        """Add ``n_bytes`` to today's upload total (only tracked for principals with a daily quota)."""
        if limits.upload_bytes_per_day is None or n_bytes <= 0:
            return
        day = math.floor(self.clock() / DAY)
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q(
                    "INSERT INTO quota_upload (principal, day, bytes) VALUES (?,?,?) "
                    "ON CONFLICT (principal, day) DO UPDATE SET bytes = quota_upload.bytes + ?"
                ),
                (principal, day, n_bytes, n_bytes),
            )
            cur.execute(
                self.meta.q("DELETE FROM quota_upload WHERE principal = ? AND day < ?"), (principal, day - 7)
            )

    # -- stored bytes -----------------------------------------------------------------------
    def check_storage(self, principal: str, limits: Limits, adding: int) -> None:
        """Raise 413 if the artifacts ``principal`` owns plus ``adding`` bytes exceed its storage quota."""
        cap = limits.stored_bytes
        if cap is None:
            return
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("SELECT (SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE owner = ?) + "
                                    "(SELECT COALESCE(SUM(size), 0) FROM owner_copies WHERE owner = ?)"),
                        (principal, principal))
            stored = int(cur.fetchone()[0])
        if stored + adding > cap:
            raise ApiError(
                413,
                "storage_quota",
                f"storing {adding} more bytes would exceed your {cap}-byte quota ({stored} stored); "
                "delete artifacts first",
            )

    # -- concurrent generates ---------------------------------------------------------------
    def acquire(self, principal: str, limits: Limits, kind: str = "generate") -> str | None:
        """Take one of ``principal``'s concurrent ``kind`` slots; returns the lease id (None when
        unlimited)."""
        cap = limits.concurrent_generates
        if cap is None:
            return None
        now = self.clock()
        lease = uuid.uuid4().hex
        q = self.meta.q
        with self.meta.transaction() as cur:
            # lock the principal's row first, so concurrent acquires (other processes too) count one at a time
            cur.execute(q("INSERT INTO quota_locks (principal, touched) VALUES (?,?) "
                          "ON CONFLICT (principal) DO UPDATE SET touched = ?"), (principal, now, now))
            cur.execute(q("DELETE FROM quota_leases WHERE principal = ? AND expires < ?"), (principal, now))
            cur.execute(
                q("SELECT COUNT(*) FROM quota_leases WHERE principal = ? AND kind = ?"), (principal, kind)
            )
            held = int(cur.fetchone()[0])
            if held < cap:
                cur.execute(q("INSERT INTO quota_leases (id, principal, kind, expires) VALUES (?,?,?,?)"),
                            (lease, principal, kind, now + LEASE_SECONDS))
        if held >= cap:
            raise too_many("too_many_generates", f"at most {cap} concurrent generations per principal", 1)
        return lease

    def release(self, lease: str | None) -> None:
        if lease is None:
            return
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("DELETE FROM quota_leases WHERE id = ?"), (lease,))


class UploadMeter:
    """Counts one upload's bytes against the principal's daily quota: ``add`` per chunk, ``charge`` at the
    end."""

    def __init__(self, quotas: Quotas, principal: str, limits: Limits, declared: int | None):
        self.quotas, self.principal, self.limits = quotas, principal, limits
        self.used = quotas.uploaded_today(principal) if limits.upload_bytes_per_day is not None else 0
        self.received = 0
        quotas.check_upload(principal, limits, self.used, declared or 0)

    def add(self, n: int) -> None:
        self.received += n
        self.quotas.check_upload(self.principal, self.limits, self.used, self.received)

    def charge(self) -> None:
        self.quotas.charge_upload(self.principal, self.limits, self.received)


class RateLimit:
    """Pure ASGI middleware: counts every authenticated request against its principal's ``rps`` limit.

    ``cached(authorization)`` says whether ``lookup`` can answer without the database; when it cannot, the
    lookup runs in a worker thread, never on the event loop (None: every lookup is cheap enough inline)."""

    def __init__(self, app: Any, lookup: Callable[[str | None], Any], quotas: Quotas,
                 cached: Callable[[str | None], bool] | None = None):
        self.app, self.lookup, self.quotas, self.cached = app, lookup, quotas, cached

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            auth = authorization_of(scope)
            p = None
            if auth:
                from starlette.concurrency import run_in_threadpool

                try:
                    p = (self.lookup(auth) if self.cached is None or self.cached(auth)
                         else await run_in_threadpool(self.lookup, auth))
                except KVAgentError:  # the route's own authentication answers it (503)
                    p = None
            if p is not None and p.limits.rps is not None:
                from starlette.concurrency import run_in_threadpool

                try:
                    await run_in_threadpool(self.quotas.hit, p.name, p.limits)
                except ApiError as exc:
                    await error_response(exc.status, exc.code, exc.detail, exc.headers)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
