"""Settings are fields: ``registry_url``, ``token`` (or ``api_key``) and any ``kvagent.Config`` option are
taken as
keywords and reach the runtime's Config; an unknown keyword is an error naming the closest field, never
dropped.
Only the last test but one loads a model (the runtime is built on first use)."""

from __future__ import annotations

import pytest
from kvagent import Config

from langchain_kvagent import ChatKVAgent, KVAgentLLM

R = "http://registry.test:8080"


@pytest.mark.parametrize("cls", [ChatKVAgent, KVAgentLLM])
def test_registry_url_and_token_are_fields(cls, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = cls(registry_url=R, token="tok-1", cache_dir=str(tmp_path))
    cfg = m.kv_config()
    assert (cfg.registry_url, cfg.registry_token, cfg.local_only) == (R, "tok-1", False)
    assert "tok-1" not in repr(m) and "tok-1" not in str(m._identifying_params)  # a secret, as in ChatOpenAI
    assert cls(registry_url=R, api_key="tok-2").kv_config().registry_token == "tok-2"


@pytest.mark.parametrize("cls", [ChatKVAgent, KVAgentLLM])
def test_any_config_option_is_a_keyword(cls, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = cls(cache_dir=str(tmp_path), budget=4000, memory_slots=5, verify="full", max_tokens=7)
    cfg = m.kv_config()
    assert (cfg.budget, cfg.memory_slots, cfg.verify, m.max_tokens) == (4000, 5, "full", 7)
    assert m.config_options == {"budget": 4000, "memory_slots": 5, "verify": "full"}


@pytest.mark.parametrize(("kw", "closest"), [
    ({"registri_url": R}, "registry_url"),
    ({"tokn": "t"}, "token"),
    ({"max_token": 3}, "max_tokens"),
    ({"memory_slot": 3}, "memory_slots"),
])
@pytest.mark.parametrize("cls", [ChatKVAgent, KVAgentLLM])
def test_an_unknown_keyword_names_the_closest_field(cls, kw, closest) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=f"did you mean '{closest}'"):
        cls(**kw)


def test_a_bad_option_value_is_refused_when_the_config_is_built(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="verify must be"):
        ChatKVAgent(cache_dir=str(tmp_path), verify="most").kv_config()


def test_agent_and_its_own_options_are_not_both_taken(agent) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="registry_url would be ignored"):
        ChatKVAgent(agent=agent, registry_url=R)
    assert ChatKVAgent(agent=agent).runtime is agent.runtime


def test_config_option_names_are_the_configs() -> None:
    assert {"registry_url", "registry_token", "budget", "cache_dir"} <= set(Config.option_names())


@pytest.mark.parametrize("cls", [ChatKVAgent, KVAgentLLM])
def test_timeout_and_max_retries_configure_the_registry_client(cls, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """LangChain's standard ``timeout`` / ``max_retries`` reach the registry client (``max_retries`` counts
    retries
    after the first try), and a model that builds no client of its own refuses them rather than drop them."""
    m = cls(registry_url=R, cache_dir=str(tmp_path), timeout=2.5, max_retries=0)
    cfg = m.kv_config()
    assert (cfg.registry_timeout, cfg.registry_attempts) == (2.5, 1)
    assert cls(cache_dir=str(tmp_path)).kv_config().registry_attempts == Config().registry_attempts
    with pytest.raises(ValueError, match="registry_attempts"):
        cls(registry_url=R, max_retries=-1).kv_config()


@pytest.mark.parametrize("cls", [ChatKVAgent, KVAgentLLM])
def test_x402_wallet_caps_reach_the_config(cls, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A wallet (a key file's path: never the key) and its caps are Config options like any other."""
    key = tmp_path / "wallet.key"
    m = cls(registry_url=R, cache_dir=str(tmp_path), wallet=str(key), max_price_per_load=2000, budget=9000,
            wallet_assets="eip155:31337/0x" + "ab" * 20)
    cfg = m.kv_config()
    assert (cfg.wallet, cfg.max_price_per_load, cfg.budget) == (key, 2000, 9000)
    assert cfg.wallet_assets == (("eip155:31337", "0x" + "ab" * 20),) and cfg.registry_token is None
