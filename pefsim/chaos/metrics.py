"""The chaos harness's own metrics (served with ``pefsim chaos --metrics-listen``): faults by kind
and the windows they were active in (the chaos dashboard draws them as annotations), runs,
violations by invariant, and recovery time."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pefsim.metrics import LATENCY_BUCKETS, ServiceMetrics


class ChaosMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.faults = Counter("pefsim_chaos_faults_total", "Faults injected, by kind.", ["kind"], registry=r)
        self.active = Gauge("pefsim_chaos_fault_active", "1 while a fault of this kind is in effect.",
                            ["kind"], registry=r)
        self.runs = Counter("pefsim_chaos_runs_total", "Chaos runs finished.", registry=r)
        self.violations = Counter("pefsim_chaos_violations_total", "Invariant violations found, by invariant.",
                                  ["invariant"], registry=r)
        self.recovery_seconds = Histogram("pefsim_chaos_recovery_seconds",
                                          "From a fault's heal to every guest in a final state.",
                                          buckets=LATENCY_BUCKETS, registry=r)

    def prepare(self, kind: str, invariants) -> None:
        """Make the series exist from the start (a labelled metric shows nothing until used)."""
        self.faults.labels(kind)
        self.active.labels(kind).set(0)
        for name in invariants:
            self.violations.labels(name)
