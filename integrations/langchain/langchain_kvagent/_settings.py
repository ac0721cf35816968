"""Settings shared by the LLM and the chat model: which agent, how to decode, whether to reuse KV."""

from __future__ import annotations

import threading
from typing import Any

from kvagent import GenerationParams, KVAgent
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ._reuse import PromptRunner


class KVAgentSettings(BaseModel):
    """Pydantic fields for a LangChain model backed by a ``KVAgent``.

    Pass ``agent=`` to share one loaded model (and its caches) between several LangChain objects;
    otherwise one is built on first use from ``model``, ``cache_dir`` and ``agent_kwargs``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = None
    """Model spec for ``KVAgent`` ("smollm2", a local directory, a cached hub id); None: the default."""
    cache_dir: str | None = None
    agent_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further ``KVAgent`` keyword arguments (``memory_slots``, ``block_size``, ``registry_url``...)."""
    agent: KVAgent | None = Field(default=None, exclude=True)
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    """Default stop strings (a call's ``stop`` replaces them)."""
    kv_reuse: bool = True
    """Resume from the longest cached KV prefix; False prefills every prompt in full (the reference)."""
    kv_save_prompts: bool = True
    """Keep the KV of each prompt (memory and local store) so later prompts sharing its start resume from it."""
    kv_min_save_tokens: int = 32
    """Only keep a prompt's KV when at least this many of its tokens were newly prefilled."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def kv_agent(self) -> KVAgent:
        """The agent, loaded on first use (so constructing a LangChain object stays cheap)."""
        with self._lock:
            if self.agent is None:
                self.agent = KVAgent(self.model, cache_dir=self.cache_dir, **self.agent_kwargs)
            return self.agent

    def _runner(self) -> PromptRunner:
        return PromptRunner(
            self.kv_agent,
            reuse=self.kv_reuse,
            save=self.kv_save_prompts,
            min_save_tokens=self.kv_min_save_tokens,
        )

    def _params(self, **kwargs: Any) -> GenerationParams:
        """Generation settings for one call; ``max_tokens``, ``temperature``... in ``kwargs`` override the fields."""
        if kwargs.get("model", self.model) != self.model:
            raise ValueError(
                f"this model serves {self.model!r}; a per-call model={kwargs['model']!r} cannot switch it"
            )
        return self.kv_agent.params(
            max_new_tokens=int(kwargs.get("max_tokens", self.max_tokens)),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_k=int(kwargs.get("top_k", self.top_k)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            seed=kwargs.get("seed", self.seed),
        )

    def _stops(self, stop: list[str] | None) -> list[str]:
        return list(stop if stop is not None else (self.stop or []))

    def _settings_params(self) -> dict[str, Any]:
        """Model id and generation settings only: LangChain's cache key and tracing parameters."""
        fingerprint = self.agent.context.model_fingerprint if self.agent is not None else None
        return {
            "model": self.model or "default",
            "model_fingerprint": fingerprint,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }
