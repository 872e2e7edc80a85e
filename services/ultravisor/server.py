"""The Ultravisor process: build_server() and main().

    python -m services.ultravisor --listen 127.0.0.1:7101 --hv 127.0.0.1:7102 \\
        --pool-pages 4096 --trusted-key esm-signing.pub
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from pefsim import faults, rpc, tls
from pefsim.abi import EsmCopy, Role, SvmState
from pefsim.blob import load_public_key
from pefsim.v1 import hypervisor_pb2_grpc, ultravisor_pb2
from services.ultravisor import calltable
from services.ultravisor.metrics import UvMetrics
from services.ultravisor.state import UvState, scrub_in_background

log = logging.getLogger("pefsim.uv")


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


class Ultravisor:
    """The UV's state, its peer (the HV) and its configuration; handlers take it first."""

    def __init__(self, cfg: UvConfig):
        self.cfg = cfg
        self.state = UvState(cfg.pool_pages, populate_pool=not cfg.lazy_pool, hv_memory_dir=cfg.hv_memory_dir)
        self.hvmem = self.state.hvmem
        self.hv = rpc.Peer(cfg.hv, Role.ROLE_UV, hypervisor_pb2_grpc.HypervisorServiceStub, "uv", cfg.tls, "hv")
        self.trusted = load_public_key(cfg.trusted_key) if cfg.trusted_key else None
        self.metrics = UvMetrics(self.state)
        self.history = rpc.History(cfg.history, "uv")
        self.dispatcher = rpc.Dispatcher(
            service=self, service_descriptor=ultravisor_pb2.DESCRIPTOR.services_by_name["UltravisorService"],
            pb2=ultravisor_pb2, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
            state_of=calltable.state_of, observer=self.metrics, history=self.history,
            boot_id=self.state.boot_id, owner_of=calltable.owner_of, absent_state=SvmState.SVM_ABSENT,
            max_inflight_per_peer=cfg.max_inflight_per_peer)

    async def close(self) -> None:
        await self.hv.close()
        self.history.close()


async def build_server(cfg: UvConfig) -> tuple[grpc.aio.Server, int, Ultravisor]:
    uv = Ultravisor(cfg)
    server, port = await rpc.start_server(cfg.listen, [uv.dispatcher.generic_handler()], "pefsim.v1.UltravisorService",
                                          cfg.tls)
    return server, port, uv


def parse_args(argv=None) -> UvConfig:
    ap = argparse.ArgumentParser(prog="pefsim-uv", description="pefsim Ultravisor service")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    ap.add_argument("--hv", required=True, help="host:port of the Hypervisor service")
    ap.add_argument("--pool-pages", type=int, default=4096,
                    help="secure memory pool size in 64 KiB pages (default 4096 = 256 MiB), made "
                         "resident at start like firmware-reserved secure memory")
    ap.add_argument("--lazy-pool", action="store_true",
                    help="pool frames become resident on first use instead (less memory at start; "
                         "each first page-in into a frame pays its page faults)")
    ap.add_argument("--esm-copy", choices=["all", "measured"], default="all",
                    help="pages ESM copies: every GFN (default) or the measured regions only")
    ap.add_argument("--trusted-key", type=Path, required=True,
                    help="Ed25519 public key (PEM) that ESM blobs must be signed with")
    ap.add_argument("--transfer", choices=["stream", "unary"], default="stream",
                    help="ESM page-in in bulk (default) or one H_SVM_PAGE_IN per page (the kernel's way)")
    ap.add_argument("--max-svms", type=int, default=256, help="SVMs at once (UV_ESM beyond: U_RETRY)")
    ap.add_argument("--max-svms-per-owner", type=int, default=32,
                    help="SVMs one guest identity may hold at once (UV_ESM beyond: U_RETRY)")
    ap.add_argument("--max-svm-pages", type=int, default=1 << 20,
                    help="secure memory one SVM may reserve, in pages (beyond: U_PARAMETER)")
    ap.add_argument("--max-inflight-per-peer", type=int, default=128,
                    help="concurrent calls one identity may have in flight (beyond: RESOURCE_EXHAUSTED)")
    ap.add_argument("--abort-attempt-timeout", type=float, default=30.0,
                    help="seconds one H_SVM_INIT_ABORT attempt may take before it is made again")
    ap.add_argument("--hcall-timeout", type=float, default=30.0,
                    help="seconds any other hcall may take before it failed (HV unreachable)")
    ap.add_argument("--hv-memory-dir",
                    help="the HV's data directory as this UV sees it: the only place the UV opens the "
                         "guest RAM files the HV offers (shared memory); without it pages travel in the stream")
    faults.add_argument(ap)
    tls.add_args(ap)
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    if a.pool_pages < 0:
        ap.error("--pool-pages must be >= 0")
    faults.configure(a.failpoint)
    return UvConfig(abort_attempt_timeout_s=a.abort_attempt_timeout, transfer=a.transfer,
                    hcall_timeout_s=a.hcall_timeout, hv_memory_dir=a.hv_memory_dir,
                    tls=tls.from_args(ap, a, "uv"), max_svms=a.max_svms, max_svms_per_owner=a.max_svms_per_owner, max_svm_pages=a.max_svm_pages,
                    max_inflight_per_peer=a.max_inflight_per_peer, listen=a.listen, hv=a.hv, pool_pages=a.pool_pages,
                    lazy_pool=a.lazy_pool,
                    esm_copy=EsmCopy[f"ESM_COPY_{a.esm_copy.upper()}"], trusted_key=a.trusted_key,
                    history=a.history, metrics_listen=a.metrics_listen, ready_file=a.ready_file)


async def serve(cfg: UvConfig) -> None:
    server, port, uv = await build_server(cfg)
    metrics_port = uv.metrics.serve(cfg.metrics_listen)
    log.info("ultravisor serving on %s (port %d), pool %d pages (%s), hv %s", cfg.listen, port,
             cfg.pool_pages, uv.state.pool.residency, cfg.hv)
    rpc.write_ready_file(cfg.ready_file, port=port, metrics_port=metrics_port, boot_id=uv.state.boot_id)
    scrubber = asyncio.ensure_future(scrub_in_background(uv.state.pool))
    try:
        await rpc.serve_until_signalled(server, uv.close)
    finally:
        scrubber.cancel()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s uv %(levelname)s %(message)s")
    cfg = parse_args(argv)
    rpc.run(lambda: serve(cfg))
