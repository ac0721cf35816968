"""``kvagent db`` (schema versions) and ``kvagent token`` (bearer tokens) for operators.

Both talk to the registry's database directly, as ``kvagent serve`` does: ``--postgres-dsn DSN``, or the
server's ``--data-dir DIR`` for SQLite. ``kvagent token`` can bootstrap the first admin token of an empty
deployment; afterwards an admin may use the admin API (``/v1/admin/tokens``) from anywhere instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, KVAgentError, StoreError
from . import schema

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DSN_ENV = "KVAGENT_POSTGRES_DSN"


def parse_expiry(value: str | None, now: float | None = None) -> float | None:
    """``--expires``: a duration (``90m``, ``12h``, ``30d``, ``2w``), an ISO-8601 time (UTC unless it says),
    unix seconds, or ``never``; returns unix seconds or None."""
    if value is None or value.strip().lower() == "never":
        return None
    v = value.strip()
    now = time.time() if now is None else now
    m = _DURATION.match(v)
    if m:
        return now + float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"--expires {value!r}: expected 30d, 12h, an ISO-8601 time or unix seconds"
        ) from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postgres-dsn", default=os.environ.get(DSN_ENV),
                   help=f"the registry's PostgreSQL (default: {DSN_ENV})")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="the registry's data dir (SQLite: DIR/meta.sqlite3)"
    )


def _database(args: argparse.Namespace, must_exist: bool) -> schema.Database:
    db = schema.Database.of(args.data_dir, args.postgres_dsn)
    if must_exist and db.sqlite_path is not None and not db.sqlite_path.exists():
        raise StoreError(f"no registry database at {db.sqlite_path} (wrong --data-dir?)")
    return db


# -- kvagent db -------------------------------------------------------------------------------------
def db_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvagent db", description="Schema versions of the registry's database.")
    sub = ap.add_subparsers(dest="action", required=True)
    up = sub.add_parser("upgrade", help="migrate the database to this kvagent's newest schema (under a lock)")
    up.add_argument("revision", nargs="?", default="head")
    _db_options(up)
    cur = sub.add_parser("current", help="the database's schema version")
    _db_options(cur)
    cur.add_argument("--json", action="store_true")
    hist = sub.add_parser("history", help="every schema version this kvagent knows, oldest first")
    hist.add_argument("--json", action="store_true")
    return ap


def db_main(argv: Sequence[str]) -> int:
    args = db_parser().parse_args(list(argv))
    try:
        if args.action == "history":
            revs = schema.history()
            if args.json:
                print(json.dumps([r.__dict__ for r in revs]))
            for r in [] if args.json else revs:
                print(f"{r.revision}{' (head)' if r.revision == revs[-1].revision else ''}  {r.doc}")
        elif args.action == "current":
            version = schema.current(_database(args, must_exist=True))
            head = schema.head()
            if args.json:
                print(json.dumps({"version": version, "head": head, "current": version == head}))
            elif version is None:
                print(f"none (not under migrations; `kvagent db upgrade` brings it to {head})")
            else:
                print(f"{version} (head)" if version == head else f"{version} (behind {head})")
        else:
            before, after = schema.upgrade(_database(args, must_exist=False), args.revision)
            print(f"already at {after}" if before == after else f"upgraded {before or 'nothing'} -> {after}")
    except KVAgentError as exc:
        print(f"kvagent db: {exc}", file=sys.stderr)
        return 2
    return 0


# -- kvagent token ----------------------------------------------------------------------------------
def token_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvagent token", description="Bearer tokens in the registry's database "
                                 "(stored as digests; a token is shown once, when issued).")
    sub = ap.add_subparsers(dest="action", required=True)
    iss = sub.add_parser("issue", help="issue a token for PRINCIPAL (printed once)")
    iss.add_argument("principal")
    iss.add_argument("--publish", action="store_true", help="may publish artifacts")
    iss.add_argument(
        "--admin", action="store_true", help="may credit accounts, read the audit, manage tokens"
    )
    iss.add_argument(
        "--expires", default=None, help="30d, 12h, an ISO-8601 time, unix seconds or never (default)"
    )
    iss.add_argument("--limits", default=None, help='JSON limits as in the token file, e.g. \'{"rps": 20}\'')
    iss.add_argument("--json", action="store_true", help='print {"token": ..., "id": ..., ...}')
    ls = sub.add_parser("ls", help="list tokens (never the tokens themselves)")
    ls.add_argument("--principal", default=None)
    ls.add_argument("--all", action="store_true", help="revoked and expired ones too")
    ls.add_argument("--json", action="store_true")
    rev = sub.add_parser("revoke", help="revoke token ID (tok_...) or every token of PRINCIPAL (a name that "
                         "is no token's id; --principal for any name)")
    rev.add_argument("target", metavar="PRINCIPAL|ID")
    rev.add_argument("--principal", action="store_true",
                     help="TARGET is a principal's name, even one that looks like (or is) a token id")
    rev.add_argument("--json", action="store_true")
    rot = sub.add_parser("rotate", help="issue a token like ID and revoke ID (printed once)")
    rot.add_argument("id")
    rot.add_argument("--json", action="store_true")
    for p in (iss, ls, rev, rot):
        _db_options(p)
    return ap


def token_main(argv: Sequence[str]) -> int:
    args = token_parser().parse_args(list(argv))
    try:
        return _token(args)
    except KVAgentError as exc:
        print(f"kvagent token: {exc}", file=sys.stderr)
        return 2


def _token(args: argparse.Namespace) -> int:
    from .meta import PostgresMeta, SQLiteMeta
    from .quotas import Limits
    from .token_store import TokenStore

    db = _database(args, must_exist=True)
    meta = (PostgresMeta(db.postgres_dsn, max_size=2, migrate=False) if db.postgres_dsn
            else SQLiteMeta(db.sqlite_path, migrate=False) if db.sqlite_path else None)
    assert meta is not None
    try:
        store = TokenStore(meta)
        if args.action == "issue":
            try:
                raw = json.loads(args.limits) if args.limits else None
            except ValueError as exc:
                raise ConfigError(f"--limits is not JSON: {exc}") from exc
            issued = store.issue(
                args.principal,
                publish=args.publish,
                admin=args.admin,
                limits=Limits.from_mapping(raw, "--limits"),
                expires_at=parse_expiry(args.expires),
                created_by="cli",
            )
            _print_issued(issued, args.json)
        elif args.action == "rotate":
            new = store.rotate(args.id, by="cli")
            if new is None:
                raise ConfigError(f"no active token {args.id}")
            _print_issued(new, args.json)
        elif args.action == "ls":
            rows = store.list_tokens(args.principal, include_inactive=args.all)
            if args.json:
                print(json.dumps([r.to_json() for r in rows]))
            for r in [] if args.json else rows:
                exp = "never" if r.expires_at is None else _iso(r.expires_at)
                rights = ",".join(n for n, on in (("publish", r.publish), ("admin", r.admin)) if on) or "read"
                print(f"{r.id}  {(r.prefix + '…') if r.prefix else '-':13}  {r.principal:20}  {rights:13}  "
                      f"{r.status():8}  expires {exp}  ({r.source})")
        else:
            gone = (store.revoke_principal(args.target, by="cli") if args.principal
                    else store.revoke(args.target, by="cli"))
            if args.json:
                print(json.dumps({"revoked": [r.to_json() for r in gone]}))
            elif not gone:
                print(f"nothing to revoke: no active token of {args.target}", file=sys.stderr)
                return 1
            for r in [] if args.json else gone:
                print(f"revoked {r.id} ({r.principal})")
    finally:
        meta.close()
    return 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_issued(issued: object, as_json: bool) -> None:
    from .token_store import Issued

    assert isinstance(issued, Issued)
    if as_json:
        print(json.dumps(issued.to_json()))
        return
    print(issued.token)
    r = issued.record
    print(f"{r.id} for {r.principal} (publish={r.publish}, admin={r.admin}, expires "
          f"{'never' if r.expires_at is None else _iso(r.expires_at)}); the token is shown only now",
          file=sys.stderr)
