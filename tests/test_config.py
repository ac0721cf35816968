"""Config.from_env: arguments win over KVAGENT_* variables, which win over defaults; bad values are
ConfigErrors naming the setting."""

from __future__ import annotations

import pytest

from kvagent.config import Config
from kvagent.errors import ConfigError


def test_arguments_beat_variables_beat_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("KVAGENT_VERIFY", "KVAGENT_VERIFY_PROBES", "KVAGENT_CODEC"):
        monkeypatch.delenv(name, raising=False)
    d = Config.from_env(cache_dir=tmp_path)
    assert (d.verify, d.verify_probes, d.codec) == ("sample", 64, "raw")
    monkeypatch.setenv("KVAGENT_VERIFY", "full")
    monkeypatch.setenv("KVAGENT_VERIFY_PROBES", "200")
    monkeypatch.setenv("KVAGENT_CODEC", "zstd")
    e = Config.from_env(cache_dir=tmp_path)
    assert (e.verify, e.verify_probes, e.codec) == ("full", 200, "zstd")
    a = Config.from_env(cache_dir=tmp_path, verify="none", verify_probes=0, codec="bplane-zstd")
    assert (a.verify, a.verify_probes, a.codec) == ("none", 0, "bplane-zstd")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"verify": "most"}, "verify must be"),
    ({"verify_probes": -1}, "verify_probes must be"),
    ({"codec": "int8"}, "codec must be"),
    ({"block_size": 0}, "block_size"),
    ({"registry_url": "ftp://x"}, "registry URL"),
])
def test_bad_values_are_config_errors(tmp_path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(cache_dir=tmp_path, **kwargs)


def test_a_non_integer_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("KVAGENT_VERIFY_PROBES", "many")
    with pytest.raises(ConfigError, match="KVAGENT_VERIFY_PROBES"):
        Config.from_env(cache_dir=tmp_path)


def test_an_unknown_option_names_the_closest(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'registry_url'"):
        Config.from_env(cache_dir=tmp_path, registri_url="http://r.test")
    with pytest.raises(ConfigError, match="did you mean 'max_price_per_load'"):
        Config.from_env(cache_dir=tmp_path).with_options(max_price_per_lod=3)


def test_the_facade_refuses_an_unknown_option_before_loading_anything(tmp_path) -> None:
    from kvagent import KVAgent

    with pytest.raises(ConfigError, match="did you mean 'registry_url'"):
        KVAgent(cache_dir=tmp_path, registri_url="http://r.test")
    with pytest.raises(ConfigError, match="did you mean 'memory_slots'"):
        KVAgent(config=Config.from_env(cache_dir=tmp_path), memory_slot=3)


def test_token_is_registry_token_and_options_override_a_config(tmp_path) -> None:
    c = Config.from_env(cache_dir=tmp_path, registry_url="http://r.test", token="t-1")
    assert (c.registry_token, c.local_only) == ("t-1", False)
    with pytest.raises(ConfigError, match="same option"):
        Config.from_env(cache_dir=tmp_path, token="a", registry_token="b")
    d = Config.from_env(cache_dir=tmp_path).with_options(
        registry_url="http://r.test", budget=10, memory_slots=None
    )
    assert (d.registry_url, d.local_only, d.budget, d.memory_slots) == ("http://r.test", False, 10, 2)
    with pytest.raises(ConfigError, match="budget"):
        d.with_options(budget=1.5)  # money is integer micro-units


def test_new_options_read_their_variables(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("KVAGENT_TRUSTED_KEYS", "ab, cd")
    monkeypatch.setenv("KVAGENT_CALIBRATION", "off")
    monkeypatch.setenv("KVAGENT_PREFILL_CHUNK_SIZE", "512")
    c = Config.from_env(cache_dir=tmp_path)
    assert (c.trusted_keys, c.calibration, c.prefill_chunk_size) == (("ab", "cd"), False, 512)
    with pytest.raises(ConfigError, match="publish must be"):
        Config.from_env(cache_dir=tmp_path, publish="everyone")


def test_each_default_is_declared_once() -> None:
    """The resolver's and the policy's defaults are Config's (one literal each, in config.py or market.py)."""
    from kvagent.costs.market import DEFAULT_PREFILL_MICROS_PER_TOKEN
    from kvagent.costs.policy import PolicyParams
    from kvagent.reuse.resolver import ResolverSettings

    c, r = Config(), ResolverSettings()
    for name in ("block_size", "verify", "verify_probes", "lock_timeout", "allow_context_overflow",
                 "max_price_per_load", "budget", "prefill_cost_per_token"):
        assert getattr(r, name) == getattr(c, name), name
    assert (
        PolicyParams().prefill_cost_micros_per_token
        == c.prefill_cost_per_token
        == DEFAULT_PREFILL_MICROS_PER_TOKEN
    )
    assert Config.resolve == Config.from_env  # the deprecated name still works


def test_the_policy_is_one_variable_of_key_value_pairs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """KVAGENT_POLICY sets the cost policy of a process that takes no arguments (``kvagent serve``'s host)."""
    monkeypatch.setenv("KVAGENT_POLICY", "min_tokens=0, prefill_tokens_per_s=120,max_egress_usd=none")
    p = Config.from_env(cache_dir=tmp_path).policy
    assert p is not None and (p.min_tokens, p.prefill_tokens_per_s, p.max_egress_usd) == (0, 120.0, None)
    assert p.tie_tolerance == 0.05  # the rest keep their defaults
    for raw, message in (("min_tokns=0", "unknown setting 'min_tokns'"), ("min_tokens", "not key=value"),
                         ("rtt_s=fast", "not a number"), ("budget_left_micros=5", "KVAGENT_BUDGET"),
                         ("tie_tolerance=2", "must not be negative")):
        monkeypatch.setenv("KVAGENT_POLICY", raw)
        with pytest.raises(ConfigError, match=message):
            Config.from_env(cache_dir=tmp_path)


@pytest.mark.parametrize(("given", "publish", "visibility"), [
    (False, "none", None), ("none", "none", None), (True, "restricted", "restricted"),
    ("restricted", "restricted", "restricted"), ("public", "public", "public"),
])
def test_publish_has_one_typed_spelling_and_takes_the_old_ones(tmp_path, given, publish, visibility) -> None:
    """``publish`` is a Publish (none / restricted / public, as the vLLM connector spells it); False and True
    still mean none and restricted, as before."""
    from kvagent import Publish

    c = Config.from_env(cache_dir=tmp_path, publish=given)
    assert isinstance(c.publish, Publish) and c.publish == publish and c.publish_visibility == visibility
    assert Config.from_env(cache_dir=tmp_path).publish is Publish.NONE
    assert c.with_options(publish=Publish.PUBLIC).publish_visibility == "public"


def test_verify_is_typed_and_still_a_string(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from kvagent import Verify

    monkeypatch.setenv("KVAGENT_VERIFY", "full")
    c = Config.from_env(cache_dir=tmp_path)
    assert c.verify is Verify.FULL and c.verify == "full" and f"{c.verify}" == "full"
    assert Config.from_env(cache_dir=tmp_path, verify=Verify.NONE).verify is Verify.NONE
    with pytest.raises(ConfigError, match=r"verify must be one of \['none', 'sample', 'full'\]"):
        Config.from_env(cache_dir=tmp_path, verify=True)
