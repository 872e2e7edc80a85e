"""The guest core's ports: how its boot program reaches the HV (as the VM's VMM and vCPU) and
the UV (its ultracalls). services/guest/core/ calls out only through them; adapters/grpc.py
implements them over gRPC (what ships), services/local.py in one process.

    Calls   ``call(name, request, timeout=, wait=)``: one RPC of the service by its name (the
            ABI's for ucalls), its answer; ``stream(name, request)``: a server stream (VmSession)
            as an async iterator. A transport failure is Unreachable, naming how.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from pefsim.transport import Unreachable

__all__ = ["Calls", "Unreachable"]




class Calls(Protocol):
    async def call(self, name: str, request: Any, *, timeout: float | None = None, wait: bool = False) -> Any:
        """``wait``: wait for the service to be reachable before sending (up to ``timeout``)."""

    def stream(self, name: str, request: Any) -> AsyncIterator[Any]: ...

    async def close(self) -> None: ...
