"""A fault-injecting TCP proxy for the link between the HV and the UV (`tc netem` is not available
here, so faults are injected at the application level).

Faults, set and healed at any time:

  reset       every open connection is closed at once (RST-like), new ones are closed on accept
  blackhole   nothing is forwarded in either direction until healed (a partition: TCP keeps the
              data, as its retransmissions would, and delivers it after the heal)
  latency     each chunk waits ``value`` seconds before it is forwarded (order kept)
  bandwidth   forwarding is capped at ``value`` bytes per second per direction

Runs on its own event loop in a background thread, so a synchronous harness can use it.
"""
from __future__ import annotations

import asyncio
import threading
import time

FAULTS = ("reset", "blackhole", "latency", "bandwidth")
CHUNK = 256 << 10


class FaultProxy:
    def __init__(self, listen_port: int, target: tuple[str, int], host: str = "127.0.0.1"):
        self.host, self.listen_port, self.target = host, listen_port, target
        self.fault: str | None = None
        self.value: float = 0.0
        self.healed = asyncio.Event()
        self.healed.set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None
        self.bytes = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.listen_port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, self.host, self.listen_port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self._close_all()

    def _close_all(self) -> None:
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    def set_fault(self, fault: str | None, value: float = 0.0) -> None:
        """Called on the proxy's loop (see ProxyThread.set_fault)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown network fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault, self.value = fault, value
        if fault == "blackhole":
            self.healed.clear()
        else:
            self.healed.set()
        if fault == "reset":
            self._close_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.fault == "reset":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self.writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            await self.healed.wait()
            if self.fault == "latency":
                await asyncio.sleep(self.value)
            elif self.fault == "bandwidth" and self.value > 0:
                await asyncio.sleep(len(data) / self.value)
            if self.fault == "reset":
                break
            writer.write(data)
            self.bytes += len(data)
            await writer.drain()
        writer.transport.abort()


class ProxyThread:
    """Proxies running on a private event loop in a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxies", daemon=True)
        self.proxies: dict[str, FaultProxy] = {}
        self.thread.start()

    def _call(self, coro_or_fn, *args):
        if asyncio.iscoroutinefunction(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn(*args), self.loop).result(10)
        done = threading.Event()
        out = {}

        def run():
            out["v"] = coro_or_fn(*args)
            done.set()
        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        return out.get("v")

    def add(self, name: str, listen_port: int, target: tuple[str, int]) -> FaultProxy:
        proxy = FaultProxy(listen_port, target)
        self._call(proxy.start)
        self.proxies[name] = proxy
        return proxy

    def set_fault(self, fault: str | None, value: float = 0.0) -> float:
        """Apply a fault to every proxy; returns the time it took effect."""
        for proxy in self.proxies.values():
            self._call(proxy.set_fault, fault, value)
        return time.time()

    def heal(self) -> float:
        return self.set_fault(None)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            self._call(proxy.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
