"""Options are declared once (``kvagent.options``): Config declares the SDK's, the server's Settings declares
only its own, and every setting it shares with Config (as ResolverSettings' all) derives from Config's
declaration: its default, variable, parser and doc. (The vLLM connector's ConnectorSettings is checked the
same way in integrations/vllm/tests/test_settings.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvagent.config import ALIASES, Config
from kvagent.options import Option, options_of
from kvagent.reuse.resolver import ResolverSettings
from kvagent.server.__main__ import build_parser
from kvagent.server.settings import X402_OPTIONS, Settings

CLASSES = (Config, Settings, ResolverSettings)
#: kvagent serve's flags that are no Settings option: where it listens, its processes, its connections
SERVE_OWN_FLAGS = {"-h", "--help", "--host", "--port", "--workers", "--header-timeout", "--body-timeout",
                   "--keep-alive", "--max-connections", "--max-header-bytes", "--log-level"}


def _config_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for opt in options_of(Config).values():
        if opt.env:
            monkeypatch.delenv(opt.env, raising=False)


def _declaration_problems(*classes: type) -> list[str]:
    """Where ``classes`` (Config first) declare an option twice: a name or a variable declared in two places,
    a record reused, or a setting Config has (by its name or alias) that is not derived from Config's."""
    problems: list[str] = []
    declared: dict[int, str] = {}  # id(declaration) -> where
    names: dict[str, str] = {}
    variables: dict[str, str] = {}
    config = options_of(Config)
    config_names = {**{n: n for n in config}, **ALIASES}  # also ``token``, Config's alias of registry_token
    for cls in classes:
        for name, opt in options_of(cls).items():  # a field without an Option record raises here
            where = f"{cls.__name__}.{name}"
            if opt.of is None:
                if id(opt) in declared:
                    problems.append(f"{where} reuses {declared[id(opt)]}'s record")
                declared[id(opt)] = where
                if name in names:
                    problems.append(f"{where} declares the option {names[name]} declares")
                names.setdefault(name, where)
                if opt.env is not None and opt.env in variables:
                    problems.append(f"{where} reads {opt.env}, as {variables[opt.env]} does")
                variables.setdefault(opt.env or "", where)
            elif opt.env is not None or opt.declaration not in config.values():
                problems.append(f"{where} derives from no Config option, or reads a variable itself")
            base = config_names.get(name) if cls is not Config else None
            if base is not None and opt.declaration is not config[base]:
                problems.append(f"{where} is Config's option {base!r}: derive it, don't copy it")
    return problems


def test_every_option_is_declared_once_and_shared_ones_derive_from_config() -> None:
    assert _declaration_problems(*CLASSES) == []
    assert all(o.of is not None for o in options_of(ResolverSettings).values())  # all are Config's
    assert all(o.env is None for cls in CLASSES[1:] for o in options_of(cls).values())  # Config reads them


def test_a_copy_of_a_config_option_is_caught() -> None:
    """The check fails for a class that declares a Config setting again instead of deriving it, and for a
    field that is no option at all."""

    @dataclasses.dataclass(frozen=True)
    class Copied:
        block_size: int = Option(256, doc="tokens per hashed block").field()
        token: str | None = Option(None, env="KVAGENT_REGISTRY_TOKEN").field()
        cache_items: int = options_of(Config)["memory_slots"].field()  # Config's record as a declaration

    assert _declaration_problems(Config, Copied) == [
        "Copied.block_size declares the option Config.block_size declares",
        "Copied.block_size is Config's option 'block_size': derive it, don't copy it",
        "Copied.token reads KVAGENT_REGISTRY_TOKEN, as Config.registry_token does",
        "Copied.token is Config's option 'registry_token': derive it, don't copy it",
        "Copied.cache_items reuses Config.memory_slots's record",
        "Copied.cache_items reads KVAGENT_MEMORY_SLOTS, as Config.memory_slots does",
    ]
    with pytest.raises(TypeError, match="not an option"):
        options_of(dataclasses.make_dataclass("Plain", [("block_size", int, dataclasses.field(default=256))]))


def test_the_server_and_the_resolver_see_configs_defaults(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """Left unset, a shared option has Config's value wherever it is read: the same default, or None that
    the server's host resolves through Config (its variable, then its default)."""
    _config_variables(monkeypatch)
    defaults = Config.from_env(cache_dir=tmp_path)
    config = options_of(Config)
    server = Settings(tmp_path, None)
    for obj in (server, ResolverSettings()):
        for name, opt in options_of(type(obj)).items():
            base = next(n for n, o in config.items() if o is opt.declaration) if opt.of else None
            value = getattr(obj, name)
            if base is None or value is None:  # the server's own, or "the Config's"
                continue
            expected = getattr(defaults, base)
            where = f"{type(obj).__name__}.{name}"
            assert value == (expected if expected is not None else type(value)()), where
    assert server.block_size == defaults.block_size and server.kv_cache_items == defaults.memory_slots
    options = server.host_options()
    assert set(options) == {"memory_slots", "calibrate_at_start", "dtype"}
    host = Config.from_env(cache_dir=tmp_path, **options)
    for name in options:
        assert getattr(host, name) == getattr(defaults, name), name
    # and a variable reaches the host as it reaches an SDK agent
    monkeypatch.setenv("KVAGENT_DTYPE", "bfloat16")
    monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
    host = Config.from_env(cache_dir=tmp_path, **options)
    assert (host.dtype, host.calibrate_at_start) == ("bfloat16", False)


def test_serve_flags_are_the_settings_options() -> None:
    """``kvagent serve``'s flags are generated from Settings' options: each flag's default and help are its
    option's, its value lands in the field, and no Settings flag is added by hand."""
    actions = {s: a for a in build_parser()._actions for s in a.option_strings}
    settings = {opt.flag: (name, opt) for name, opt in options_of(Settings).items() if opt.flag}
    assert set(actions) == SERVE_OWN_FLAGS | set(settings)
    for flag, (name, opt) in settings.items():
        action = actions[flag]
        assert (action.dest, action.help) == (name, opt.doc), flag
        assert action.default == opt.default_value() or action.required, flag
    assert actions["--models-dir"].help == options_of(Config)["models_dir"].doc  # a derived option's doc
    assert actions["--kv-cache-items"].default == Config().memory_slots
    assert [f for f, _n, _h in X402_OPTIONS] == [f for f in settings if f.startswith("--x402-")]
    args = build_parser().parse_args(["--data-dir", "d", "--no-migrate", "--presign-expiry", "60",
                                      "--prices", "p.json", "--token-cache-seconds", "1.5"])
    from kvagent.server.__main__ import settings_from_args

    s = settings_from_args(args)
    assert (s.migrate, s.presign_expiry_s, s.prices_file, s.token_cache_s) == (False, 60, Path("p.json"), 1.5)
