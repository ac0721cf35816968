"""The model host: one model loaded once (with its tokenizer and resolver), an LRU of decoded KVs, one generation
at a time."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import artifact as art
from ..engine import GenerationParams
from ..errors import KVAgentError, ModelLoadError
from ..kv import KVCache
from ..models import EMBEDDED_NAMES, load_model
from ..runtime import Runtime, build_runtime

log = logging.getLogger("kvagent.server")

#: ("token", id) | ("done", finish_reason, n_generated) | ("error", exception)
Event = tuple[Any, ...]


def load_host_agent(spec: str, models_dir: Path, cache_dir: Path, *, memory_slots: int = 2,
                    prompt_cache_bytes: int = 2 << 30) -> Runtime:
    """The host's model, tokenizer and resolver: a local-only runtime, built as an SDK agent's is, so its keys,
    block hashes and chat rendering are exactly those of an SDK agent on the same model (published artifacts match).

    ``cache_dir`` holds the host's own prompt cache (private prompt KVs, salted per principal).
    """
    if spec.lower() not in EMBEDDED_NAMES and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(f"--model {spec!r} is neither 'smollm2' nor a local model directory")
    loaded = load_model(spec, models_dir, require_tokenizer=False)
    from ..config import Config

    config = Config.from_env(model=loaded.name, models_dir=models_dir, cache_dir=cache_dir, local_only=True,
                             memory_slots=memory_slots, cache_size_bytes=prompt_cache_bytes)
    return build_runtime(config, model=loaded)


class ModelHost:
    """One model loaded once: its agent (tokenizer, resolver), an LRU of decoded published KVs, one generation
    at a time (``lock``)."""

    def __init__(self, agent: Runtime, name: str, kv_cache_items: int = 2):
        self.agent = agent
        self.engine = agent.engine
        self.fingerprint = agent.context.model_fingerprint
        self.name = name
        self.lock = threading.Lock()  # one model: generations run one at a time
        self._kv_lock = threading.Lock()
        self._kvs: OrderedDict[str, KVCache] = OrderedDict()
        self._capacity = kv_cache_items

    def kv_for(self, key: str, blob: str, read: Callable[[str], memoryview]) -> KVCache:
        """The decoded KV of published blob ``blob`` (checksum verified), from the LRU when possible;
        ``read`` is the blob store's ``read_bytes``."""
        cache_id = f"{key}:{blob}"
        with self._kv_lock:
            kv = self._kvs.get(cache_id)
            if kv is not None:
                self._kvs.move_to_end(cache_id)
                return kv
        kv = art.decode(read(blob), expect=art.Expectation(key=key)).kv
        if self._capacity:
            with self._kv_lock:
                self._kvs[cache_id] = kv
                while len(self._kvs) > self._capacity:
                    self._kvs.popitem(last=False)
        return kv

    def forget(self, key: str) -> None:
        with self._kv_lock:
            for cid in [c for c in self._kvs if c.startswith(key + ":")]:
                del self._kvs[cid]

    def run(
        self,
        kv: KVCache,
        suffix_ids: Sequence[int],
        params: GenerationParams,
        emit: Callable[[Event], None],
        cancelled: threading.Event,
    ) -> None:
        """Generate under the model lock, emitting events; never raises (errors are emitted)."""
        stops = set(params.stop_token_ids)
        n, reason = 0, "length"
        try:
            with self.lock:
                it = self.engine.stream(kv, suffix_ids, params)
                try:
                    for tok in it:
                        if cancelled.is_set():
                            reason = "cancelled"
                            break
                        emit(("token", tok))
                        n += 1
                        if tok in stops:
                            reason = "stop"
                            break
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            emit(("done", reason, n))
        except KVAgentError as exc:
            emit(("error", exc))
        except Exception as exc:  # reported to the client as a generic 500 / error line, logged here
            log.exception("generation failed")
            emit(("error", exc))
