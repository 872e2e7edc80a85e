"""The Ultravisor core: its state (the secure memory pool, the SVMs), its port to the HV and its
call table. services/ultravisor/server.py wires it to gRPC; pefsim/local.py to an HV core in the
same process. No module of the core imports grpc (tests/unit/test_layers.py).

    ultravisor.py  Ultravisor, UvConfig
    svm.py         UV_ESM (starts the ESM context), UV_SVM_TERMINATE, UvStatus
    esm.py         the ESM context: INIT_START, page-in, checks, INIT_DONE, or the abort
    page.py        UV_PAGE_IN, UV_PAGE_OUT, UV_PAGE_INVAL; bulk.py: their streams
    memslot.py     UV_REGISTER_MEM_SLOT, UV_UNREGISTER_MEM_SLOT
    share.py       UV_SHARE_PAGE, UV_UNSHARE_PAGE, UvShareHvMemory
    access.py      the SVM's loads and stores (SvmLoad, SvmStore), evictions
    hv.py          the UV's hcalls through the port, and asking until answered
    guard.py       the SVM's lock taken through the call table's state re-check
    state.py       the pool, SVMs, GPF maps; metrics.py: the UV's Prometheus series
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pefsim.abi import EsmCopy, SvmState
from pefsim.blob import load_public_key
from pefsim.calltable import CallTable
from pefsim.history import History
from services.ultravisor import calltable
from services.ultravisor.core.metrics import UvMetrics
from services.ultravisor.core.state import UvState
from services.ultravisor.ports import HvPort


@dataclass
class UvConfig:
    listen: str = "127.0.0.1:0"
    hv: str = ""
    pool_pages: int = 4096
    lazy_pool: bool = False  # pool frames resident on first use instead of at start
    esm_copy: int = EsmCopy.ESM_COPY_ALL
    trusted_key: Path | None = None
    history: str | None = None
    metrics_listen: str | None = None
    ready_file: str | None = None
    hcall_timeout_s: float = 30.0  # an hcall of the ESM context that takes longer failed
    abort_attempt_timeout_s: float = 30.0  # one H_SVM_INIT_ABORT attempt; then it is made again
    transfer: str = "stream"  # ESM page-in: "stream" (HSvmPageInBulk) or "unary" (H_SVM_PAGE_IN a page)
    tls: object = None  # pefsim.tls.Tls (mTLS) or None (insecure)
    max_svms: int = 256  # SVM objects at once; UV_ESM beyond it: U_RETRY (allocation failure)
    max_svm_pages: int = 1 << 20  # secure memory one SVM may reserve (64 GiB); beyond: U_PARAMETER
    max_inflight_per_peer: int = 128  # concurrent calls from one identity
    max_svms_per_owner: int = 32  # SVMs one guest identity may hold at once (UV_ESM beyond: U_RETRY)
    hv_memory_dir: str | None = None  # the HV's data directory as the UV sees it; None: no shared memory
    svm_hcalls: str = "firmware"  # an SVM's H_SVM_* hcalls: reflected to the HV ("firmware") or "filter"ed


class Ultravisor:
    """The UV's state, configuration and call table, and its port to the HV (``attach``:
    ports.HvPort); handlers take it first."""

    hv: HvPort | None = None  # until attach

    def __init__(self, cfg: UvConfig):
        self.cfg = cfg
        self.state = UvState(cfg.pool_pages, populate_pool=not cfg.lazy_pool, hv_memory_dir=cfg.hv_memory_dir)
        self.hvmem = self.state.hvmem
        self.trusted = load_public_key(cfg.trusted_key) if cfg.trusted_key else None
        self.metrics = UvMetrics(self.state)
        self.history = History(cfg.history, "uv")
        self.table = CallTable(service=self, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
                               state_of=calltable.state_of, observer=self.metrics, history=self.history,
                               owner_of=calltable.owner_of, absent_state=SvmState.SVM_ABSENT)

    def attach(self, hv: HvPort) -> "Ultravisor":
        """Give the core its port to the HV (an adapter's)."""
        self.hv = hv
        return self

    async def close(self) -> None:
        if self.hv is not None:
            await self.hv.close()
        self.history.close()
