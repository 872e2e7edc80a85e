"""A fault-injecting TCP proxy for the link between the HV and the UV (`tc netem` is not available
here, so faults are injected at the application level).

Faults, set and healed at any time:

  reset       every open connection is closed at once (RST-like), new ones are closed on accept
  blackhole   nothing is forwarded in either direction until healed (a partition: TCP keeps the
              data, as its retransmissions would, and delivers it after the heal)
  latency     each chunk waits ``value`` seconds before it is forwarded (order kept)
  bandwidth   forwarding is capped at ``value`` bytes per second per direction

Two ways to run it: ``ProxyThread`` (its own event loop in a background thread, for the local
stack and a synchronous harness), and as a process of its own (the compose stack's ``netproxy``
service, between the UV and HV containers), steered through a Unix socket in its container:

    python -m pefsim.chaos.proxy serve --route 0.0.0.0:7111=uv:7101 --control /tmp/pefsim-netproxy.sock
    python -m pefsim.chaos.proxy set latency 0.02 --control /tmp/pefsim-netproxy.sock
    python -m pefsim.chaos.proxy heal --control ...     # or: status

The control socket takes one JSON line ({"fault": name or null, "value": number} or
{"status": true}) and answers one ({"ok": true, "t": when it took effect, "fault", "value",
"bytes"} or {"ok": false, "error": ...}). Only who can enter the container can reach it (the
Docker backend does, with ``docker exec``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

FAULTS = ("reset", "blackhole", "latency", "bandwidth")
CHUNK = 256 << 10


class FaultProxy:
    """One listening address forwarding to one target (resolved again for every connection, so a
    restarted container is found at its new address)."""

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


# -- as a process of its own ----------------------------------------------------------------------


def parse_route(text: str) -> tuple[str, int, str, int]:
    """LISTEN_HOST:PORT=TARGET_HOST:PORT"""
    try:
        listen, target = text.split("=")
        lhost, lport = listen.rsplit(":", 1)
        thost, tport = target.rsplit(":", 1)
        return lhost, int(lport), thost, int(tport)
    except ValueError:
        raise argparse.ArgumentTypeError(f"route {text!r}: expected LISTEN_HOST:PORT=TARGET_HOST:PORT") from None


def control_answer(proxies: list[FaultProxy], request: dict) -> dict:
    if request.get("status"):
        first = proxies[0]
        return {"ok": True, "t": time.time(), "fault": first.fault, "value": first.value,
                "bytes": sum(p.bytes for p in proxies)}
    fault, value = request.get("fault"), request.get("value", 0.0)
    try:
        for proxy in proxies:
            proxy.set_fault(fault, float(value))
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "t": time.time(), "fault": fault, "value": float(value),
            "bytes": sum(p.bytes for p in proxies)}


async def serve(routes: list[tuple[str, int, str, int]], control: str) -> None:
    proxies = [FaultProxy(lport, (thost, tport), host=lhost) for lhost, lport, thost, tport in routes]
    for proxy in proxies:
        await proxy.start()

    async def on_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                answer = control_answer(proxies, json.loads(line))
            except (json.JSONDecodeError, AttributeError) as exc:
                answer = {"ok": False, "error": f"not a JSON object: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    os.makedirs(os.path.dirname(control) or ".", exist_ok=True)
    if os.path.exists(control):
        os.unlink(control)
    server = await asyncio.start_unix_server(on_control, control)
    print(f"netproxy: {', '.join(f'{h}:{p} -> {th}:{tp}' for h, p, th, tp in routes)}; control {control}",
          flush=True)
    async with server:
        await server.serve_forever()


def ask(control: str, request: dict, timeout: float = 5.0) -> dict:
    """One request to a running proxy's control socket."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pefsim.chaos.proxy",
                                 description="pefsim's fault-injecting TCP proxy (HV <-> UV)")
    ap.add_argument("--control", default="/tmp/pefsim-netproxy.sock", help="its Unix control socket")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--route", type=parse_route, action="append", required=True,
                   help="LISTEN_HOST:PORT=TARGET_HOST:PORT (repeatable)")
    p = sub.add_parser("set", help="inject a fault")
    p.add_argument("fault", choices=FAULTS)
    p.add_argument("value", type=float, nargs="?", default=0.0, help="latency in s, bandwidth in bytes/s")
    sub.add_parser("heal", help="heal every fault")
    sub.add_parser("status", help="the fault in force and the bytes forwarded")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        try:
            asyncio.run(serve(a.route, a.control))
        except KeyboardInterrupt:
            pass
        return 0
    request = {"status": True} if a.cmd == "status" else {"fault": a.fault if a.cmd == "set" else None,
                                                         "value": getattr(a, "value", 0.0)}
    try:
        answer = ask(a.control, request)
    except OSError as exc:
        print(f"netproxy control {a.control}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
