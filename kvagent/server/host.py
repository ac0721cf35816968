"""Provider-side generation: one model loaded once, an LRU of decoded KVs, one generation at a time."""

from __future__ import annotations

import logging
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import artifact as art
from ..engine import GenerationParams, TransformersEngine
from ..errors import KVAgentError, ModelLoadError
from ..kv import KVCache
from ..models import EMBEDDED_NAMES, ensure_embedded, model_fingerprint_cached

log = logging.getLogger("kvagent.server")

#: ("token", id) | ("done", finish_reason, n_generated) | ("error", exception)
Event = tuple[Any, ...]


@dataclass
class _Loaded:
    model: Any
    fingerprint: str
    name: str


def load_server_model(spec: str, models_dir: Path) -> _Loaded:
    """Load only the model (generation works on token ids, so no tokenizer is needed)."""
    from transformers import AutoModelForCausalLM

    if spec.lower() in EMBEDDED_NAMES:
        path = ensure_embedded(models_dir)
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"--model {spec!r} is neither 'smollm2' nor a local model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {exc}") from exc
    return _Loaded(model, model_fingerprint_cached(model, path, models_dir), spec)


class ModelHost:
    def __init__(self, loaded: _Loaded, kv_cache_items: int = 2):
        self.engine = TransformersEngine(loaded.model)
        self.fingerprint = loaded.fingerprint
        self.name = loaded.name
        self.lock = threading.Lock()  # one model: generations run one at a time
        self._kv_lock = threading.Lock()
        self._kvs: OrderedDict[str, KVCache] = OrderedDict()
        self._capacity = kv_cache_items

    def kv_for(self, key: str, blob_path: Path) -> KVCache:
        """The decoded KV of a published blob (checksum verified), from the LRU when possible."""
        cache_id = f"{key}:{blob_path.name}"
        with self._kv_lock:
            kv = self._kvs.get(cache_id)
            if kv is not None:
                self._kvs.move_to_end(cache_id)
                return kv
        with open(blob_path, "rb") as f:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
        kv = art.decode(buf, expect=art.Expectation(key=key)).kv
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
