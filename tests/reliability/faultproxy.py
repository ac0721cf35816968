"""A loopback TCP proxy that injects faults between a client and the registry server.

Modes: ``delay`` holds every upstream→client chunk for ``delay`` seconds (a slow or hung registry);
``cut`` forwards only ``cut_after`` bytes of each response stream and then drops the connection (a
server killed mid-download, from the client's point of view); ``on_cut``, if set, runs at that moment
(a test kills the real server there); ``down`` closes every connection at once (a registry that is down);
``lie`` flips bytes of every response past its first 4 KiB (a registry serving corrupted blobs); ``throttle``
passes the first ``free_bytes`` of each response stream at once and the rest at ``rate`` bytes/s (a slow link
that still answers small requests quickly). The mode may change while the proxy runs; ``connections`` counts
the connections accepted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.registry_server import free_port

LIE_AFTER = 4096  # bytes of each response ``lie`` passes unchanged


@dataclass
class FaultProxy:
    upstream_port: int
    mode: str = "pass"
    delay: float = 0.0
    cut_after: int = 0
    on_cut: Callable[[], None] | None = None
    rate: float = 0.0
    free_bytes: int = 8192

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "down":
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._open.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, downstream: bool) -> None:
            sent = 0
            try:
                while data := await src.read(65536 if self.mode != "throttle" else 16384):
                    if downstream and self.mode == "delay":
                        await asyncio.sleep(self.delay)
                    if downstream and self.mode == "cut":
                        data = data[: max(0, self.cut_after - sent)]
                        if not data:
                            if self.on_cut is not None:
                                self.on_cut()
                            break
                    if downstream and self.mode == "throttle" and sent + len(data) > self.free_bytes:
                        await asyncio.sleep((sent + len(data) - max(sent, self.free_bytes)) / self.rate)
                    if downstream and self.mode == "lie" and sent + len(data) > LIE_AFTER:
                        # flip bytes deep in the body (past the HTTP headers and the artifact's own header)
                        buf = bytearray(data)
                        for i in range(max(0, LIE_AFTER - sent), len(buf), 997):
                            buf[i] ^= 0x5A
                        data = bytes(buf)
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))
        self._open.difference_update((writer, up_w))

    def go_down(self) -> None:
        """From now on ``down``, and every connection open through the proxy dropped."""

        async def drop() -> None:
            self.mode = "down"
            for w in list(self._open):
                w.close()

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # let cancelled transports finish closing

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
