"""Bearer-token authentication from a JSON token file ``{"<token>": {"principal": "alice", "publish": true}}``
(``"admin": true`` lets a principal credit accounts).

Tokens are kept only as sha256 digests in memory, so a lookup does not compare secrets byte by byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .quotas import Limits

_PRINCIPAL = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}\Z")


@dataclass(frozen=True)
class Principal:
    name: str
    publish: bool = False
    admin: bool = False  # may credit accounts and read the market audit
    limits: Limits = field(default_factory=Limits)  # rate limits and quotas (kvagent.server.quotas)


def valid_principal_name(name: object) -> bool:
    return isinstance(name, str) and bool(_PRINCIPAL.match(name))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenTable:
    """Maps bearer tokens to principals."""

    def __init__(self, tokens: dict[str, Principal]):
        self._by_digest = {_digest(t): p for t, p in tokens.items()}
        self._principals = frozenset(p.name for p in tokens.values())

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read token file {path}: {exc}") from exc
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: object, source: str = "tokens") -> TokenTable:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object mapping tokens to principals")
        out: dict[str, Principal] = {}
        for token, info in raw.items():
            if not isinstance(token, str) or len(token) < 8:
                raise ConfigError(f"{source}: tokens must be strings of at least 8 characters")
            if not isinstance(info, dict) or not valid_principal_name(info.get("principal")):
                raise ConfigError(f"{source}: each token needs a 'principal' of [A-Za-z0-9_.@:-]{{1,128}}")
            publish = info.get("publish", False)
            if not isinstance(publish, bool):
                raise ConfigError(f"{source}: 'publish' must be true or false")
            admin = info.get("admin", False)
            if not isinstance(admin, bool):
                raise ConfigError(f"{source}: 'admin' must be true or false")
            limits = Limits.from_mapping(info.get("limits"), source)
            out[token] = Principal(info["principal"], publish, admin, limits)
        return cls(out)

    def knows(self, principal: str) -> bool:
        """Whether some token names ``principal`` (the market credits only principals that can spend)."""
        return principal in self._principals

    def resolve(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization: Bearer <token>`` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(_digest(token.strip()))
