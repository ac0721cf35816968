"""Config.resolve: arguments win over KVAGENT_* variables, which win over defaults; bad values are
ConfigErrors naming the setting."""

from __future__ import annotations

import pytest

from kvagent.config import Config
from kvagent.errors import ConfigError


def test_arguments_beat_variables_beat_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("KVAGENT_VERIFY", "KVAGENT_VERIFY_PROBES", "KVAGENT_CODEC"):
        monkeypatch.delenv(name, raising=False)
    d = Config.resolve(cache_dir=tmp_path)
    assert (d.verify, d.verify_probes, d.codec) == ("sample", 64, "raw")
    monkeypatch.setenv("KVAGENT_VERIFY", "full")
    monkeypatch.setenv("KVAGENT_VERIFY_PROBES", "200")
    monkeypatch.setenv("KVAGENT_CODEC", "zstd")
    e = Config.resolve(cache_dir=tmp_path)
    assert (e.verify, e.verify_probes, e.codec) == ("full", 200, "zstd")
    a = Config.resolve(cache_dir=tmp_path, verify="none", verify_probes=0, codec="bplane-zstd")
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
        Config.resolve(cache_dir=tmp_path, **kwargs)


def test_a_non_integer_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("KVAGENT_VERIFY_PROBES", "many")
    with pytest.raises(ConfigError, match="KVAGENT_VERIFY_PROBES"):
        Config.resolve(cache_dir=tmp_path)
