"""The connector's extra config is checked once: unknown keys and wrong types are errors, never dropped.
Runs without vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvagent import ConfigError

from vllm_kvagent import ConnectorSettings, namespace_of
from vllm_kvagent.settings import engine_policy


def test_defaults_reuse_without_a_registry_and_publish_nothing() -> None:
    s = ConnectorSettings.from_extra(None)
    assert (s.registry_url, s.publish, s.engines, s.min_save_tokens, s.price, s.salted_reads) == (
        None,
        "none",
        None,  # by vLLM's dtype: engine_policy
        256,
        None,
        "own",
    )


@pytest.mark.parametrize(("given", "publish"), [
    ("none", "none"), (False, "none"), ("restricted", "restricted"), (True, "restricted"),
    ("public", "public"),
])
def test_publish_is_spelled_as_config_spells_it(tmp_path: Path, given: object, publish: str) -> None:
    """One spelling across the connector and kvagent's Config: a Publish, its strings, or False / True."""
    from kvagent import Config, Publish, Verify

    registry = {"registry_url": "http://a"} if publish != "none" else {}
    extra = {"publish": given, "verify": "full", **registry}
    s = ConnectorSettings.from_extra(extra)
    assert isinstance(s.publish, Publish) and s.publish == publish
    assert s.publish is Config.from_env(cache_dir=tmp_path, publish=given).publish
    assert s.verify is Verify.FULL


