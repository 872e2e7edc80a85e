"""Prometheus metrics shared by the services: per-call counters and latency, one registry each.

Each service adds its own metrics in ``services/<svc>/metrics.py`` on top of :class:`ServiceMetrics`
and serves the registry on its own /metrics endpoint. Labels never carry an lpid or a GPA
(bounded cardinality): calls are labelled by call name and result name only.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Generic, TypeVar

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, start_http_server)

import pefsim
from pefsim.abi import PAGE_SIZE
from pefsim.calltable import CallObserver

# From 0.5 ms to about 35 minutes, doubling: resolves a 16-page abort (milliseconds) and a
# 64 Ki-page one (minutes over per-page unary calls) alike.
LATENCY_BUCKETS = tuple(0.0005 * 2 ** k for k in range(23))
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

T = TypeVar("T")


class LoopSnapshot(Generic[T]):
    """What a gauge reports of the state the event loop owns, taken on the loop.

    prometheus-client calls a gauge's function in its HTTP server's thread while the loop changes
    the state it reads: counting ``state.vms`` there as the loop added a VM raised "dictionary
    changed size during iteration", an HTTP 500 (2 of 1,343 scrapes during VM churn). So no
    collector touches that state: ``take`` runs on the loop, where nothing changes under it, and
    returns an immutable value (tuples, ints), published by one attribute assignment; the
    gauges compute from ``get()``. A scrape asks the loop for a fresh value and waits up to
    ``timeout`` s for it; the gauges of one scrape share it (``max_age``). A loop too busy to
    answer in time gets its last value served, stale rather than an error, and is not asked
    again until it has answered (a scrape waits once, not once per gauge). Unbound (no loop was
    running when it was made, nor when serve() ran) or on the loop itself, ``take`` runs in the
    caller's thread, which is then the state's owner."""

    def __init__(self, take: Callable[[], T], max_age: float = 0.1, timeout: float = 1.0):
        self._take = take
        self.max_age = max_age
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asking = threading.Lock()  # one request to the loop at a time
        self._answered = threading.Event()  # the last request's answer is in (or none was made)
        self._answered.set()
        self._taken = (time.monotonic(), take())  # (when, value): replaced whole, never changed
        try:
            self.bind(asyncio.get_running_loop())
        except RuntimeError:
            pass

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _refresh(self) -> None:
        try:
            self._taken = (time.monotonic(), self._take())
        finally:
            self._answered.set()

    def get(self) -> T:
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._taken = (time.monotonic(), self._take())
            return self._taken[1]
        with self._asking:
            taken_at, value = self._taken
            if time.monotonic() - taken_at <= self.max_age or not self._answered.is_set():
                return value  # fresh enough, or the loop has not answered the last request yet
            self._answered.clear()
            try:
                loop.call_soon_threadsafe(self._refresh)
            except RuntimeError:  # the loop is closed: the service is stopping
                self._answered.set()
                return value
            self._answered.wait(self.timeout)
            return self._taken[1]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ServiceMetrics(CallObserver):
    def __init__(self) -> None:
        self._registry = CollectorRegistry()
        self._unborn: list[tuple[Any, tuple[str, ...]]] = []  # children to create at 0 (zero)
        self.snapshots: list[LoopSnapshot] = []  # bound to the loop serve() runs on
        ProcessCollector(registry=self.registry)  # process_start_time_seconds, RSS, CPU
        PlatformCollector(registry=self.registry)
        Info("pefsim_build", "What this process runs: pefsim's version and its gRPC and protobuf libraries'.",
             registry=self.registry).info({"version": pefsim.version(), "grpcio": pefsim.version("grpcio"),
                                           "protobuf": pefsim.version("protobuf")})
        self.calls = Counter("pefsim_calls_total", "Calls served, by call and PEF result.",
                             ["call", "result"], registry=self.registry)
        self.call_seconds = Histogram("pefsim_call_duration_seconds",
                                      "Time to serve a call, by call and PEF result.", ["call", "result"],
                                      buckets=CALL_BUCKETS, registry=self.registry)
        self.calls_running = Gauge("pefsim_calls_in_flight", "Handlers running now, by call.", ["call"],
                                   registry=self.registry)
        self.calls_refused = Counter(
            "pefsim_calls_refused_total", "Calls turned away by the per-identity bounds, by call and "
            "reason (calls: too many in flight; bytes: too many request bytes; arrival: no request in time).",
            ["call", "reason"], registry=self.registry)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry, every zeroed series in it: a reader (/metrics, a test) sees them all."""
        self._born()
        return self._registry

    def _born(self) -> None:
        """Create the children ``zero`` asked for. Deferred until someone reads the registry: a
        Histogram's child costs ~40 us (its buckets), a service has hundreds, and a core that is
        never scraped (in process, the simulator's thousands of runs) never needs them."""
        unborn, self._unborn = self._unborn, []
        for metric, labels in unborn:
            metric.labels(*labels)

    def prepare_call(self, call: str, results: list[str]) -> None:
        self.zero(self.calls_running, call)
        self.zero(self.calls_refused, *((call, reason) for reason in ("calls", "bytes", "arrival")))
        self.zero(self.calls, *((call, result) for result in results))
        self.zero(self.call_seconds, *((call, result) for result in results))

    def call_running(self, call: str, delta: int) -> None:
        self.calls_running.labels(call).inc(delta)

    def observe_refused(self, call: str, reason: str) -> None:
        self.calls_refused.labels(call, reason).inc()

    def observe_batch(self, call: str, result: str, count: int) -> None:
        self.calls.labels(call, result).inc(count)

    def observe_call(self, call: str, result: str, seconds: float) -> None:
        self.calls.labels(call, result).inc()
        self.call_seconds.labels(call, result).observe(seconds)

    def page_counters(self, service: str, moved_by: str, directions: tuple[str, ...]) -> None:
        """pefsim_<service>_pages_total and _page_bytes_total by direction, their children bound
        once: ``moved`` runs for every page of a bulk transfer."""
        self.pages = Counter(f"pefsim_{service}_pages_total",
                             f"Pages moved {moved_by}, by direction ({', '.join(directions)}).",
                             ["direction"], registry=self.registry)
        self.page_bytes = Counter(f"pefsim_{service}_page_bytes_total",
                                  f"Bytes of page data moved {moved_by}, by direction.", ["direction"],
                                  registry=self.registry)
        self._moved = {d: (self.pages.labels(d), self.page_bytes.labels(d)) for d in directions}

    def moved(self, direction: str, pages: int = 1) -> None:
        count, size = self._moved[direction]
        count.inc(pages)
        size.inc(pages * PAGE_SIZE)

    def snapshot(self, take: Callable[[], T]) -> LoopSnapshot[T]:
        """A :class:`LoopSnapshot` of ``take``: every gauge whose function reads loop-owned state
        reads it through one of these, never the state itself."""
        snap = LoopSnapshot(take)
        self.snapshots.append(snap)
        return snap

    def zero(self, metric, *label_sets) -> None:
        """Have a labelled metric's children exist at 0 before their first event: a series that
        is born at 1 has no increase for rate() to see, so its first event would be lost to the
        dashboards. They are made when the registry is first read (``registry``)."""
        self._unborn += [(metric, labels if isinstance(labels, tuple) else (labels,)) for labels in label_sets]

    def serve(self, listen: str | None) -> int | None:
        """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound port."""
        if not listen:
            return None
        loop = _running_loop()
        for snap in self.snapshots if loop else ():
            snap.bind(loop)
        host, port = listen.rsplit(":", 1)
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return server.server_port
