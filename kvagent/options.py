"""Options declared once: each is a dataclass field whose metadata holds its :class:`Option` record.

An option is declared in one class, with its default, its KVAGENT_* variable, how to read that variable,
its doc and (for a command) its flag; its name is the field's and its type the field's annotation. Every
other class that takes the same setting *derives* its field from that declaration (``Option.derive``), so
the SDK's :class:`~kvagent.config.Config`, the server's ``Settings``, the vLLM connector's
``ConnectorSettings`` and the resolver's ``ResolverSettings`` never copy a default or a variable name.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Base:
    ...     size: int = declare(256, env="KVAGENT_SIZE", doc="tokens per block")
    >>> @dataclass(frozen=True)
    ... class Other:
    ...     size: int = derive(Base, "size")
    >>> Other().size, option_of(Other, "size").of is option_of(Base, "size")
    (256, True)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

#: ``derive``'s default: keep the declaration's default
SAME: Any = object()


@dataclass(frozen=True, eq=False)
class Option:
    """One option: its default (or ``factory``), its environment variable and how to read it (``parse(name,
    raw)``), its doc, and its command-line flag with ``choices`` and ``metavar``. ``of``: the declaration a
    derived option takes its meaning from (None: this is the declaration). ``secret``: kept out of repr."""

    default: Any = dc_field(default_factory=lambda: MISSING)  # MISSING: required
    factory: Callable[[], Any] | None = None
    env: str | None = None
    parse: Callable[[str, str], Any] | None = None
    doc: str = ""
    flag: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    secret: bool = False
    of: Option | None = None

    @property
    def declaration(self) -> Option:
        """The option this one is, or derives from."""
        return self.of.declaration if self.of is not None else self

    @property
    def required(self) -> bool:
        return self.default is MISSING and self.factory is None

    def default_value(self) -> Any:
        """The default (a fresh one from ``factory``)."""
        return self.factory() if self.factory is not None else self.default

    def field(self) -> Any:
        """This option as a dataclass field (its record in the field's metadata)."""
        meta = {"option": self}
        if self.factory is not None:
            return dc_field(default_factory=self.factory, metadata=meta, repr=not self.secret)
        return dc_field(default=self.default, metadata=meta, repr=not self.secret)

    def derive(self, default: Any = SAME, *, factory: Callable[[], Any] | None = None, doc: str | None = None,
               flag: str | None = None, choices: Sequence[str] | None = None,
               metavar: str | None = None) -> Option:
        """The same setting in another class: the declaration's default unless ``default`` (or ``factory``)
        is given (None there usually means "the declaration's value, resolved where it is read"). A derived
        option reads no variable of its own: the declaring class reads it."""
        if default is SAME and factory is None:
            default, factory = self.default, self.factory
        return Option(default=MISSING if default is SAME else default, factory=factory, env=None,
                      parse=self.parse, doc=self.doc if doc is None else doc, flag=flag, choices=choices,
                      metavar=metavar, secret=self.secret, of=self)


def declare(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, env: str | None = None,
            parse: Callable[[str, str], Any] | None = None, doc: str = "", flag: str | None = None,
            choices: Sequence[str] | None = None, metavar: str | None = None, secret: bool = False) -> Any:
    """A field that declares an option (see :class:`Option`)."""
    return Option(default, factory, env, parse, doc, flag, choices, metavar, secret).field()


def derive(owner: type, name: str, default: Any = SAME, **how: Any) -> Any:
    """A field that takes ``owner``'s option ``name`` (see :meth:`Option.derive`)."""
    return option_of(owner, name).derive(default, **how).field()


def option_field(f: Field[Any]) -> Option:
    """The option record of a dataclass field; a field without one was not declared here."""
    opt = f.metadata.get("option")
    if not isinstance(opt, Option):
        raise TypeError(f"field {f.name!r} is not an option: declare it with kvagent.options")
    return opt


def options_of(cls: type) -> dict[str, Option]:
    """``cls``'s options by field name, in declaration order."""
    return {f.name: option_field(f) for f in fields(cls)}


def option_of(cls: type, name: str) -> Option:
    """``cls``'s option ``name``."""
    return options_of(cls)[name]


def option_name(cls: type, opt: Option) -> str:
    """The name ``cls`` gives the declaration ``opt`` (a derived option may rename it)."""
    return next(n for n, o in options_of(cls).items() if o is opt)


# -- command-line flags ---------------------------------------------------------------------------
def _flag_type(annotation: Any) -> Callable[[str], Any]:
    """What argparse converts a flag's value with, from the field's annotation (a string under
    ``from __future__ import annotations``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for name, kind in (("Path", Path), ("int", int), ("float", float)):
        if text == name or text.startswith(f"{name} ") or text.endswith(f" {name}"):
            return kind
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """A flag for each of ``cls``'s options that has one, in declaration order: its default, type (from the
    annotation), choices and help are the option's; a ``--no-*`` flag turns the option off."""
    for f in fields(cls):
        opt = option_field(f)
        if opt.flag is None:
            continue
        how: dict[str, Any] = {"dest": f.name, "help": opt.doc or None}
        if opt.flag.startswith("--no-"):
            how.update(action="store_false", default=opt.default_value())
        else:
            kind = _flag_type(f.type)
            how.update(required=True) if opt.required else how.update(default=opt.default_value())
            if kind is not str:
                how["type"] = kind
            if opt.choices is not None:
                how["choices"] = opt.choices
            # the value's name in --help is the flag's, whatever the field is called
            spelled = opt.flag.lstrip("-").replace("-", "_")
            if opt.metavar is not None or (spelled != f.name and opt.choices is None):
                how["metavar"] = opt.metavar or spelled.upper()
        parser.add_argument(opt.flag, **how)


def from_arguments(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s flagged options in ``args`` (parsed with :func:`add_arguments`), by field
    name: ``cls(**from_arguments(args, cls))``."""
    return {name: getattr(args, name) for name, opt in options_of(cls).items() if opt.flag is not None}
