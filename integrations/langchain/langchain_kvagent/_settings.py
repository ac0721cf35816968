"""Settings shared by the LLM and the chat model: which runtime, how to decode, whether to reuse KV."""

from __future__ import annotations

import threading
from typing import Any

from kvagent import Config, GenerationParams, KVAgent, Runtime, build_runtime, unknown_option
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from ._reuse import PromptRunner

#: ``agent_kwargs`` that are parts, not ``Config`` options
_COMPONENTS = ("tokenizer", "registry_client", "progress")


class KVAgentSettings(BaseModel):
    """Pydantic fields for a LangChain model backed by a kvagent runtime.

    Pass ``agent=`` to share one loaded model (and its caches) between several LangChain objects;
    otherwise one runtime is built on first use from ``model``, ``cache_dir``, ``registry_url``, ``token``
    (or ``api_key``) and any other ``kvagent.Config`` option given as a keyword (``budget=``,
    ``memory_slots=``...). An unknown keyword is an error naming the closest field, never ignored.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), populate_by_name=True)

    model: str | None = None
    """Model spec ("smollm2", a local directory, a cached hub id); None: ``KVAGENT_MODEL`` or the default."""
    cache_dir: str | None = None
    """Local KV store directory; None: ``KVAGENT_CACHE_DIR`` or the user cache."""
    registry_url: str | None = None
    """The registry to read published KV from (and publish to); None: ``KVAGENT_REGISTRY_URL`` or none."""
    token: SecretStr | None = Field(default=None, alias="api_key")
    """The registry's bearer token (``api_key=`` too, as LangChain's OpenAI models spell it)."""
    timeout: float | None = None
    """Seconds each registry request may take (``Config.registry_timeout``); None: the client's default."""
    max_retries: int | None = None
    """Retries of a failed registry request after its first try (``Config.registry_attempts`` - 1)."""
    config_options: dict[str, Any] = Field(default_factory=dict)
    """Further ``kvagent.Config`` options (given as keywords, they land here)."""
    agent_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further options as one dict (``Config`` options, ``tokenizer``, ``registry_client``, ``progress``)."""
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
    """Keep the KV of each prompt (memory and local store) so later prompts sharing its start resume from
    it."""
    kv_min_save_tokens: int = 32
    """Only keep a prompt's KV when at least this many of its tokens were newly prefilled."""

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _built: Runtime | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _config_keywords(cls, values: Any) -> Any:
        """Move ``Config`` options given as keywords into ``config_options``; refuse unknown keywords."""
        if not isinstance(values, dict):
            return values
        fields = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        options = set(Config.option_names()) | {"token"}
        out: dict[str, Any] = {}
        moved: dict[str, Any] = {}
        for name, value in values.items():
            if name in fields:
                out[name] = value
            elif name in options:
                moved[name] = value
            else:
                raise ValueError(f"{cls.__name__}: {unknown_option(name, fields | options)}")
        if moved:
            out["config_options"] = {**dict(out.get("config_options") or {}), **moved}
        return out

    @model_validator(mode="after")
    def _one_source(self) -> KVAgentSettings:
        given = [n for n in ("cache_dir", "registry_url", "token", "timeout", "max_retries")
                 if getattr(self, n) is not None]
        given += [n for n in ("config_options", "agent_kwargs") if getattr(self, n)]
        if self.agent is not None and given:
            raise ValueError(f"agent= comes with its own settings; {', '.join(given)} would be ignored: "
                             "give them to the KVAgent, or leave out agent=")
        return self

    def kv_config(self) -> Config:
        """The ``kvagent.Config`` these fields describe (KVAGENT_* variables and defaults fill the rest)."""
        options = {k: v for k, v in self.agent_kwargs.items() if k not in _COMPONENTS}
        options.update(self.config_options)
        for name, value in (
            ("model", self.model),
            ("cache_dir", self.cache_dir),
            ("registry_url", self.registry_url),
            ("token", self.token.get_secret_value() if self.token else None),
            ("registry_timeout", self.timeout),
            ("registry_attempts", None if self.max_retries is None else self.max_retries + 1),
        ):
            if value is not None:
                options[name] = value
        client = self.agent_kwargs.get("registry_client")
        if client is not None and options.get("registry_url") is None:
            options["registry_url"] = client.base_url
        return Config.from_env(**options)

    @property
    def runtime(self) -> Runtime:
        """The model's runtime: the agent's, or one built on first use (so constructing stays cheap)."""
        with self._lock:
            if self._built is None:
                if self.agent is not None:
                    self._built = self.agent.runtime
                else:
                    parts = {k: v for k, v in self.agent_kwargs.items() if k in _COMPONENTS}
                    self._built = build_runtime(self.kv_config(), **parts)
            return self._built

    @property
    def kv_agent(self) -> KVAgent:
        """A ``KVAgent`` facade over this model's runtime (e.g. to read documents with
        ``KVDocumentLoader``)."""
        if self.agent is None:
            self.agent = KVAgent.from_runtime(self.runtime)
        return self.agent

    def _runner(self) -> PromptRunner:
        return PromptRunner(
            self.runtime,
            reuse=self.kv_reuse,
            save=self.kv_save_prompts,
            min_save_tokens=self.kv_min_save_tokens,
        )

    def _params(self, **kwargs: Any) -> GenerationParams:
        """Generation settings for one call; ``max_tokens``, ``temperature``... in ``kwargs`` override the
        fields."""
        if kwargs.get("model", self.model) != self.model:
            raise ValueError(
                f"this model serves {self.model!r}; a per-call model={kwargs['model']!r} cannot switch it"
            )
        return self.runtime.params(
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
        built = self.agent.runtime if self.agent is not None else self._built
        fingerprint = built.context.model_fingerprint if built is not None else None
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
