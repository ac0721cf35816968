"""Per-owner records: no existence oracle through publish.

A key is the content address of a document under a model, so two principals may publish it independently.
The first publisher holds the key's row in ``artifacts``. A later publisher who *cannot see* that row (it is
restricted and not granted to them) must not learn that it exists, so instead of "taken" it gets its own
record here — its own blob, visibility, grants and prefix index — answered exactly as a fresh publish.
Lookups, prefix lookups, blob downloads, generate, grant and delete find the caller's own record the same
way (see :func:`visible`). A later publisher who *can* see the first row still gets 409 (nothing is hidden).

Tables (made by the migrations, kvagent.server.schema): ``owner_copies`` (one row per key and owner),
``owner_copy_blocks`` (their prefix index) and ``owner_copy_grants`` (their entitlements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .meta import ArtifactRow, MetaStore

_COLS = "key, owner, visibility, size, payload_sha256, header, signature, blob, created_at"
# a copy is visible to its owner, to everyone when public, and to the principals its owner granted
_VISIBLE = ("(c.owner = ? OR c.visibility = 'public' OR EXISTS (SELECT 1 FROM owner_copy_grants g "
            "WHERE g.key = c.key AND g.owner = c.owner AND g.principal = ?))")


class OwnerCopies:
    """The per-owner records of keys whose first row another principal holds."""

    def __init__(self, meta: MetaStore):
        self.meta = meta

    def _one(self, sql: str, params: Sequence[Any]) -> ArtifactRow | None:
        with self.meta.read() as cur:
            cur.execute(self.meta.q(sql), tuple(params))
            r = cur.fetchone()
        return ArtifactRow(*r) if r else None

    def get(self, key: str, owner: str) -> ArtifactRow | None:
        return self._one(f"SELECT {_COLS} FROM owner_copies WHERE key = ? AND owner = ?", (key, owner))

    def visible(self, key: str, principal: str) -> ArtifactRow | None:
        """The caller's own copy of ``key``, else the oldest copy it may see, else None."""
        cols = ", ".join(f"c.{c.strip()}" for c in _COLS.split(","))
        return self._one(
            f"SELECT {cols} FROM owner_copies c WHERE c.key = ? AND {_VISIBLE} "
            "ORDER BY CASE WHEN c.owner = ? THEN 0 ELSE 1 END, c.created_at, c.owner LIMIT 1",
            (key, principal, principal, principal),
        )

    def insert(self, row: ArtifactRow, block_hashes: Sequence[str]) -> ArtifactRow | None:
        """Insert ``row`` and its prefix index; returns the owner's existing copy instead if it has one."""
        q = self.meta.q
        with self.meta.transaction() as cur:
            cur.execute(q(f"INSERT INTO owner_copies ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?) "
                          "ON CONFLICT (key, owner) DO NOTHING"),
                        (row.key, row.owner, row.visibility, row.size, row.payload_sha256, row.header_json,
                         row.signature_json, row.blob, row.created_at))
            if cur.rowcount != 1:
                cur.execute(
                    q(f"SELECT {_COLS} FROM owner_copies WHERE key = ? AND owner = ?"), (row.key, row.owner)
                )
                r = cur.fetchone()
                return ArtifactRow(*r) if r else row
            if block_hashes:
                cur.executemany(q("INSERT INTO owner_copy_blocks (hash, key, owner, idx) VALUES (?,?,?,?) "
                                  "ON CONFLICT DO NOTHING"),
                                [(h, row.key, row.owner, i) for i, h in enumerate(block_hashes)])
        return None

    def delete(self, key: str, owner: str) -> ArtifactRow | None:
        q = self.meta.q
        with self.meta.transaction() as cur:
            cur.execute(q(f"SELECT {_COLS} FROM owner_copies WHERE key = ? AND owner = ?"), (key, owner))
            r = cur.fetchone()
            if r is None:
                return None
            for table in ("owner_copy_blocks", "owner_copy_grants", "owner_copies"):
                cur.execute(q(f"DELETE FROM {table} WHERE key = ? AND owner = ?"), (key, owner))
        return ArtifactRow(*r)

    def grant(self, key: str, owner: str, principal: str) -> None:
        with self.meta.transaction() as cur:
            cur.execute(self.meta.q("INSERT INTO owner_copy_grants (key, owner, principal) VALUES (?,?,?) "
                                    "ON CONFLICT DO NOTHING"), (key, owner, principal))

    def longest_prefix(self, block_hashes: Sequence[str], principal: str) -> tuple[ArtifactRow, int] | None:
        """The visible copy sharing the most leading blocks with ``block_hashes`` and how many."""
        if not block_hashes:
            return None
        pos = {h: i for i, h in reversed(list(enumerate(block_hashes)))}
        marks = ",".join("?" * len(pos))
        sql = (f"SELECT b.hash, b.key, b.owner, b.idx FROM owner_copy_blocks b JOIN owner_copies c "
               f"ON c.key = b.key AND c.owner = b.owner WHERE b.hash IN ({marks}) AND {_VISIBLE}")
        with self.meta.read() as cur:
            cur.execute(self.meta.q(sql), (*pos, principal, principal))
            rows = cur.fetchall()
        best: tuple[int, str, str] | None = None
        for h, key, owner, idx in rows:
            if pos[h] != idx:  # a chained hash commits to its position
                continue
            cand = (idx + 1, key, owner)
            if best is None or cand[0] > best[0] or (cand[0] == best[0] and (key, owner) < best[1:]):
                best = cand
        if best is None:
            return None
        row = self.get(best[1], best[2])
        return (row, best[0]) if row is not None else None

    def blob_names(self) -> list[str]:
        with self.meta.read() as cur:
            cur.execute("SELECT blob FROM owner_copies")
            return [r[0] for r in cur.fetchall()]


