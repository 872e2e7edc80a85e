"""A guest process: build_server() and main().

    python -m services.guest --name g1 --mem-mib 4 --hv 127.0.0.1:7102 --uv 127.0.0.1:7101 \\
        --blob g1.blob
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import logging
from pathlib import Path

import grpc

from pefsim import faults, rpc, tls
from pefsim.abi import PAGE_SIZE
from pefsim.calltable import CallTable
from pefsim.history import History
from pefsim.v1 import guest_pb2
from services.guest import calltable
from services.guest.adapters.grpc import GrpcCalls
from services.guest.core.metrics import GuestMetrics
from services.guest.core.program import GuestConfig, GuestProgram

log = logging.getLogger("pefsim.guest")


async def build_server(cfg: GuestConfig, listen: str, history: str | None = None
                       ) -> tuple[grpc.aio.Server, int, GuestProgram, GuestMetrics]:
    metrics = GuestMetrics()
    server, port = await rpc.new_server(listen, [], "pefsim.v1.GuestService", cfg.tls)
    guest = GuestProgram(cfg, endpoint=f"{rpc.host_of(listen)}:{port}", metrics=metrics,
                         hv=GrpcCalls("hv", cfg.hv, cfg.name, cfg.tls), uv=GrpcCalls("uv", cfg.uv, cfg.name, cfg.tls))
    table = CallTable(service=guest, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
                      state_of=calltable.state_of, observer=metrics, history=History(history, f"guest:{cfg.name}"))
    dispatcher = rpc.Dispatcher(table=table, pb2=guest_pb2,
                                service_descriptor=guest_pb2.DESCRIPTOR.services_by_name["GuestService"])
    server.add_generic_rpc_handlers([dispatcher.generic_handler()])
    await server.start()
    return server, port, guest, metrics


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="pefsim-guest", description="pefsim guest (VMM + vCPU)")
    ap.add_argument("--name", help="guest name (default: this host's name, e.g. a container's)")
    ap.add_argument("--identity", help="the mTLS identity to present (default guest:<name>)")
    ap.add_argument("--mem-mib", type=float, default=4.0, help="guest memory in MiB (64 KiB pages)")
    ap.add_argument("--hv", required=True, help="host:port of the Hypervisor service")
    ap.add_argument("--uv", required=True, help="host:port of the Ultravisor service")
    ap.add_argument("--blob", type=Path, help="ESM blob file (placed in guest memory)")
    ap.add_argument("--blob-hex", help="the ESM blob, hex-encoded (instead of --blob)")
    ap.add_argument("--self-sign", type=Path, metavar="KEY",
                    help="make this guest's blob with this Ed25519 private key (compose's scaled "
                         "guests; normally the owner signs the blob, not the guest)")
    ap.add_argument("--no-svm", action="store_true", help="boot as a normal VM (no UV_ESM)")
    ap.add_argument("--no-secure-capable", action="store_true",
                    help="do not enable KVM_CAP_PPC_SECURE_GUEST (INIT_START -> H_AUTHORITY)")
    ap.add_argument("--measured-only", action="store_true",
                    help="the UV runs with --esm-copy measured: expect unmeasured pages zeroed")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port for the Guest service")
    ap.add_argument("--advertise", help="host:port the HV should use to reach this guest "
                    "(default: the listen address, or this host's name when listening on 0.0.0.0)")
    ap.add_argument("--resume-timeout", type=float, default=120.0,
                    help="seconds the vCPU waits for a resume after UV_ESM")
    ap.add_argument("--on-esm-failure", choices=("os-term", "continue"), default="os-term",
                    help="after a UV_ESM that did not switch to secure mode: os-term (Linux: the VMM stops "
                         "the VM, its memory stays with the HV) or continue as a normal VM")
    ap.add_argument("--hv-wait", type=float, default=60.0,
                    help="seconds the guest waits for an unreachable HV to come back")
    ap.add_argument("--boot", action="store_true", help="run the boot program at start")
    faults.add_argument(ap)
    tls.add_args(ap)
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    faults.configure(a.failpoint)
    a.name = a.name or socket.gethostname()
    mem_bytes = int(a.mem_mib * (1 << 20))
    if mem_bytes % PAGE_SIZE or mem_bytes <= 0:
        ap.error("--mem-mib must be a positive multiple of 64 KiB")
    if sum(x is not None for x in (a.blob, a.blob_hex, a.self_sign)) > 1:
        ap.error("give one of --blob, --blob-hex, --self-sign")
    if a.blob:
        blob = a.blob.read_bytes()
    elif a.blob_hex:
        try:
            blob = bytes.fromhex(a.blob_hex)
        except ValueError:
            ap.error("--blob-hex is not hex")
    elif a.self_sign:
        from pefsim.blob import load_private_key, make_blob
        from pefsim.image import GuestImage

        blob = make_blob(GuestImage.of_size(a.name, mem_bytes), load_private_key(a.self_sign))
    else:
        blob = b""
    return a, GuestConfig(name=a.name, mem_bytes=mem_bytes, hv=a.hv, uv=a.uv, blob=blob,
                          svm=not a.no_svm, secure_capable=not a.no_secure_capable,
                          measured_only=a.measured_only, resume_timeout_s=a.resume_timeout,
                          on_esm_failure=a.on_esm_failure,
                          hv_wait_s=a.hv_wait, tls=tls.from_args(ap, a, a.identity or f"guest:{a.name}"))


async def serve(a, cfg: GuestConfig) -> None:
    server, port, guest, metrics = await build_server(cfg, a.listen, a.history)
    if a.advertise:
        guest.endpoint = a.advertise
    elif rpc.host_of(a.listen) in ("0.0.0.0", "[::]"):
        guest.endpoint = f"{socket.gethostname()}:{port}"
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
