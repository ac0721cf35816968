"""Defaults that scale with the machine: how many sequences a host decodes together (``--max-batch``) when
none is given, sized from the memory its KV caches may take, as vLLM sizes ``max_num_seqs`` from its KV
budget.

``max_batch = clamp(available × KV_FRACTION ÷ (KV bytes per token × max context), MIN_BATCH, MAX_BATCH)``:
each sequence's K/V buffer at the model's full context, in the model's dtype, fits in a fraction of the memory
available after the model loaded (``MemAvailable`` on a CPU, free memory on a GPU). ``--max-queue`` defaults
to twice that: every batch slot busy and as many requests waiting for one.
"""

from __future__ import annotations

from pathlib import Path

#: the share of the available memory the batch's K/V may take (the rest: activations, the prompt cache,
#: decoded published KVs, other processes)
KV_FRACTION = 0.5
MIN_BATCH = 8
MAX_BATCH = 256
#: the context assumed for a model that states none
FALLBACK_CONTEXT = 8192


def default_max_batch(available_bytes: int, kv_bytes_per_token: int, max_context: int | None) -> int:
    """Sequences that fit ``KV_FRACTION`` of ``available_bytes`` at ``max_context`` tokens each (None:
    ``FALLBACK_CONTEXT``), clamped to ``[MIN_BATCH, MAX_BATCH]``."""
    per_seq = max(1, kv_bytes_per_token) * (max_context or FALLBACK_CONTEXT)
    fits = int(max(0, available_bytes) * KV_FRACTION) // per_seq
    return max(MIN_BATCH, min(MAX_BATCH, fits))


def default_max_queue(max_batch: int) -> int:
    """Requests queued or running at once: every batch slot busy and as many waiting for one."""
    return 2 * max_batch


def available_memory(device: str = "cpu", meminfo: Path = Path("/proc/meminfo")) -> int:
    """Bytes of memory available now on ``device``: a CUDA GPU's free memory, else ``MemAvailable`` (0 where
    it cannot be read: the batch then gets ``MIN_BATCH``)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
