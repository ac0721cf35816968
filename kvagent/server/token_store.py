"""The ``auth_tokens`` table: issue, list, rotate, revoke and import bearer tokens (only digests are stored).

Used by the admin API (kvagent.server.admin_routes), by ``kvagent token`` and, at start, to import the JSON
token file. A token's plaintext exists only in the answer to the call that issued it.

Rotation and revocation lock what they change (on PostgreSQL ``SELECT … FOR UPDATE`` of the rows, and an
advisory lock per principal so that a revocation of a principal and a rotation of one of its tokens run one
after the other; SQLite's ``BEGIN IMMEDIATE`` serialises every write) and check each UPDATE's row count: a
rotation racing a revocation or another rotation never leaves two live tokens, and a revocation of a
principal also takes the successor of a rotation that committed while it waited.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, StoreError
from .auth import (
    MIN_BITS,
    Principal,
    TokenRecord,
    digest,
    display_prefix,
    token_id,
    token_principal_name,
    weak_tokens,
)
from .meta import MetaStore, PostgresMeta
from .quotas import Limits

log = logging.getLogger("kvagent.server.auth")

#: pg_advisory_xact_lock id serialising token-file imports of nodes starting together
IMPORT_LOCK_ID = 7463532
#: pg_advisory_xact_lock(id, hashtext(principal)) serialising rotations and revocations of one principal
PRINCIPAL_LOCK_ID = 7463533
_COLS = (
    "id, prefix, principal, publish, admin, limits, source, created_at, created_by, expires_at, revoked_at, "
    "revoked_by, replaced_by"
)


@dataclass(frozen=True)
class Issued:
    """A token just issued: the plaintext (shown this once) and its stored record."""

    token: str
    record: TokenRecord

    def to_json(self) -> dict[str, Any]:
        return {"token": self.token, **self.record.to_json()}


@dataclass(frozen=True)
class ImportReport:
    added: int
    updated: int
    kept_revoked: list[str]  # ids of file tokens that stay revoked (revoked in the database earlier)
    absent: list[str]  # ids of active file tokens this file does not name (left active: revoke explicitly)
    weak: list[str]  # ids of this file's tokens estimated under auth.MIN_BITS bits


def new_token() -> str:
    """A fresh token: ``kva_`` + 256 random bits (url-safe base64)."""
    return "kva_" + secrets.token_urlsafe(32)


def _limits_json(limits: Limits) -> str | None:
    raw = {k: v for k, v in limits.__dict__.items() if v is not None}
    return json.dumps(raw, sort_keys=True) if raw else None


def _record(r: Any) -> TokenRecord:
    limits = Limits.from_mapping(json.loads(r[5]), "auth_tokens") if r[5] else Limits()
    return TokenRecord(
        r[0],
        r[1],
        r[2],
        bool(r[3]),
        bool(r[4]),
        limits,
        r[6],
        float(r[7]),
        r[8],
        None if r[9] is None else float(r[9]),
        None if r[10] is None else float(r[10]),
        r[11],
        r[12],
    )


class TokenStore:
    """Bearer tokens in ``meta``'s database (the table the migrations made)."""

    def __init__(self, meta: MetaStore, clock: Any = time.time):
        self.meta, self.clock = meta, clock
        #: appended to a SELECT that locks the rows it reads (SQLite has no row locks: BEGIN IMMEDIATE already
        #: serialises every write transaction)
        self._for_update = " FOR UPDATE" if isinstance(meta, PostgresMeta) else ""

    # -- reads ----------------------------------------------------------------------------------
    def by_digest(self, token_digest: str) -> TokenRecord | None:
        with self.meta.read() as cur:
            cur.execute(self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE digest = ?"), (token_digest,))
            r = cur.fetchone()
        return _record(r) if r else None

    def get(self, tid: str) -> TokenRecord | None:
        with self.meta.read() as cur:
            cur.execute(self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE id = ?"), (tid,))
            r = cur.fetchone()
        return _record(r) if r else None

    def list_tokens(self, principal: str | None = None, include_inactive: bool = False) -> list[TokenRecord]:
        """Tokens (of ``principal``), oldest first; active ones only unless ``include_inactive``."""
        sql, params = f"SELECT {_COLS} FROM auth_tokens", []
        if principal is not None:
            sql, params = sql + " WHERE principal = ?", [principal]
        with self.meta.read() as cur:
            cur.execute(self.meta.q(sql + " ORDER BY created_at, id"), params)
            out = [_record(r) for r in cur.fetchall()]
        now = self.clock()
        return out if include_inactive else [r for r in out if r.status(now) == "active"]

    def known_principal(self, name: str) -> bool:
        """Whether an active (unrevoked, unexpired) token names ``name``."""
        with self.meta.read() as cur:
            cur.execute(
                self.meta.q(
                    "SELECT 1 FROM auth_tokens WHERE principal = ? AND revoked_at IS NULL "
                    "AND (expires_at IS NULL OR expires_at > ?) LIMIT 1"
                ),
                (name, self.clock()),
            )
            return cur.fetchone() is not None

    # -- changes --------------------------------------------------------------------------------
    def issue(
        self,
        principal: str,
        *,
        publish: bool = False,
        admin: bool = False,
        limits: Limits | None = None,
        expires_at: float | None = None,
        created_by: str | None = None,
    ) -> Issued:
        """A new token for ``principal`` (returned once, in clear; only its digest is stored)."""
        if not token_principal_name(principal):
            raise ConfigError(f"principal must match [A-Za-z0-9_.@:-]{{1,128}} and not start x402: (a "
                              f"wallet's), got {principal!r}")
        if expires_at is not None and expires_at <= self.clock():
            raise ConfigError("expires_at is in the past")
        with self.meta.transaction() as cur:
            issued = self._insert(cur, principal, publish, admin, limits or Limits(), expires_at, created_by)
        log.info("token %s issued for %s by %s (publish=%s admin=%s expires_at=%s)", issued.record.id,
                 principal, created_by, publish, admin, expires_at)
        return issued

    def _insert(self, cur: Any, principal: str, publish: bool, admin: bool, limits: Limits,
                expires_at: float | None, created_by: str | None) -> Issued:
        token = new_token()
        d = digest(token)
        rec = TokenRecord(token_id(d), display_prefix(token), principal, publish, admin, limits, "api",
                          self.clock(), created_by, expires_at)
        cur.execute(
            self.meta.q(f"INSERT INTO auth_tokens (digest, {_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"),
            (
                d,
                rec.id,
                rec.prefix,
                principal,
                int(publish),
                int(admin),
                _limits_json(limits),
                "api",
                rec.created_at,
                created_by,
                expires_at,
                None,
                None,
                None,
            ),
        )
        return Issued(token, rec)

    def revoke(self, target: str, by: str | None = None) -> list[TokenRecord]:
        """Revoke the token with id ``target`` when there is one, else every active token of the principal
        named ``target`` (any name, ``tok_…`` ones included); returns the tokens revoked now."""
        if self.get(target) is not None:
            return self.revoke_id(target, by)
        return self.revoke_principal(target, by)

    def revoke_id(self, tid: str, by: str | None = None) -> list[TokenRecord]:
        """Revoke token ``tid``; returns it (empty: unknown, or revoked already)."""
        return self._revoke("id", tid, by)

    def revoke_principal(self, name: str, by: str | None = None) -> list[TokenRecord]:
        """Revoke every active token of principal ``name``; returns the tokens revoked now."""
        return self._revoke("principal", name, by)

    def _revoke(self, col: str, value: str, by: str | None) -> list[TokenRecord]:
        now = self.clock()
        with self.meta.transaction() as cur:
            if col == "principal":
                self._lock_principal(cur, value)  # a rotation of one of its tokens commits first, or waits
            cur.execute(self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE {col} = ? AND revoked_at IS NULL "
                                    f"ORDER BY id{self._for_update}"), (value,))
            hits = [_record(r) for r in cur.fetchall()]
            for r in hits:
                cur.execute(self.meta.q("UPDATE auth_tokens SET revoked_at = ?, revoked_by = ? "
                                        "WHERE id = ? AND revoked_at IS NULL"), (now, by, r.id))
                if cur.rowcount != 1:  # cannot happen under the lock; if it did, nothing is revoked
                    raise StoreError(f"token {r.id} changed while it was locked; nothing was revoked")
        for r in hits:
            log.info("token %s of %s revoked by %s", r.id, r.principal, by)
        return [TokenRecord(**{**r.__dict__, "revoked_at": now, "revoked_by": by}) for r in hits]

    def _lock_principal(self, cur: Any, name: str) -> None:
        """Serialise this transaction with every rotation and revocation of principal ``name``'s tokens
        (PostgreSQL: an advisory lock until commit; SQLite's BEGIN IMMEDIATE serialises all writes already).
        Row locks alone would let a revocation of the principal miss the successor a rotation inserts."""
        if self._for_update:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (PRINCIPAL_LOCK_ID, name))

    def rotate(self, tid: str, by: str | None = None) -> Issued | None:
        """Issue a token like ``tid`` (principal, rights, limits, expiry) and revoke ``tid``, in one
        transaction that holds ``tid``'s row lock and its principal's lock; None when ``tid`` is unknown or
        not active (a concurrent rotation or revocation won)."""
        now = self.clock()
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("SELECT principal FROM auth_tokens WHERE id = ?"), (tid,))
            row = cur.fetchone()
            if row is None:
                return None
            self._lock_principal(cur, row[0])
            cur.execute(self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE id = ?{self._for_update}"),
                        (tid,))
            old = _record(cur.fetchone())
            if old.status(now) != "active":
                return None
            if old.principal != row[0]:  # a token-file import moved it meanwhile: the lock was another's
                raise StoreError(f"token {tid} changed principal while it was rotated; try again")
            new = self._insert(cur, old.principal, old.publish, old.admin, old.limits, old.expires_at, by)
            cur.execute(self.meta.q("UPDATE auth_tokens SET revoked_at = ?, revoked_by = ?, replaced_by = ? "
                                    "WHERE id = ? AND revoked_at IS NULL"), (now, by, new.record.id, tid))
            if cur.rowcount != 1:  # cannot happen under the lock; if it did, the successor is rolled back
                raise StoreError(f"token {tid} changed while it was locked; it was not rotated")
        log.info("token %s of %s rotated by %s: replaced by %s", tid, old.principal, by, new.record.id)
        return new

    def import_tokens(self, tokens: Mapping[str, Principal], source: str = "token file") -> ImportReport:
        """Import a token file: its tokens are added (or their principal, rights and limits set to the
        file's). An import only ever adds: a file token the file no longer names stays active (listed in
        ``absent`` and logged), because a node started with an older file must never revoke, for good, what
        a newer file added; revoking is an explicit act (``kvagent token revoke tok_…``). A token revoked in
        the database stays revoked (a restart never revives it). Each of the file's tokens estimated under
        auth.MIN_BITS bits is named, by id, in a warning: file tokens are a bootstrap."""
        digests = {digest(t): (t, p) for t, p in tokens.items()}
        now = self.clock()
        added = updated = 0
        kept: list[str] = []
        q = self.meta.q
        with self.meta.transaction() as cur:
            if isinstance(self.meta, PostgresMeta):  # nodes starting together import one at a time
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (IMPORT_LOCK_ID,))
            cur.execute(f"SELECT digest, {_COLS} FROM auth_tokens WHERE source = 'file'")
            earlier = {r[0]: _record(r[1:]) for r in cur.fetchall()}
            for d, (token, p) in digests.items():
                cur.execute(q("SELECT revoked_at, id FROM auth_tokens WHERE digest = ?"), (d,))
                row = cur.fetchone()
                args = (p.name, int(p.publish), int(p.admin), _limits_json(p.limits))
                if row is None:
                    cur.execute(
                        q(
                            f"INSERT INTO auth_tokens (digest, {_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                            "ON CONFLICT DO NOTHING"
                        ),
                        (
                            d,
                            token_id(d),
                            display_prefix(token),
                            *args,
                            "file",
                            now,
                            "token-file",
                            None,
                            None,
                            None,
                            None,
                        ),
                    )
                    added += cur.rowcount == 1
                elif row[0] is not None:
                    kept.append(str(row[1]))
                else:
                    cur.execute(q("UPDATE auth_tokens SET principal = ?, publish = ?, admin = ?, limits = ? "
                                  "WHERE digest = ?"), (*args, d))
                    updated += 1
            absent = [r for d, r in earlier.items() if d not in digests and r.revoked_at is None]
        for tid in kept:
            log.warning("%s: token %s is revoked in the database and stays revoked; remove it from the file",
                        source, tid)
        for r in absent:
            log.info("%s: file token %s of %s is not in this file and stays active (an import never revokes; "
                     "`kvagent token revoke %s` does)", source, r.id, r.principal, r.id)
        weak = weak_tokens(tokens)
        for tid, name in weak:
            log.warning("%s: token %s of %s has under %d bits of entropy: file tokens are a bootstrap; "
                        "issue real ones with `kvagent token issue` and revoke this one", source, tid, name,
                        MIN_BITS)
        return ImportReport(added, updated, kept, [r.id for r in absent], [tid for tid, _ in weak])
