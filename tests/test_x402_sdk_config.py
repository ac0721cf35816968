"""An agent's wallet is a Config option: a key file's path, or KVAGENT_WALLET_KEY (read when the runtime is
built, never kept in the Config, shown or pickled); its caps are the buyer's money caps, declared once."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from kvagent import Config
from kvagent.errors import ConfigError
from kvagent.runtime import wallet_payer

KEY = "0x" + "11" * 32  # a throwaway key: never holds anything
TOKEN = "0x" + "ab" * 20


def test_x402_wallet_key_from_the_environment_never_enters_the_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAGENT_WALLET_KEY", KEY)
    monkeypatch.setenv("KVAGENT_WALLET_ASSETS", f"eip155:31337/{TOKEN}")
    monkeypatch.setenv("KVAGENT_MAX_PRICE_PER_LOAD", "2000")
    cfg = Config.from_env(registry_url="http://registry.test")
    assert cfg.wallet is True and cfg.wallet_assets == (("eip155:31337", TOKEN),)
    assert cfg.max_price_per_load == 2000
    for shown in (repr(cfg), str(cfg), pickle.dumps(cfg)):
        assert KEY[2:] not in str(shown)
    assert Config.from_env(wallet=False).wallet is False  # an explicit False turns the environment's off


def test_x402_wallet_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="wallet_assets"):
        Config.from_env(wallet_assets="eip155:1:0x00")
    with pytest.raises(ConfigError, match="wallet"):
        Config.from_env(wallet=3)
    assert Config.from_env(wallet="~/w.key").wallet == Path("~/w.key").expanduser()


def test_x402_payer_has_the_agent_caps_and_never_logs_the_key(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("x402", reason="needs the x402 SDK: pip install 'kvagent[x402]'")
    key = tmp_path / "w.key"
    key.write_text(KEY)
    key.chmod(0o600)
    cfg = Config.from_env(registry_url="http://registry.test", wallet=key, max_price_per_load=700,
                          budget=5000, wallet_assets=[f"eip155:31337/{TOKEN}"])
    with caplog.at_level(logging.DEBUG, logger="kvagent"):
        payer = wallet_payer(cfg)
    assert payer is not None
    assert (payer.caps.max_price_per_load, payer.caps.budget) == (700, 5000)
    assert payer.allowed_assets == (("eip155:31337", TOKEN),)
    assert payer.wallet.address in caplog.text and KEY[2:] not in caplog.text
    assert KEY[2:] not in repr(payer.wallet)
    with pytest.raises(TypeError):
        pickle.dumps(payer.wallet)
    assert wallet_payer(Config.from_env(wallet=False)) is None
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        wallet_payer(cfg)
