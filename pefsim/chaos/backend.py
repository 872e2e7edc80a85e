"""Where a chaos run's services live and how the nemesis reaches them.

LocalBackend: UV, HV and guests as local processes (pefsim.ops.stack), faults by signals, failpoints
and the fault proxies between HV and UV. The Docker backend (compose stack through the Docker SDK)
implements the same interface.
"""
from __future__ import annotations

import signal
from pathlib import Path

from pefsim.ops.stack import LocalStack, StackConfig


class LocalBackend:
    name = "local"
    supports_failpoints = True

    def __init__(self, run_dir: Path, *, proxies: bool, mutants: tuple[str, ...], abort_return: str,
                 pool_pages: int, insecure: bool = False, on_esm_failure: str = "os-term"):
        self.stack = LocalStack(StackConfig(run_dir=run_dir, proxies=proxies, mutants=mutants,
                                            abort_return=abort_return, pool_pages=pool_pages, insecure=insecure,
                                            on_esm_failure=on_esm_failure))

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.stack.start()

    def stop(self) -> dict:
        return self.stack.stop()

    @property
    def uv_addr(self) -> str:
        return self.stack.uv_addr

    @property
    def hv_addr(self) -> str:
        return self.stack.hv_addr

    def signing_key(self):
        return self.stack.signing_key()

    def tls(self, identity: str):
        return self.stack.tls(identity)

    def publish_metrics(self, addr: str) -> None:
        """Let the stack's Prometheus scrape the harness (job "chaos")."""
        self.stack.write_targets({"chaos": [addr]})

    def histories(self) -> dict[str, Path]:
        return {svc: self.stack.run_dir / f"{svc}.history.jsonl" for svc in ("uv", "hv")}

    # -- faults -----------------------------------------------------------------------------------

    def kill(self, svc: str) -> None:
        self.stack.procs[svc].kill()

    def pause(self, svc: str) -> None:
        self.stack.procs[svc].signal(signal.SIGSTOP)

    def cont(self, svc: str) -> None:
        self.stack.procs[svc].signal(signal.SIGCONT)

    def alive(self, svc: str) -> bool:
        return self.stack.procs[svc].alive

    def stopped(self, svc: str) -> bool:
        return self.stack.procs[svc].stopped

    def restart(self, svc: str, failpoints: tuple[str, ...] = ()) -> None:
        self.stack.restart(svc, failpoints)

    def net_fault(self, kind: str, value: float = 0.0) -> None:
        self.stack.proxy.set_fault(kind, value)

    def net_heal(self) -> None:
        self.stack.proxy.heal()

    # -- guests -----------------------------------------------------------------------------------

    def add_guest(self, name: str, mem_bytes: int, blob: bytes, extra: tuple[str, ...] = ()) -> str:
        return self.stack.add_guest(name, mem_bytes, blob, extra=extra)

    def kill_guest(self, name: str) -> None:
        self.kill(f"guest-{name}")

    def stop_guest(self, name: str) -> None:
        proc = self.stack.procs.pop(f"guest-{name}", None)
        if proc is not None:
            proc.stop()
