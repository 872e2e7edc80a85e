"""A guest's metrics: the end-to-end view of its UV_ESM (on top of the per-call ones)."""
from __future__ import annotations

from prometheus_client import Histogram

from pefsim.metrics import LATENCY_BUCKETS, ServiceMetrics


class GuestMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.abort_e2e_seconds = Histogram(
            "pefsim_guest_abort_e2e_seconds",
            "From the UV's H_SVM_INIT_ABORT to this guest's resume after UV_ESM, by who resumed it.",
            ["resumed_by"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.esm_seconds = Histogram(
            "pefsim_guest_esm_seconds", "UV_ESM as the guest sees it (sc 2 to resume), by outcome.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.zero(self.abort_e2e_seconds, "hv", "uv")
        self.zero(self.esm_seconds, "secure", "aborted", "failed")
