"""Published KV a request's caller may read, made visible to the connector (``kvagent serve --engine vllm``).

The connector runs in vLLM's engine core (another process) and reads the host's local store; the artifacts
published to the host itself live in the server's registry (its metadata and blob store), which only the
host can read, with the caller's entitlements. Before a request reaches vLLM, :class:`PublishedStager` asks
the host's resolver, with the caller's registry source as its registry tier, for the longest published
prefix of the prompt; when it covers more than the local store has for the caller, the KV (checksum- and
policy-checked by the resolver, verified against its tokens as the transformers path does) is kept in the
caller's own namespace of the local store, where the connector finds it for this caller only, as if the
caller's own prompt had computed it. An unsalted request may take public artifacts only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvagent import KVAgentError, RegistrySource, Resolver, block_hashes, salted

from .settings import namespace_of

log = logging.getLogger("vllm.kvagent")


class PublishedStager:
    """Copies published KV the caller may read into its namespace of the local store (see the module
    docstring); ``resolver`` is the host's (same keys and local store as the connector)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def stage(self, ids: Sequence[int], namespace: str | None, source: RegistrySource) -> str:
        """Stage the longest published prefix of ``ids[:-1]`` that ``source`` offers (blocking); returns what
        it did. A failure is a miss (logged): vLLM then computes those tokens."""
        try:
            return self._stage(tuple(int(t) for t in ids[:-1]), namespace, source)
        except KVAgentError as exc:
            log.warning("could not stage published KV for a %d-token prompt (vLLM computes it): %s: %s",
                        len(ids), type(exc).__name__, exc)
            return f"staging failed ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - staging is an optimisation: never fail the request; logged
            log.exception("staging published KV for a %d-token prompt failed (vLLM computes it)", len(ids))
            return f"staging failed ({type(exc).__name__})"

    def _stage(self, ids: tuple[int, ...], namespace: str | None, source: RegistrySource) -> str:
        r = self.resolver
        block = r.settings.block_size
        if len(ids) < block:
            return "shorter than one block"
        found = source.lookup_prefix(block_hashes(r.context, ids, block))
        if found is None:
            return "nothing published for it"
        handle, blocks = found
        if handle.visibility != "public" and not namespace:
            return f"{handle.key[:16]}… is restricted and the request has no namespace"
        ns = namespace_of(namespace)
        ctx = salted(r.context, ns) if ns else r.context
        have = r.store.find_prefix(block_hashes(ctx, ids, block))
        if have is not None and have[1] >= blocks:
            return f"the local store already holds {have[1]} blocks of it"
        res = r.resolve(ids, namespace=ns, registry=source, document=False, compute=False)
        if res.kv is None or res.info.source != "registry":
            return f"not staged: {res.info.reason}"
        r.keep(res.kv, namespace=ns)
        log.info("kvagent: staged %d tokens of published %s… for the connector: %s", res.kv.n_tokens,
                 handle.key[:16], res.info.reason)
        return f"staged {res.kv.n_tokens} tokens of {handle.key[:16]}…"
