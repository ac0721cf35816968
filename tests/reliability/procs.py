"""Run one worker function in several spawned processes that start together and report back."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def _guarded(target: Callable[..., Any], *args: Any) -> None:  # runs in the spawned process
    out = args[-1]
    try:
        target(*args)
    except BaseException as exc:  # reported at once rather than left to the parent's timeout
        out.put(("error", repr(exc)))
        raise


def run_workers(target: Callable[..., Any], n: int, args_of: Callable[[int], tuple[Any, ...]],
                timeout: float = 300) -> list[Any]:
    """Start ``target(*args_of(i), barrier, out)`` in ``n`` spawned processes; return what each put on
    ``out``.

    ``target`` must be a module-level function (spawn pickles it by name) that waits on ``barrier``
    before its timed work and puts exactly one result on ``out``.
    """
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_guarded, args=(target, *args_of(i), barrier, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in procs]
    assert not [r for r in results if isinstance(r, tuple) and r[:1] == ("error",)], results
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results
