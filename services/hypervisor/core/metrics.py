"""The Hypervisor's metrics (on top of the per-call ones in pefsim/metrics.py)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pefsim.abi import VmState
from pefsim.metrics import LATENCY_BUCKETS, ServiceMetrics
from services.hypervisor.core.state import QUARANTINE_REASONS


class HvMetrics(ServiceMetrics):
    def __init__(self, state) -> None:
        super().__init__()
        r = self.registry
        self.abort_seconds = Histogram(
            "pefsim_hv_abort_duration_seconds",
            "H_SVM_INIT_ABORT from entry to the guest's resume (or the return to the UV), by outcome.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.abort_phase_seconds = Histogram(
            "pefsim_hv_abort_phase_duration_seconds",
            "Each phase of H_SVM_INIT_ABORT: page-out (every secure page back), terminate "
            "(UV_SVM_TERMINATE until answered), resume (the guest's vCPU); a phase an HV restart "
            "interrupted is timed again from the restart.", ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.terminate_seconds = Histogram(
            "pefsim_hv_terminate_duration_seconds",
            "UV_SVM_TERMINATE as issued by the HV, by trigger (abort, reset, destroy) and result.",
            ["trigger", "result"], buckets=LATENCY_BUCKETS, registry=r)
        self.page_counters("hv", "by the HV", ("in", "out"))
        self.vms_recovered = Counter("pefsim_hv_vms_recovered_total",
                                     "VMs rebuilt from the data directory after a restart.", registry=r)
        self.aborts_resumed = Counter("pefsim_hv_aborts_resumed_total",
                                      "Interrupted aborts finished after a restart.", registry=r)
        self.uv_resets = Counter("pefsim_hv_uv_resets_total",
                                 "UV restarts noticed (its secure memory is gone).", registry=r)
        self.vms_failed = Counter("pefsim_hv_vms_failed_total", "VMs the HV failed, by reason.",
                                  ["reason"], registry=r)
        for reason in ("uv-reset", "page-lost"):
            self.vms_failed.labels(reason)
        self.vms_quarantined = Counter(
            "pefsim_hv_vms_quarantined_total",
            "VMs whose files failed the checks at start (an empty or damaged vm.json, a short RAM or "
            "GFN-state file, a bad GFN byte, no space to reserve): kept under quarantine/, not served.",
            ["reason"], registry=r)
        for reason in QUARANTINE_REASONS:
            self.vms_quarantined.labels(reason)
        self.pages_lost = Counter(
            "pefsim_hv_pages_lost_total",
            "Secure pages the UV paged out in an answer the HV lost (killed or cut off before writing "
            "it) with no shared memory to find it in: the VM fails with a machine check.", registry=r)
        self.zero(self.abort_seconds, "resumed", "duplicate", "not-waiting", "guest-unreachable",
                  "returned-to-uv", "cancelled")
        self.zero(self.abort_phase_seconds, "page-out", "terminate", "resume")
        self.zero(self.terminate_seconds, *((trigger, result) for trigger in ("abort", "reset", "destroy")
                                            for result in ("U_SUCCESS", "U_FUNCTION", "U_PERMISSION")))
        # Counted from a snapshot the loop takes: the gauge runs in the /metrics thread, the loop
        # changes state.vms meanwhile (pefsim/metrics.py).
        states = self.snapshot(lambda: tuple(vm.state for vm in state.vms.values()))
        vms = Gauge("pefsim_hv_vms", "VMs, by state.", ["state"], registry=r)
        for st in (VmState.VM_NORMAL, VmState.VM_TRANSIENT, VmState.VM_SECURE, VmState.VM_ABORTING):
            vms.labels(st.name).set_function(lambda st=st: states.get().count(st))

