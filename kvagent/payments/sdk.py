"""The x402 SDK, imported only when a wallet or an ``--x402-*`` option is used."""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError

INSTALL_HINT = "x402 payments need the x402 SDK: pip install 'kvagent[x402]'"


def require(module: str = "x402") -> ModuleType:
    """Import ``module`` of the x402 SDK (or its EVM dependencies), or say what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc
