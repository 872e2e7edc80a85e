"""Prometheus metrics shared by the services: per-call counters and latency, one registry each.

Each service adds its own metrics in ``services/<svc>/metrics.py`` on top of :class:`ServiceMetrics`
and serves the registry on its own /metrics endpoint. Labels never carry an lpid or a GPA
(bounded cardinality): calls are labelled by call name and result name only.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               start_http_server)

from pefsim.abi import PAGE_SIZE
from pefsim.rpc import CallObserver

# From 0.5 ms to about 35 minutes, doubling: resolves a 16-page abort (milliseconds) and a
# 64 Ki-page one (minutes over per-page unary calls) alike.
LATENCY_BUCKETS = tuple(0.0005 * 2 ** k for k in range(23))
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ServiceMetrics(CallObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_start_time_seconds, RSS, CPU
        PlatformCollector(registry=self.registry)
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

    def prepare_call(self, call: str, results: list[str]) -> None:
        self.calls_running.labels(call)
        for reason in ("calls", "bytes", "arrival"):
            self.calls_refused.labels(call, reason)
        for result in results:
            self.calls.labels(call, result)
            self.call_seconds.labels(call, result)

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

    @staticmethod
    def zero(metric, *label_sets) -> None:
        """Create a labelled metric's children up front: a series that is born at 1 has no
        increase for rate() to see, so its first event would be lost to the dashboards."""
        for labels in label_sets:
            metric.labels(*labels if isinstance(labels, tuple) else (labels,))

    def serve(self, listen: str | None) -> int | None:
        """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound port."""
        if not listen:
            return None
        host, port = listen.rsplit(":", 1)
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return server.server_port
