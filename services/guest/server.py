"""A guest process: build_server() and main().

    python -m services.guest --name g1 --mem-mib 4 --hv 127.0.0.1:7102 --uv 127.0.0.1:7101 \\
        --blob g1.blob
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc

from pefsim import rpc
from pefsim.abi import PAGE_SIZE
from pefsim.v1 import guest_pb2
from services.guest import calltable
from services.guest.metrics import GuestMetrics
from services.guest.program import GuestConfig, GuestProgram

log = logging.getLogger("pefsim.guest")


async def build_server(cfg: GuestConfig, listen: str, history: str | None = None
                       ) -> tuple[grpc.aio.Server, int, GuestProgram, GuestMetrics]:
    metrics = GuestMetrics()
    server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    guest = GuestProgram(cfg, endpoint=f"{rpc.host_of(listen)}:{port}", metrics=metrics)
    dispatcher = rpc.Dispatcher(
        service=guest, service_descriptor=guest_pb2.DESCRIPTOR.services_by_name["GuestService"],
        pb2=guest_pb2, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
        state_of=calltable.state_of, observer=metrics, history=rpc.History(history, f"guest:{cfg.name}"))
    server.add_generic_rpc_handlers([dispatcher.generic_handler()])
    await server.start()
    return server, port, guest, metrics


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="pefsim-guest", description="pefsim guest (VMM + vCPU)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--mem-mib", type=float, default=4.0, help="guest memory in MiB (64 KiB pages)")
    ap.add_argument("--hv", required=True, help="host:port of the Hypervisor service")
    ap.add_argument("--uv", required=True, help="host:port of the Ultravisor service")
    ap.add_argument("--blob", type=Path, help="ESM blob file (placed in guest memory)")
    ap.add_argument("--no-svm", action="store_true", help="boot as a normal VM (no UV_ESM)")
    ap.add_argument("--no-secure-capable", action="store_true",
                    help="do not enable KVM_CAP_PPC_SECURE_GUEST (INIT_START -> H_AUTHORITY)")
    ap.add_argument("--measured-only", action="store_true",
                    help="the UV runs with --esm-copy measured: expect unmeasured pages zeroed")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port for the Guest service")
    ap.add_argument("--advertise", help="host:port the HV should use to reach this guest")
    ap.add_argument("--resume-timeout", type=float, default=120.0,
                    help="seconds the vCPU waits for a resume after UV_ESM")
    ap.add_argument("--hv-wait", type=float, default=60.0,
                    help="seconds the guest waits for an unreachable HV to come back")
    ap.add_argument("--boot", action="store_true", help="run the boot program at start")
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    mem_bytes = int(a.mem_mib * (1 << 20))
    if mem_bytes % PAGE_SIZE:
        ap.error("--mem-mib must be a multiple of 64 KiB")
    blob = a.blob.read_bytes() if a.blob else b""
    return a, GuestConfig(name=a.name, mem_bytes=mem_bytes, hv=a.hv, uv=a.uv, blob=blob,
                          svm=not a.no_svm, secure_capable=not a.no_secure_capable,
                          measured_only=a.measured_only, resume_timeout_s=a.resume_timeout,
                          hv_wait_s=a.hv_wait)


async def serve(a, cfg: GuestConfig) -> None:
    server, port, guest, metrics = await build_server(cfg, a.listen, a.history)
    if a.advertise:
        guest.endpoint = a.advertise
    metrics_port = metrics.serve(a.metrics_listen)
    log.info("guest %s serving on port %d (%d pages)", cfg.name, port, cfg.mem_bytes // PAGE_SIZE)
    rpc.write_ready_file(a.ready_file, port=port, metrics_port=metrics_port)
    if a.boot:
        guest.booting = asyncio.ensure_future(guest.boot())
    await rpc.serve_until_signalled(server, guest.close)


def main(argv=None) -> None:
    a, cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s guest:{cfg.name} %(levelname)s %(message)s")
    rpc.run(lambda: serve(a, cfg))
