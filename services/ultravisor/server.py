"""The Ultravisor process: the UV core (core/) wired to gRPC: build_server() and main().

    python -m services.ultravisor --listen 127.0.0.1:7101 --hv 127.0.0.1:7102 \\
        --pool-pages 4096 --trusted-key esm-signing.pub
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from pefsim import faults, rpc, tls
from pefsim.abi import EsmCopy
from pefsim.v1 import ultravisor_pb2
from services.ultravisor.adapters.grpc import GrpcHv
from services.ultravisor.core.state import scrub_in_background
from services.ultravisor.core.ultravisor import UvConfig, Ultravisor

log = logging.getLogger("pefsim.uv")


async def build_server(cfg: UvConfig) -> tuple[grpc.aio.Server, int, Ultravisor]:
    """The UV core with its gRPC port to the HV, served by a Dispatcher of its call table."""
    uv = Ultravisor(cfg).attach(GrpcHv(cfg.hv, cfg.tls))
    dispatcher = rpc.Dispatcher(table=uv.table, pb2=ultravisor_pb2, boot_id=uv.state.boot_id,
                                service_descriptor=ultravisor_pb2.DESCRIPTOR.services_by_name["UltravisorService"],
                                max_inflight_per_peer=cfg.max_inflight_per_peer)
    server, port = await rpc.start_server(cfg.listen, [dispatcher.generic_handler()], "pefsim.v1.UltravisorService",
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
    ap.add_argument("--svm-hcalls", choices=["firmware", "filter"], default="firmware",
                    help="an SVM's H_SVM_* hcalls: reflected to the HV as the open Ultravisor does (default) "
                         "or refused with H_FUNCTION by the UV, as the kernel's MSR[S] check assumes")
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
                    history=a.history, metrics_listen=a.metrics_listen, ready_file=a.ready_file,
                    svm_hcalls=a.svm_hcalls)


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