def test_a_list_of_registry_urls_is_a_failover_list() -> None:
    s = ConnectorSettings.from_extra({"registry_url": ["http://a:1", "http://b:2"], "publish": "public"})
    assert s.registry_url == "http://a:1,http://b:2"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"registry": "http://a"}, "unknown kv_connector_extra_config keys \\['registry'\\]"),
        ({"price": 1.5, "publish": "public", "registry_url": "http://a"}, "price"),
        ({"max_price_per_load": -1}, "max_price_per_load"),
        ({"budget": True}, "budget"),
        ({"publish": "everyone"}, "publish must be one of"),
        ({"publish": "public"}, "needs a registry_url"),
        ({"price": 10}, "set publish too"),
        ({"engines": "all"}, "engines must be one of"),
        ({"verify": "some"}, "verify must be"),
        ({"token": 123}, "token"),
        ({"calibration": "yes"}, "calibration"),
        ({"salted_reads": "all"}, "salted_reads must be one of"),
        ({"salted_reads": 1}, "salted_reads"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(extra: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ConnectorSettings.from_extra(extra)


def test_a_cache_salt_is_a_private_namespace_and_no_salt_is_the_shared_one() -> None:
    assert namespace_of(None) is None and namespace_of("") is None
    assert namespace_of("tenant-a") == "vllm-cache-salt:tenant-a" != namespace_of("tenant-b")


class _Resolver:
    """Answers per namespace: ``hits[namespace]`` tokens cached (0: a miss), recording every call."""

    def __init__(self, hits: dict[str | None, int]) -> None:
        self.hits = hits
        self.calls: list[tuple[str | None, object]] = []

    def resolve(self, ids: tuple[int, ...], *, namespace: str | None = None, **kw: object) -> object:
        from types import SimpleNamespace

        self.calls.append((namespace, kw.get("registry", "default")))
        n = self.hits.get(namespace, 0)
        kv = SimpleNamespace(n_tokens=n) if n else None
        info = SimpleNamespace(origin=f"key-{namespace}", source="registry" if namespace is None else "store",
                               reason=f"{'hit' if n else 'miss'} in {namespace}")
        return SimpleNamespace(kv=kv, info=info, key=f"key-{namespace}")


def _lookups(hits: dict[str | None, int], shared: bool) -> tuple[object, _Resolver]:
    from types import SimpleNamespace

    from vllm_kvagent.lookup import PrefixLookups

    resolver = _Resolver(hits)
    lookups = PrefixLookups(SimpleNamespace(resolver=resolver), engine="vllm x", same_engine_only=False,  # type: ignore[arg-type]
                            shared_reads=shared)
    lookups._engine_of = lambda key: None  # type: ignore[method-assign]
    return lookups, resolver


def test_a_salted_request_reads_the_registry_only_with_shared_reads() -> None:
    ids = tuple(range(600))
    own_only, r1 = _lookups({None: 512}, shared=False)
    assert own_only.find(ids, "ns").n == 0  # type: ignore[attr-defined]
    assert r1.calls == [("ns", None)]  # its own namespace, never the registry
    shared, r2 = _lookups({None: 512}, shared=True)
    m = shared.find(ids, "ns")  # type: ignore[attr-defined]
    assert (m.n, m.key, m.source) == (512, "key-None", "registry")
    assert r2.calls == [("ns", None), (None, "default")]
    longer_own, _ = _lookups({"ns": 512, None: 256}, shared=True)
    assert longer_own.find(ids, "ns").key == "key-ns"  # type: ignore[attr-defined]
    unsalted, r3 = _lookups({None: 512}, shared=False)
    assert unsalted.find(ids, None).n == 512 and r3.calls == [(None, "default")]  # type: ignore[attr-defined]


def test_the_engine_of_a_hit_is_read_from_its_header_and_same_refuses_others() -> None:
    """engines="same" asks the store for the hit's header alone (no second read, checksum and decode of the
    artifact per lookup); a hit another engine computed is refused with the reason."""
    from types import SimpleNamespace

    from vllm_kvagent.lookup import PrefixLookups

    asked: list[str] = []

    def header(key: str) -> object:
        asked.append(key)
        return SimpleNamespace(engine="transformers 5.19") if key == "key-None" else None

    agent = SimpleNamespace(resolver=_Resolver({None: 512}), store=SimpleNamespace(header=header))
    same = PrefixLookups(agent, engine="vllm x", same_engine_only=True)  # type: ignore[arg-type]
    m = same.find(tuple(range(600)), None)
    assert (m.n, m.engine) == (0, "transformers 5.19") and "not vllm x" in m.reason
    anyone = PrefixLookups(agent, engine="vllm x", same_engine_only=False)  # type: ignore[arg-type]
    assert anyone.find(tuple(range(600)), None).n == 512
    assert asked == ["key-None", "key-None"]
    gone = PrefixLookups(SimpleNamespace(resolver=_Resolver({"ns": 256}), store=agent.store),  # type: ignore[arg-type]
                         engine="vllm x", same_engine_only=False)
    m = gone._find(tuple(range(600)), "ns")  # its header is gone: the lookup failed, so a miss
    assert m.n == 0 and "not in the local store" in m.reason


def test_the_vllm_engine_runs_in_the_dtype_the_host_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KVAGENT_DTYPE=bfloat16 kvagent serve --engine vllm``: the host's model loads in bf16 and vLLM's
    engine args say bf16 (before, the host ignored the setting: vLLM ran float32)."""
    from kvagent import EngineContext
    from kvagent.server.host import load_host_agent

    from tests.conftest import save_tiny_llama
    from vllm_kvagent.engine import engine_args

    model_dir = save_tiny_llama(tmp_path / "model", seed=1)
    monkeypatch.setenv("KVAGENT_DTYPE", "bfloat16")
    monkeypatch.setenv("KVAGENT_CALIBRATE_AT_START", "0")
    runtime = load_host_agent(str(model_dir), tmp_path / "models", tmp_path / "cache")
    try:
        args = engine_args(EngineContext(runtime, model_dir, 4, None))
        assert args["dtype"] == "bfloat16" and args["max_num_seqs"] == 4
    finally:
        runtime.close()


def test_engines_default_keeps_engines_apart_in_half_precision_only() -> None:
    """Another engine's KV gives vLLM's greedy replies bit for bit in float32 only (docs/deploy.md)."""
    assert engine_policy(None, "float32") == "any"
    assert engine_policy(None, "bfloat16") == engine_policy(None, "float16") == "same"
    assert engine_policy("any", "bfloat16") == "any" and engine_policy("same", "float32") == "same"


def test_x402_wallet_is_a_key_file_or_the_environment() -> None:
    assets = "eip155:31337/0x" + "ab" * 20
    s = ConnectorSettings.from_extra({"registry_url": "http://a:1", "wallet": "/keys/w.key",
                                      "max_price_per_load": 9, "wallet_assets": assets})
    assert (s.wallet, s.max_price_per_load, s.wallet_assets) == ("/keys/w.key", 9, assets)
    assert ConnectorSettings.from_extra({"wallet": True}).wallet is True
    for bad in ({"wallet": 3}, {"wallet_assets": ["eip155:1/0x00"]}):
        with pytest.raises(ConfigError):
            ConnectorSettings.from_extra(bad)


def test_every_setting_shared_with_config_derives_from_its_declaration() -> None:
    """The connector declares only its own options; a setting kvagent's Config has (under its name or alias)
    is derived from Config's declaration, reads no variable itself, and never copies its default."""
    from kvagent import Config, options_of

    config = options_of(Config)
    shared = {**{n: n for n in config}, "token": "registry_token"}  # token: Config's alias too
    own = set()
    for name, opt in options_of(ConnectorSettings).items():  # a field without an Option record raises
        if name in shared:
            assert opt.of is not None and opt.declaration is config[shared[name]], name
        if opt.of is None:
            own.add(name)
        else:
            assert opt.env is None and opt.declaration in config.values(), name
    assert own == {"price", "min_save_tokens", "engines", "prefill_tokens_per_s", "bandwidth_bytes_per_s",
                   "salted_reads"}


def test_the_connectors_agent_sees_configs_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Left unset, a shared option is Config's: the same default, or None (and calibration's True) that the
    connector's agent resolves through Config, so a KVAGENT_* variable reaches it too."""
    from kvagent import Config, options_of

    for opt in options_of(Config).values():
        if opt.env:
            monkeypatch.delenv(opt.env, raising=False)
    monkeypatch.setenv("KVAGENT_CACHE_DIR", str(tmp_path))
    defaults, s = Config.from_env(), ConnectorSettings.from_extra(None)
    assert s.publish is defaults.publish  # a default kept, not resolved later
    options = s.config_options()
    assert set(options) == {"cache_dir", "registry_url", "registry_token", "max_price_per_load", "budget",
                            "wallet", "wallet_assets", "verify", "calibration", "publisher"}
    agent = Config.from_env(**options)
    for name in options:
        assert getattr(agent, name) == getattr(defaults, name), name
    monkeypatch.setenv("KVAGENT_VERIFY", "full")
    monkeypatch.setenv("KVAGENT_BUDGET", "7")
    agent = Config.from_env(**options)
    assert (agent.verify, agent.budget) == ("full", 7)
    given = ConnectorSettings.from_extra({"calibration": False, "token": "t-1", "registry_url": "http://r:1"})
    agent = Config.from_env(**given.config_options())
    assert (agent.calibration, agent.registry_token, agent.registry_url) == (False, "t-1", "http://r:1")


def test_a_quick_lookup_answers_the_poll_that_started_it() -> None:
    """A local lookup (a few ms) is answered in the scheduler step that asked for it, not a later one: the
    first poll waits up to ``first_wait_s`` for it (vLLM's busy loop otherwise kept the lookup thread from the
    GIL for up to ~1 s of a lone agent's TTFT); a slow lookup still answers "not yet"."""
    import time
    from types import SimpleNamespace

    from vllm_kvagent.lookup import NO_MATCH, PrefixLookups

    def local(ids: object, namespace: object) -> object:
        time.sleep(0.003)  # what a local store lookup takes
        return NO_MATCH

    quick = PrefixLookups(SimpleNamespace(), engine="vllm x", same_engine_only=False,  # type: ignore[arg-type]
                          first_wait_s=2.0)  # (generous: a loaded CI machine may start the thread late)
    quick.find = local  # type: ignore[method-assign]
    assert quick.poll("r1", (1, 2, 3), None) is NO_MATCH

    def slow(ids: object, namespace: object) -> object:
        time.sleep(0.5)
        return NO_MATCH

    late = PrefixLookups(SimpleNamespace(), engine="vllm x", same_engine_only=False)  # type: ignore[arg-type]
    late.find = slow  # type: ignore[method-assign]
    t0 = time.perf_counter()
    assert late.poll("r2", (1, 2, 3), None) is None
    assert time.perf_counter() - t0 < 0.4  # waited at most first_wait_s, not for the lookup
    deadline = time.monotonic() + 5
    while (got := late.poll("r2", (1, 2, 3), None)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got is NO_MATCH
    quick.close()
    late.close()


def test_the_scheduler_measures_prefill_at_start_and_not_on_a_first_request() -> None:
    """A fresh connector measures kvagent's prefill in the background when it starts (``KVAgent.warm_up``, as
    ``kvagent serve`` does before it listens), so the first registry decision finds measured samples instead
    of probing on that request's time; not with ``calibrate_at_start`` false. ``KVAgent.warm_up`` itself is
    tested in kvagent's suite."""
    import threading
    from types import SimpleNamespace

    from vllm_kvagent.lookup import PrefixLookups

    def lookups(at_start: bool) -> tuple[PrefixLookups, threading.Event]:
        measured = threading.Event()
        agent = SimpleNamespace(warm_up=measured.set, config=SimpleNamespace(calibrate_at_start=at_start))
        return PrefixLookups(agent, engine="vllm x", same_engine_only=False), measured  # type: ignore[arg-type]

    fresh, measured = lookups(True)
    fresh.warm_up()
    assert measured.wait(5)
    off, not_measured = lookups(False)
    off.warm_up()
    off.close()  # its worker has nothing queued: closing does not wait on a measurement
    assert not not_measured.is_set()
