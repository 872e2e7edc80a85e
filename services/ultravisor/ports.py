"""The UV core's port: how its protocol logic reaches the HV. The core (services/ultravisor/core/)
calls out only through it; adapters/grpc.py implements it over gRPC (what ships) and
pefsim/local.py in one process (the HV core called directly).

    HvPort   the hcalls the UV makes (H_SVM_INIT_START, H_SVM_PAGE_IN, HSvmPageInBulk,
             H_SVM_PAGE_OUT, H_SVM_INIT_DONE, H_SVM_INIT_ABORT), each naming the guest it serves
"""
from __future__ import annotations

from typing import Any, Protocol

from pefsim.transport import Unreachable


class HvUnreachable(Unreachable):
    """The hcall failed in transport: the HV died, froze or is cut off (it may or may not have
    acted)."""


class HvPort(Protocol):
    async def hcall(self, name: str, request: Any, *, on_behalf: str, timeout: float) -> Any:
        """The hcall ``name`` (its ABI name, or HSvmPageInBulk) with ``request``; its answer, or
        HvUnreachable. Waits for the HV to be reachable up to ``timeout``."""

    async def close(self) -> None: ...
