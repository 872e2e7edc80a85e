"""The Ultravisor's metrics (on top of the per-call ones in pefsim/metrics.py)."""
from __future__ import annotations

from typing import NamedTuple

from prometheus_client import Counter, Gauge, Histogram

from pefsim import clock
from pefsim.abi import SvmState
from pefsim.metrics import LATENCY_BUCKETS, ServiceMetrics


class UvMetrics(ServiceMetrics):
    def __init__(self, state) -> None:
        super().__init__()
        r = self.registry
        self.abort_seconds = Histogram(
            "pefsim_uv_abort_duration_seconds",
            "From issuing H_SVM_INIT_ABORT to the HV's answer, by outcome (resumed-by-hv, returned-to-uv, "
            "refused, terminated-by-hv).", ["outcome"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.esm_seconds = Histogram(
            "pefsim_uv_esm_duration_seconds", "UV_ESM from entry to its end, by outcome.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.page_in_seconds = Histogram(
            "pefsim_uv_esm_page_in_duration_seconds",
            "ESM's page-in of the whole guest (ESM_COPY_ALL), by transfer.", ["transfer"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.esm_failures = Counter(
            "pefsim_uv_esm_failures_total", "ESM attempts that went to the abort path, by reason.",
            ["reason"], registry=r)
        self.hcall_retries = Counter(
            "pefsim_uv_hcall_retries_total",
            "H_SVM_INIT_DONE / H_SVM_INIT_ABORT attempts made again after a transport failure.",
            ["call"], registry=r)
        unanswered = Gauge(
            "pefsim_uv_hcall_unanswered_seconds",
            "Age of the oldest H_SVM_INIT_DONE / H_SVM_INIT_ABORT the UV is still asking the HV "
            "(first attempt to now; 0: none). An HV that never answers INIT_DONE shows here: the "
            "SVM stays in SVM_ACTIVE meanwhile.", ["call"], registry=r)
        # The gauges below read the SVMs and the pool through a snapshot the loop takes: they run
        # in the /metrics thread, the loop changes state.svms meanwhile (pefsim/metrics.py).
        snap = self.snapshot(lambda: UvSample.of(state))
        for call in ("H_SVM_INIT_DONE", "H_SVM_INIT_ABORT"):
            self.hcall_retries.labels(call)  # exported at 0 before the first retry
            unanswered.labels(call).set_function(lambda call=call: max(
                [(clock.wall_ns() - since) / 1e9 for _, asking, since, _ in snap.get().svms
                 if asking == call] or [0.0]))
        pending = Gauge("pefsim_uv_abort_pending_seconds",
                        "Age of the oldest SVM waiting in SVM_ABORT for the HV (0: none).", registry=r)
        pending.set_function(lambda: max(
            [(clock.wall_ns() - issued) / 1e9 for st, _, _, issued in snap.get().svms
             if st == SvmState.SVM_ABORT and issued] or [0.0]))
        self.terminate_seconds = Histogram(
            "pefsim_uv_terminate_duration_seconds",
            "UV_SVM_TERMINATE's work in the UV (free every page; the scrub is done in the background), "
            "by SVM state.",
            ["state"], buckets=LATENCY_BUCKETS, registry=r)
        self.page_counters("uv", "through the UV", ("in", "out", "shared"))
        # no "hv-unreachable": the UV asks again until an HV answers (hv.hcall_until_answered);
        # an HV that never does shows in pefsim_uv_hcall_unanswered_seconds, not here
        self.zero(self.abort_seconds, "resumed-by-hv", "returned-to-uv", "refused", "terminated-by-hv")
        self.zero(self.esm_seconds, "secure", "aborted")
        self.zero(self.terminate_seconds, *(s.name for s in (SvmState.SVM_ACTIVE, SvmState.SVM_SECURE,
                                                              SvmState.SVM_ABORT)))
        pool = Gauge("pefsim_uv_secure_pages", "Secure memory pool, in 64 KiB pages, by kind.",
                     ["kind"], registry=r)
        for kind in PoolSample._fields:
            pool.labels(kind).set_function(lambda kind=kind: getattr(snap.get().pool, kind))
        svms = Gauge("pefsim_uv_svms", "SVM objects, by state.", ["state"], registry=r)
        for st in (SvmState.SVM_ACTIVE, SvmState.SVM_SECURE, SvmState.SVM_ABORT):
            svms.labels(st.name).set_function(
                lambda st=st: sum(1 for s in snap.get().svms if s[0] == st))


class PoolSample(NamedTuple):
    total: int
    in_use: int
    reserved: int
    free: int
    scrubbing: int


class UvSample(NamedTuple):
    """What the UV's gauges report, taken on the event loop in one go (so the pool's kinds add
    up): per SVM (state, hcall it is still asking or "", since (ns), H_SVM_INIT_ABORT issued (ns))."""

    svms: tuple[tuple[int, str, int, int], ...]
    pool: PoolSample

    @classmethod
    def of(cls, state) -> UvSample:
        p = state.pool
        return cls(tuple((s.state, *(s.unanswered or ("", 0)), s.abort_issued_ns) for s in state.svms.values()),
                   PoolSample(p.total, p.in_use, p.reserved, p.free, p.scrubbing))

