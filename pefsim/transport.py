"""What a transport failure is, for every port of every core: one exception, whatever the
transport (gRPC in the services, the in-process adapter in services/local.py).

A call that failed in transport may or may not have been acted on by its callee; ``code`` names
how it failed, as a gRPC status code's name (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED,
PERMISSION_DENIED for a call that is not the caller's at all). Each port names its own subclass
(the HV's UvUnreachable, the UV's HvUnreachable, ...), so a core catches exactly its peer's.
The gRPC adapters make them with pefsim.rpc.unreachable (one translation of an AioRpcError)."""
from __future__ import annotations


class Unreachable(Exception):
    def __init__(self, what: str, code: str = "UNAVAILABLE", detail: str = ""):
        super().__init__(f"{what}: {code}{f' ({detail})' if detail else ''}")
        self.what, self.code, self.detail = what, code, detail
