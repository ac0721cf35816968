"""The connector's extra config is checked once: unknown keys and wrong types are errors, never dropped.
Runs without vLLM."""

from __future__ import annotations

import pytest
from kvagent import ConfigError

from vllm_kvagent import ConnectorSettings, namespace_of


def test_defaults_reuse_without_a_registry_and_publish_nothing() -> None:
    s = ConnectorSettings.from_extra(None)
    assert (s.registry_url, s.publish, s.engines, s.min_save_tokens, s.price) == (
        None,
        "none",
        "any",
        256,
        None,
    )


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
    ],
)
def test_bad_settings_are_refused_with_the_reason(extra: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ConnectorSettings.from_extra(extra)


def test_a_cache_salt_is_a_private_namespace_and_no_salt_is_the_shared_one() -> None:
    assert namespace_of(None) is None and namespace_of("") is None
    assert namespace_of("tenant-a") == "vllm-cache-salt:tenant-a" != namespace_of("tenant-b")
