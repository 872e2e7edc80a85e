"""The HV core's ports: how its protocol logic reaches the UV and each guest's vCPU. The core
(services/hypervisor/core/) calls out only through these; an adapter implements them over gRPC
(adapters/grpc.py, what ships) or in one process (pefsim/local.py, the UV core called directly).

Every outgoing message is a protobuf message of the ABI (protos/pefsim/v1), so both adapters
carry exactly what travels on the wire.

    UvPort      the ucalls the HV makes (UV_REGISTER_MEM_SLOT, UV_UNREGISTER_MEM_SLOT, UV_PAGE_IN,
                UV_PAGE_OUT, UV_PAGE_INVAL, UV_SVM_TERMINATE, UvShareHvMemory), the bulk page
                streams (UvPageInStream, UvPageOutStream) and UvStatus (the UV's boot id)
    VcpuPort    the guest's vCPU: VcpuResume (HRFID after an hcall), MachineCheck

An adapter reports the boot id of every answer from the UV to the ``on_boot`` callback it was
given (Hypervisor.uv_answered): an answer from a UV that restarted since raises UvReset there.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Protocol

from pefsim.transport import Unreachable


class UvUnreachable(Unreachable):
    """A ucall failed in transport: the UV is down or unreachable (it may or may not have acted)."""


class UvReset(UvUnreachable):
    """The answer came from a UV that restarted since (a machine reset): the state a VM kept in
    the UV is gone. The HV fails those VMs; the caller stops what it was doing for one."""


class VcpuUnreachable(Unreachable):
    """A call to a guest's vCPU failed in transport."""


OnBoot = Callable[[str], None]  # told each answer's boot id; raises UvReset for a new boot


class UvPort(Protocol):
    async def ucall(self, name: str, request: Any, *, on_behalf: str, timeout: float) -> Any:
        """The ucall ``name`` (its ABI name) with ``request``; its answer. UvUnreachable when it
        failed in transport; UvReset (from on_boot) when a restarted UV answered."""

    def page_in_stream(self, frames: AsyncIterator[bytes], *, on_behalf: str,
                       timeout: float) -> AsyncIterator[Any]:
        """UvPageInStream: encoded PageInBatch frames in, one PageBatchResult per frame out."""

    def page_out_stream(self, request: Any, *, on_behalf: str, timeout: float) -> AsyncIterator[Any]:
        """UvPageOutStream: one PageOutRequest in, decoded PageOutBatch frames (header, payload) out."""

    async def status(self) -> Any:
        """UvStatus (the UV's boot id among it); UvUnreachable when it cannot be asked."""

    async def close(self) -> None: ...


class VcpuPort(Protocol):
    async def resume(self, vm: Any, request: Any, *, timeout: float) -> Any:
        """VcpuResume on ``vm``'s vCPU (waits for it to be reachable up to ``timeout``);
        VcpuUnreachable on a transport failure."""

    async def machine_check(self, vm: Any, request: Any, *, timeout: float) -> None:
        """MachineCheck to ``vm``'s vCPU; VcpuUnreachable on a transport failure."""

    async def forget(self, lpid: int) -> None:
        """The VM is gone: drop what the port kept for its vCPU (a channel)."""

    async def close(self) -> None: ...
