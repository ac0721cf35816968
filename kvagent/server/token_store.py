"""The ``auth_tokens`` table: issue, list, rotate, revoke and import bearer tokens (only digests are stored).

Used by the admin API (kvagent.server.admin_routes), by ``kvagent token`` and, at start, to import the JSON
token file. A token's plaintext exists only in the answer to the call that issued it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .auth import Principal, TokenRecord, digest, display_prefix, token_id, valid_principal_name
from .meta import MetaStore, PostgresMeta
from .quotas import Limits

log = logging.getLogger("kvagent.server.auth")

#: pg_advisory_xact_lock id serialising token-file imports of nodes starting together
IMPORT_LOCK_ID = 7463532
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
    revoked: list[str]  # ids of file tokens no longer in the file, revoked now


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
        if not valid_principal_name(principal):
            raise ConfigError(f"principal must match [A-Za-z0-9_.@:-]{{1,128}}, got {principal!r}")
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
        """Revoke the token with id ``target`` (``tok_…``), else every active token of principal ``target``;
        returns the tokens revoked now (empty: nothing matched, or all were revoked already)."""
        now = self.clock()
        col = "id" if target.startswith("tok_") else "principal"
        with self.meta.transaction() as cur:
            cur.execute(
                self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE {col} = ? AND revoked_at IS NULL"),
                (target,),
            )
            hits = [_record(r) for r in cur.fetchall()]
            cur.execute(self.meta.q(f"UPDATE auth_tokens SET revoked_at = ?, revoked_by = ? WHERE {col} = ? "
                                    "AND revoked_at IS NULL"), (now, by, target))
        for r in hits:
            log.info("token %s of %s revoked by %s", r.id, r.principal, by)
        return [TokenRecord(**{**r.__dict__, "revoked_at": now, "revoked_by": by}) for r in hits]

    def rotate(self, tid: str, by: str | None = None) -> Issued | None:
        """Issue a token like ``tid`` (principal, rights, limits, expiry) and revoke ``tid``, in one
        transaction; None when ``tid`` is unknown or not active."""
        now = self.clock()
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q(f"SELECT {_COLS} FROM auth_tokens WHERE id = ?"), (tid,))
            r = cur.fetchone()
            old = _record(r) if r else None
            if old is None or old.status(now) != "active":
                return None
            new = self._insert(cur, old.principal, old.publish, old.admin, old.limits, old.expires_at, by)
            cur.execute(self.meta.q("UPDATE auth_tokens SET revoked_at = ?, revoked_by = ?, replaced_by = ? "
                                    "WHERE id = ? AND revoked_at IS NULL"), (now, by, new.record.id, tid))
        log.info("token %s of %s rotated by %s: replaced by %s", tid, old.principal, by, new.record.id)
        return new

    def import_tokens(self, tokens: Mapping[str, Principal], source: str = "token file") -> ImportReport:
        """Bring the table in line with a token file: its tokens are added (or their principal, rights and
        limits updated to the file's), and earlier file tokens no longer in it are revoked, so the file
        keeps its meaning. A token revoked in the database stays revoked (a restart never revives it)."""
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
            gone = [r for d, r in earlier.items() if d not in digests and r.revoked_at is None]
            for r in gone:
                cur.execute(q("UPDATE auth_tokens SET revoked_at = ?, revoked_by = ? WHERE id = ? "
                              "AND revoked_at IS NULL"), (now, "token-file", r.id))
        for tid in kept:
            log.warning("%s: token %s is revoked in the database and stays revoked; remove it from the file",
                        source, tid)
        for r in gone:
            log.info("%s: token %s of %s is no longer in the file: revoked", source, r.id, r.principal)
        return ImportReport(added, updated, kept, [r.id for r in gone])