def visible_row(meta: MetaStore, copies: OwnerCopies, key: str, principal: str) -> ArtifactRow | None:
    """The row of ``key`` that ``principal`` sees: the first publisher's if visible to it, else a copy.

    Asks the same questions whether the key is missing or hidden, and reads the full row only once it is
    visible, so a hidden key and a missing one cost the same time.
    """
    access = meta.access(key)
    entitled = meta.is_entitled(key, principal)  # asked even for a missing row (timing)
    first_visible = access is not None and (access[0] == principal or access[1] == "public" or entitled)
    row = meta.get(key) if first_visible else None  # None also when deleted in between
    if row is not None and row.owner == principal:
        return row
    copy = copies.visible(key, principal)
    if copy is not None and copy.owner == principal:  # the caller's own record wins (it may delete it)
        return copy
    return row if row is not None else copy


def delete_owned(meta: MetaStore, copies: OwnerCopies, key: str, owner: str) -> ArtifactRow | None:
    """Delete ``owner``'s record of ``key`` (the first row or its copy); returns the deleted row."""
    first = meta.get(key)
    if first is not None and first.owner == owner:
        return meta.delete(key)
    return copies.delete(key, owner)


def grant_owned(meta: MetaStore, copies: OwnerCopies, key: str, owner: str, principal: str) -> None:
    """Let ``principal`` see ``owner``'s record of ``key`` (never another owner's record of it)."""
    first = meta.get(key)
    if first is not None and first.owner == owner:
        meta.grant(key, principal)
    else:
        copies.grant(key, owner, principal)


def longest_prefix(meta: MetaStore, copies: OwnerCopies, block_hashes: Sequence[str],
                   principal: str) -> tuple[ArtifactRow, int] | None:
    """The visible record (first rows and copies alike) sharing the most leading blocks; both are always
    asked."""
    found = meta.longest_prefix(block_hashes, principal)
    first = meta.get(found[0]) if found else None
    copy = copies.longest_prefix(block_hashes, principal)
    if first is not None and found is not None and (copy is None or found[1] >= copy[1]):
        return first, found[1]
    return copy
