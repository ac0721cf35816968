"""What the command groups share: the console, an agent built from the global options (with a prefill
progress bar), the local store, the registry client, a one-line cache report, the server's entry points."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import KVAgentError


def make_console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


@contextmanager
def open_agent(args: argparse.Namespace) -> Iterator[Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..agent import KVAgent

    console = make_console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
        TimeElapsedColumn(), console=console, transient=True,
    )
    task: dict[str, Any] = {}

    def on_progress(what: str, done: int, total: int) -> None:
        if what != "prefill":
            console.print(f"[dim]{what}[/]")
            return
        if "id" not in task:
            progress.start()
            task["id"] = progress.add_task("prefill", total=total)
        progress.update(task["id"], completed=done, total=total)
        if done >= total:
            progress.stop()
            del task["id"]

    agent = KVAgent(
        args.model, cache_dir=args.cache_dir, progress=on_progress,
        registry_url=getattr(args, "registry", None), token=getattr(args, "token", None),
        allow_context_overflow=True if getattr(args, "allow_context_overflow", False) else None,
        max_price_per_load=getattr(args, "max_price_per_load", None), budget=getattr(args, "budget", None),
        prefill_cost_per_token=getattr(args, "prefill_cost_per_token", None),
    )
    try:
        yield agent
    finally:
        progress.stop()
        agent.close()


def info_line(info: Any) -> str:
    if info.status == "prefill":
        return (
            f"miss → prefilled {info.prefilled_tokens} tokens in {info.prefill_seconds:.2f}s ({info.reason})"
        )
    if info.status == "local":
        ms = info.load_seconds * 1000
        return f"hit (local store): {info.cached_tokens} tokens loaded in {ms:.0f} ms, checksum verified"
    if info.status == "prefix":
        return (f"prefix hit: {info.cached_tokens} tokens reused, {info.prefilled_tokens} prefilled "
                f"({info.reason})")
    if info.status == "remote":
        return (f"hit (registry): {info.cached_tokens} tokens fetched ({info.bytes_read / 1e6:.1f} MB), "
                f"verified ({info.reason})")
    if info.status == "remote-generate":
        return f"registry generates from its copy: {info.cached_tokens} tokens ({info.reason})"
    return f"hit (memory): {info.cached_tokens} tokens"


def open_store(args: argparse.Namespace) -> Any:
    from ..config import Config
    from ..tiers.store import KVStore

    cfg = Config.from_env(cache_dir=args.cache_dir)
    return KVStore(cfg.store_dir, size_limit=cfg.cache_size_bytes)


def open_registry(args: argparse.Namespace) -> Any:
    from ..client.registry import RegistryClient
    from ..config import Config
    from ..errors import ConfigError

    cfg = Config.from_env(registry_url=args.registry, registry_token=args.token)
    if cfg.registry_url is None:
        raise ConfigError("no registry configured: pass --registry URL or set KVAGENT_REGISTRY_URL")
    return RegistryClient(cfg.registry_url, cfg.registry_token)


def server_entry(module: str, name: str, what: str) -> Any:
    """``kvagent.server.<module>.<name>``, imported lazily; or an error saying ``what`` needs the extra."""
    try:
        return getattr(importlib.import_module(f"kvagent.server.{module}"), name)
    except ImportError as exc:
        raise KVAgentError(f"{what} needs the server extra: pip install 'kvagent[server]' ({exc})") from exc
