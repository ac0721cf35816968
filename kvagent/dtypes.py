"""Which floating-point dtype a model runs in: ``auto`` chooses as vLLM does, an explicit one is checked.

``auto`` is bfloat16 where the hardware computes it natively (a CPU with AMX or AVX512-BF16, read from
``/proc/cpuinfo``'s ``amx_bf16`` / ``avx512_bf16`` flags; a CUDA GPU for which
``torch.cuda.is_bf16_supported()``), else float32. The default (kvagent.config) is float32, the one
dtype in which reuse is token-exact; the dtype is part of every content key. :func:`auto_dtype` is the pure
choice (flags in, dtype out); :func:`resolve_dtype` asks the machine and checks that an explicit dtype runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

from .errors import ConfigError

#: the dtypes a model may run in
DTYPES = ("float32", "bfloat16", "float16")
#: what ``--dtype`` / ``KVAGENT_DTYPE`` / ``dtype=`` accept
DTYPE_CHOICES = ("auto", *DTYPES)
#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic, as vLLM's CPU backend checks them
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def check_dtype(name: str | None) -> str:
    """``name`` if it is one of :data:`DTYPE_CHOICES` (None: ``auto``), else a ConfigError."""
    if name is None:
        return "auto"
    if name not in DTYPE_CHOICES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return name


def auto_dtype(cpu_flags: Iterable[str], cuda_bf16: bool | None = None) -> str:
    """What ``auto`` means: on a CUDA GPU (``cuda_bf16`` not None) bfloat16 where it supports it, on a CPU
    bfloat16 where ``cpu_flags`` has AMX-BF16 or AVX512-BF16; float32 otherwise."""
    if cuda_bf16 is not None:
        return "bfloat16" if cuda_bf16 else "float32"
    return "bfloat16" if BF16_CPU_FLAGS & set(cpu_flags) else "float32"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where there is no ``/proc/cpuinfo``: not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def resolve_dtype(name: str | None, device: str = "cpu") -> str:
    """The concrete dtype ``name`` means on ``device`` (``auto`` chosen for this machine); an explicit dtype
    that does not run there is a ConfigError, never ignored."""
    name = check_dtype(name)
    if name == "auto":
        return _machine_auto(device.split(":")[0])
    _check_runs(name, device)
    return name


@cache
def _machine_auto(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return auto_dtype((), torch.cuda.is_bf16_supported())
    return auto_dtype(cpu_flags())


@cache
def _check_runs(name: str, device: str) -> None:
    """A matrix product and an attention call in ``name`` on ``device``: what a forward needs of it."""
    import torch

    dtype = getattr(torch, name)
    try:
        x = torch.ones((1, 1, 4, 8), dtype=dtype, device=device)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True) @ x.transpose(-1, -2)
        ok = y.dtype == dtype and bool(torch.isfinite(y).all())
    except Exception as exc:  # any failure to compute in it: the setting cannot be honoured here
        raise ConfigError(f"dtype {name} cannot run on {device}: {exc}") from exc
    if not ok:
        raise ConfigError(f"dtype {name} does not compute correctly on {device}")
