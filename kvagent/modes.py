"""Modes spelled as strings, typed: how a fetched KV is verified (:class:`Verify`), whether computed KV is
published and to whom (:class:`Publish`), where an answer is decoded (:class:`AskMode`). A leaf: everything
may import it.

Each is a ``str`` subclass (Python 3.10 has no ``enum.StrEnum``): a member equals its value, hashes as it,
prints as it and is written to JSON as it, so code and files that use the strings keep working.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["AskMode", "Publish", "StrMode", "Verify"]

M = TypeVar("M", bound="StrMode")


class StrMode(str, Enum):
    """A mode that is its string value."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def of(cls: type[M], value: Any, what: str) -> M:
        """``value`` (a member or its string) as a member; anything else is a ConfigError naming ``what``
        and the values it takes."""
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ConfigError(f"{what} must be one of {list(cls.choices())}, got {value!r}")


class Verify(StrMode):
    """How a KV from elsewhere (the registry) is checked against its tokens before use: not at all, a sample
    of positions recomputed, or the whole prompt recomputed."""

    NONE = "none"
    SAMPLE = "sample"
    FULL = "full"


class Publish(StrMode):
    """Whether KV computed here is published to the registry, and with which visibility: not at all, to the
    principals granted it (``restricted``), or to everyone (``public``). The older spellings are accepted:
    ``False`` (and None) for ``none``, ``True`` for ``restricted``."""

    NONE = "none"
    RESTRICTED = "restricted"
    PUBLIC = "public"

    @classmethod
    def of(cls, value: Any, what: str = "publish") -> Publish:
        if value is None or value is False:
            return cls.NONE
        if value is True:
            return cls.RESTRICTED
        if isinstance(value, str) and value in cls.choices():
            return cls(value)
        raise ConfigError(
            f"{what} must be one of {list(cls.choices())} (or False for 'none', True for 'restricted'), "
            f"got {value!r}"
        )

    @property
    def visibility(self) -> str | None:
        """The visibility published artifacts get ("restricted" or "public"), None when nothing is."""
        return None if self is Publish.NONE else self.value


class AskMode(StrMode):
    """Where an answer is decoded: ``auto`` lets the cost policy choose, ``local`` always decodes here,
    ``remote`` asks the registry to generate from its copy (falling back to local decoding)."""

    AUTO = "auto"
    LOCAL = "local"
    REMOTE = "remote"
