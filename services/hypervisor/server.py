"""The Hypervisor process: the HV core (core/) wired to gRPC: build_server() and main().

    python -m services.hypervisor --listen 127.0.0.1:7102 --uv 127.0.0.1:7101 --data-dir /tmp/hv

Configuration, the data directory's lock, the core's gRPC ports (adapters/grpc.py) and the
dispatcher of its call table; no protocol logic (that is core/).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import grpc

from pefsim import faults, rpc, tls
from pefsim.abi import AbortReturn
from pefsim.v1 import hypervisor_pb2
from services.hypervisor.adapters.grpc import GrpcUv, GrpcVcpus
from services.hypervisor.core.hypervisor import HvConfig, Hypervisor

log = logging.getLogger("pefsim.hv")


class DataDirBusy(SystemExit):
    """Another HV holds this data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir/hv.lock`` (flock) for the process's life: two HVs on one data directory
    would each rebuild, journal and scrub the same VMs' files under the other. The lock goes with
    the process, kill -9 included. Returns the descriptor (kept open); a held lock exits with a
    one-line message naming the holder."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "hv.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusy(f"pefsim-hv: {data_dir} is in use by an HV (pid {holder}); "
                          "give each HV its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def build_server(cfg: HvConfig) -> tuple[grpc.aio.Server, int, Hypervisor]:
    """The HV core with gRPC ports to the UV and the vCPUs, recovered from its data directory,
    served by a Dispatcher of its call table."""
    lock_data_dir(Path(cfg.data_dir))  # held until the process ends
    hv = Hypervisor(cfg)
    hv.attach(GrpcUv(cfg.uv, cfg.tls, hv.uv_answered), GrpcVcpus(cfg.tls))
    hv.recover()
    dispatcher = rpc.Dispatcher(table=hv.table, pb2=hypervisor_pb2,
                                service_descriptor=hypervisor_pb2.DESCRIPTOR.services_by_name["HypervisorService"])
    server, port = await rpc.start_server(cfg.listen, [dispatcher.generic_handler()], "pefsim.v1.HypervisorService",
                                          cfg.tls)
    hv.start_background()
    return server, port, hv


def parse_args(argv=None) -> HvConfig:
    ap = argparse.ArgumentParser(prog="pefsim-hv", description="pefsim Hypervisor service")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    ap.add_argument("--uv", required=True, help="host:port of the Ultravisor service")
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="directory for guest RAM and VM state (file-backed; survives restarts)")
    ap.add_argument("--abort-return", choices=["guest", "uv"], default="guest",
                    help="H_SVM_INIT_ABORT returns to the guest (merged kernel, default) or to "
                         "the UV (the v10 proposal)")
    ap.add_argument("--session-grace", type=float, default=10.0,
                    help="after a restart, seconds a VMM has to reconnect before its VM is destroyed")
    ap.add_argument("--max-vms-per-owner", type=int, default=16,
                    help="VMs one guest identity may hold (operators share one quota); beyond: ENOMEM")
    ap.add_argument("--max-pages-per-owner", type=int, default=1 << 20,
                    help="guest memory one owner may hold, in 64 KiB pages (default 64 GiB); beyond: ENOMEM")
    ap.add_argument("--unattached-grace", type=float, default=30.0,
                    help="seconds a guest's VM may live without its VMM ever opening a session")
    ap.add_argument("--resume-retry", type=float, default=60.0,
                    help="seconds an abort keeps trying to resume an unreachable guest")
    ap.add_argument("--transfer", choices=["stream", "unary"], default="stream",
                    help="abort page-out as bulk streams (default) or one UV_PAGE_OUT per page")
    ap.add_argument("--shared-memory", choices=["auto", "off"], default="auto",
                    help="offer the UV this HV's RAM files (default: auto, used when it can open them)")
    faults.add_argument(ap)
    tls.add_args(ap)
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    faults.configure(a.failpoint)
    return HvConfig(listen=a.listen, uv=a.uv, data_dir=a.data_dir,
                    abort_return=AbortReturn[f"ABORT_RETURN_{a.abort_return.upper()}"],
                    history=a.history, metrics_listen=a.metrics_listen, ready_file=a.ready_file,
                    session_grace_s=a.session_grace, resume_retry_s=a.resume_retry,
                    transfer=a.transfer, shared_memory=a.shared_memory == "auto",
                    max_vms_per_owner=a.max_vms_per_owner, max_pages_per_owner=a.max_pages_per_owner,
                    unattached_grace_s=a.unattached_grace,
                    tls=tls.from_args(ap, a, "hv"))


async def serve(cfg: HvConfig) -> None:
    server, port, hv = await build_server(cfg)
    metrics_port = hv.metrics.serve(cfg.metrics_listen)
    log.info("hypervisor serving on %s (port %d), uv %s, data %s, abort returns to %s",
             cfg.listen, port, cfg.uv, cfg.data_dir, AbortReturn(cfg.abort_return).name)
    rpc.write_ready_file(cfg.ready_file, port=port, metrics_port=metrics_port, boot_id=hv.state.boot_id)

    def before_stop() -> None:
        hv.stopping = True  # sessions ending now are the HV's, not their VMMs': keep the VMs

    await rpc.serve_until_signalled(server, hv.close, before_stop=before_stop)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hv %(levelname)s %(message)s")
    cfg = parse_args(argv)
    rpc.run(lambda: serve(cfg))
