"""What a prefill sample is valid for: the machine (``machine_id``) and the ``Profile`` keyed on it."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any


def machine_id(device: Any = "cpu") -> str:
    """CPU model or GPU kind, plus the torch thread count: what prefill speed depends on besides the model."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    threads = torch.get_num_threads()
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}|threads={threads}"
    return f"{dev.type}:{_cpu_model()}|threads={threads}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class Profile:
    """What a prefill sample is valid for."""

    model_fingerprint: str
    dtype: str
    machine: str

    @property
    def key(self) -> str:
        return f"{self.model_fingerprint[:16]}/{self.dtype}/{self.machine}"
