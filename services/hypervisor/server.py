"""The Hypervisor process: build_server() and main().

    python -m services.hypervisor --listen 127.0.0.1:7102 --uv 127.0.0.1:7101 --data-dir /tmp/hv
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from pefsim import rpc
from pefsim.abi import AbortReturn, Role, U, rc_name
from pefsim.v1 import guest_pb2_grpc, hypervisor_pb2, ultravisor_pb2 as upb, ultravisor_pb2_grpc
from services.hypervisor import calltable
from services.hypervisor.errors import UvUnreachable
from services.hypervisor.metrics import HvMetrics
from services.hypervisor.state import HvState, Vm

log = logging.getLogger("pefsim.hv")


@dataclass
class HvConfig:
    listen: str = "127.0.0.1:0"
    uv: str = ""
    data_dir: Path = Path("hv-data")
    abort_return: int = AbortReturn.ABORT_RETURN_GUEST
    history: str | None = None
    metrics_listen: str | None = None
    ready_file: str | None = None


class Hypervisor:
    """The HV's state, its peers (the UV, each guest's vCPU) and configuration."""

    def __init__(self, cfg: HvConfig):
        self.cfg = cfg
        self.state = HvState(cfg.data_dir)
        self.uv = rpc.Peer(cfg.uv, Role.ROLE_HV, ultravisor_pb2_grpc.UltravisorServiceStub)
        self.vcpus: dict[int, rpc.Peer] = {}
        self.metrics = HvMetrics(self.state)
        self.history = rpc.History(cfg.history, "hv")
        self.dispatcher = rpc.Dispatcher(
            service=self, service_descriptor=hypervisor_pb2.DESCRIPTOR.services_by_name["HypervisorService"],
            pb2=hypervisor_pb2, calls=calltable.CALLS, state_table=calltable.STATE_TABLE,
            state_of=calltable.state_of, observer=self.metrics, history=self.history)

    async def ucall(self, name: str, request):
        """Make an ultracall; raises UvUnreachable on a transport failure."""
        try:
            return await getattr(self.uv.stub, name)(request)
        except grpc.aio.AioRpcError as exc:
            log.error("%s: UV unreachable (%s)", name, exc.code().name)
            raise UvUnreachable(name) from None

    async def terminate(self, vm: Vm, trigger: str) -> int:
        """UV_SVM_TERMINATE for the VM; returns its result (U_FUNCTION when the UV could not be
        reached: the call did not happen)."""
        t0 = time.perf_counter()
        try:
            rc = (await self.ucall("UV_SVM_TERMINATE", upb.UvSvmTerminateRequest(lpid=vm.lpid))).rc
        except UvUnreachable:
            rc = U.U_FUNCTION
        self.metrics.terminate_seconds.labels(trigger, rc_name(rc, U)).observe(time.perf_counter() - t0)
        return rc

    def vcpu(self, vm: Vm) -> rpc.Peer:
        peer = self.vcpus.get(vm.lpid)
        if peer is None:
            peer = self.vcpus[vm.lpid] = rpc.Peer(vm.vcpu_endpoint, Role.ROLE_HV,
                                                  guest_pb2_grpc.GuestServiceStub)
        return peer

    async def forget_vcpu(self, lpid: int) -> None:
        peer = self.vcpus.pop(lpid, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        await self.uv.close()
        for lpid in list(self.vcpus):
            await self.forget_vcpu(lpid)
        self.history.close()


async def build_server(cfg: HvConfig) -> tuple[grpc.aio.Server, int, Hypervisor]:
    hv = Hypervisor(cfg)
    server, port = await rpc.start_server(cfg.listen, [hv.dispatcher.generic_handler()])
    return server, port, hv


def parse_args(argv=None) -> HvConfig:
    ap = argparse.ArgumentParser(prog="pefsim-hv", description="pefsim Hypervisor service")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    ap.add_argument("--uv", required=True, help="host:port of the Ultravisor service")
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="directory for guest RAM and VM state (file-backed)")
    ap.add_argument("--abort-return", choices=["guest", "uv"], default="guest",
                    help="H_SVM_INIT_ABORT returns to the guest (merged kernel, default) or to "
                         "the UV (the v10 proposal)")
    ap.add_argument("--history", help="append a JSON line per served call to this file")
    ap.add_argument("--metrics-listen", help="host:port for /metrics (port 0 picks one)")
    ap.add_argument("--ready-file", help="write {pid, port, metrics_port} here once serving")
    a = ap.parse_args(argv)
    return HvConfig(listen=a.listen, uv=a.uv, data_dir=a.data_dir,
                    abort_return=AbortReturn[f"ABORT_RETURN_{a.abort_return.upper()}"],
                    history=a.history, metrics_listen=a.metrics_listen, ready_file=a.ready_file)


async def serve(cfg: HvConfig) -> None:
    server, port, hv = await build_server(cfg)
    metrics_port = hv.metrics.serve(cfg.metrics_listen)
    log.info("hypervisor serving on %s (port %d), uv %s, data %s, abort returns to %s",
             cfg.listen, port, cfg.uv, cfg.data_dir, AbortReturn(cfg.abort_return).name)
    rpc.write_ready_file(cfg.ready_file, port=port, metrics_port=metrics_port)
    await rpc.serve_until_signalled(server, hv.close)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hv %(levelname)s %(message)s")
    rpc.run(lambda: serve(cfg))
