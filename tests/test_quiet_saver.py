"""QuietSaver: prompt-KV saves wait for a quiet server, but never longer than max_wait_s, and none is lost."""

from __future__ import annotations

import threading
import time

from kvagent.server.chat import QuietSaver


class _Service:
    def __init__(self) -> None:
        self.active = False

    def busy(self) -> bool:
        return self.active


def test_a_save_waits_for_quiet_and_runs_then() -> None:
    svc = _Service()
    saver = QuietSaver(svc, quiet_s=0.2, max_wait_s=10)  # type: ignore[arg-type]
    done = threading.Event()
    svc.active = True
    saver.submit(done.set)
    assert not done.wait(0.5), "saved while a request was running"
    svc.active = False
    t0 = time.monotonic()
    saver.poke()
    assert done.wait(5)
    assert time.monotonic() - t0 >= 0.15  # after the quiet period, not at once


def test_a_busy_server_still_saves_after_max_wait_and_flush_waits_for_all() -> None:
    svc = _Service()
    svc.active = True  # never quiet
    saver = QuietSaver(svc, quiet_s=0.2, max_wait_s=0.5)  # type: ignore[arg-type]
    ran: list[int] = []
    t0 = time.monotonic()
    for i in range(3):
        saver.submit(lambda i=i: ran.append(i))
    assert saver.flush(10)
    assert ran == [0, 1, 2] and time.monotonic() - t0 >= 0.45


def test_a_failing_save_is_logged_and_the_next_one_runs(caplog) -> None:  # type: ignore[no-untyped-def]
    svc = _Service()
    saver = QuietSaver(svc, quiet_s=0.0, max_wait_s=1)  # type: ignore[arg-type]
    ran = threading.Event()

    def broken() -> None:
        raise RuntimeError("disk on fire")

    saver.submit(broken)
    saver.submit(ran.set)
    assert ran.wait(5) and saver.flush(5)
    assert "saving a prompt KV failed" in caplog.text


def test_pending_saves_are_bounded() -> None:
    svc = _Service()
    svc.active = True
    saver = QuietSaver(svc, quiet_s=0.1, max_wait_s=60, max_pending=2)  # type: ignore[arg-type]
    ran: list[int] = []
    for i in range(4):
        saver.submit(lambda i=i: ran.append(i))
    svc.active = False
    saver.poke()
    assert saver.flush(5)
    assert ran == [2, 3]  # the two oldest were dropped, with a log line
