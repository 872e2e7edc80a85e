"""``pefsim demo``: the secure-VM life cycle, four guests, on a local stack.

  secure     goes secure; exercises secure stores, share/unshare, a host touch of a secure page
             (the host sees only ciphertext) and reads everything back through the UV
  aborted    its ESM blob does not match its kernel: abort -> H_PARAMETER, memory intact; then, as
             Linux's prom_init does, ibm,os-term: its VMM stops it and its memory, read through
             the host, stays with the HV until it is destroyed (--on-esm-failure continue: it
             carries on as a normal VM)
  terminated goes secure, checks its memory, is destroyed (UV_SVM_TERMINATE)
  reset      goes secure, checks its memory, is reset (KVM_PPC_SVM_OFF)

At the end every VM is destroyed and the UV must hold no secure page.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pefsim import rpc
from pefsim.abi import PAGE_SIZE, Errno, GfnState, H, Role, U, rc_name
from pefsim.blob import make_blob
from pefsim.image import GuestImage
from pefsim.ops.stack import LocalStack
from pefsim.v1 import guest_pb2, guest_pb2_grpc, hypervisor_pb2 as hpb, hypervisor_pb2_grpc
from pefsim.v1 import ultravisor_pb2 as upb, ultravisor_pb2_grpc

SCENARIOS = ("secure", "aborted", "terminated", "reset")


@dataclass
class GuestResult:
    name: str
    expected: str
    outcome: str = "unknown"
    esm_rc: int = 0
    memory_intact: bool = False
    abort_latency_s: float | None = None
    terminate_latency_s: float | None = None
    esm_failure: str = ""  # why the UV says the ESM failed
    checks: list[str] = field(default_factory=list)  # what the demo verified, "ok ..." / "FAIL ..."

    def check(self, ok: bool, what: str) -> bool:
        self.checks.append(("ok   " if ok else "FAIL ") + what)
        return ok

    def as_json(self) -> dict:
        return {"name": self.name, "outcome": self.outcome, "esm_rc": self.esm_rc,
                "memory_intact": self.memory_intact, "abort_latency_s": self.abort_latency_s,
                "terminate_latency_s": self.terminate_latency_s, "esm_failure": self.esm_failure,
                "checks": self.checks}


class Operator:
    """The operator's view of a stack: stubs to the UV, the HV and each guest."""

    def __init__(self, uv: str, hv: str, tls=None):
        self.tls = tls
        self.uv = rpc.Peer(uv, Role.ROLE_OPERATOR, ultravisor_pb2_grpc.UltravisorServiceStub, "demo", tls, "uv")
        self.hv = rpc.Peer(hv, Role.ROLE_OPERATOR, hypervisor_pb2_grpc.HypervisorServiceStub, "demo", tls, "hv")
        self.guests: dict[str, rpc.Peer] = {}

    @classmethod
    def of(cls, stack) -> "Operator":
        """The operator of a stack (a LocalStack or a compose backend), with its credentials."""
        return cls(stack.uv_addr, stack.hv_addr, stack.tls("operator"))

    def guest(self, name: str, addr: str | None = None):
        if addr is not None:
            self.guests[name] = rpc.Peer(addr, Role.ROLE_OPERATOR, guest_pb2_grpc.GuestServiceStub, "demo",
                                         self.tls, "guest")
        return self.guests[name].stub

    async def close(self) -> None:
        for peer in [self.uv, self.hv, *self.guests.values()]:
            await peer.close()


async def run_demo(stack: LocalStack, mem_bytes: int = 4 << 20, before_boot=None) -> dict:
    """The four scenarios; ``before_boot`` (a coroutine function) runs once every guest process
    is up and before any boots (the observability tests wait for a first scrape there)."""
    key = stack.signing_key()
    op = Operator.of(stack)
    events: list[tuple[int, str, str]] = []
    results = {name: GuestResult(name=f"g-{name}", expected=name) for name in SCENARIOS}
    policy = ""
    try:
        pool_before = (await op.uv.stub.UvStatus(upb.UvStatusRequest())).pool_pages_in_use
        for name, res in results.items():
            image = GuestImage.of_size(res.name, mem_bytes)
            override = {"kernel": "0" * 128} if name == "aborted" else None
            blob = make_blob(image, key, override=override)
            addr = await asyncio.to_thread(stack.add_guest, res.name, mem_bytes, blob)
            op.guest(res.name, addr)
        if before_boot is not None:
            await before_boot()
        reports = await asyncio.gather(*(op.guest(r.name).Boot(guest_pb2.BootRequest())
                                         for r in results.values()))
        lpids = {}
        for res, boot in zip(results.values(), reports):
            rep = boot.report
            lpids[res.expected] = rep.lpid
            res.outcome, res.esm_rc, res.memory_intact = rep.outcome, rep.esm_rc, rep.memory_intact
            res.esm_failure = rep.esm_failure
            res.abort_latency_s = rep.abort_latency_s if rep.abort_latency_s >= 0 else None
            events += [(e.unix_ns, res.name, e.what) for e in rep.timeline]
            want = "aborted" if res.expected == "aborted" else "secure"
            res.check(rep.outcome == want, f"boot outcome {rep.outcome} (want {want}), "
                      f"UV_ESM -> {esm_rc_name(rep.esm_rc, rep.outcome)}")
            res.check(rep.memory_intact, f"memory intact after boot ({rep.pages_checked} pages)")
            if res.expected == "aborted":
                policy = rep.on_esm_failure
                if policy == "os-term":
                    res.check(rep.os_term, "ibm,os-term after the failed UV_ESM: the VMM stopped the VM, "
                                           "its memory read through the host")

        def note(name: str, what: str) -> None:
            events.append((time.time_ns(), results[name].name, what))

        # secure: exercise its calls, let the host touch a secure page, read everything back
        sec = results["secure"]
        ex = await op.guest(sec.name).Exercise(guest_pb2.ExerciseRequest())
        for step in ex.steps:
            note("secure", step)
        sec.check(ex.ok, "share / unshare / secure stores")
        image = GuestImage.of_size(sec.name, mem_bytes)
        touched = image.data_start + PAGE_SIZE
        host = await op.hv.stub.HostReadPage(hpb.HostReadPageRequest(lpid=lpids["secure"], gpa=touched))
        plain = image.page(touched // PAGE_SIZE)
        sec.check(host.errno == Errno.OK and host.state == GfnState.GFN_SECURE_OUT
                  and host.data != plain, "host touch of a secure page yields ciphertext only")
        note("secure", f"host touched gpa 0x{touched:x}: page paged out, host sees ciphertext")
        rep = (await op.guest(sec.name).Verify(guest_pb2.VerifyRequest())).report
        sec.memory_intact = sec.check(rep.memory_intact, "memory intact through the UV after the "
                                      "host touch (paged back in and decrypted)")

        # terminated: destroy the secure VM
        term = results["terminated"]
        resp = await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpids["terminated"]))
        term.terminate_latency_s = resp.terminate_latency_s
        term.check(resp.errno == Errno.OK and resp.terminated and resp.terminate_rc == U.U_SUCCESS,
                   f"DestroyVm issued UV_SVM_TERMINATE -> {rc_name(resp.terminate_rc, U)}")
        term.outcome = "terminated" if resp.terminated else term.outcome
        note("terminated", f"destroyed: UV_SVM_TERMINATE in {resp.terminate_latency_s * 1e3:.1f} ms")

        # reset: KVM_PPC_SVM_OFF while secure (vCPUs stopped first, as QEMU does)
        rst = results["reset"]
        await op.hv.stub.StopVm(hpb.StopVmRequest(lpid=lpids["reset"]))
        resp = await op.hv.stub.ResetVm(hpb.ResetVmRequest(lpid=lpids["reset"]))
        status = await op.hv.stub.HvStatus(hpb.HvStatusRequest())
        vm = next(v for v in status.vms if v.lpid == lpids["reset"])
        rst.check(resp.errno == Errno.OK and vm.state == "VM_NORMAL"
                  and vm.gfns_by_state["GFN_NORMAL"] == vm.npages,
                  f"ResetVm -> {Errno(resp.errno).name}, VM normal, secure contents dropped")
        rst.outcome = "reset" if resp.errno == Errno.OK else rst.outcome
        note("reset", "reset (KVM_PPC_SVM_OFF): secure pages dropped, memslots unregistered, terminated")

        uv = await op.uv.stub.UvStatus(upb.UvStatusRequest())
        for name in ("aborted", "terminated", "reset"):
            results[name].check(lpids[name] in uv.terminated_lpids and
                                all(s.lpid != lpids[name] for s in uv.svms),
                                "the UV holds nothing of the SVM after UV_SVM_TERMINATE")
        # tear down what is left, then the UV must be back where it started
        for name in ("secure", "aborted", "reset"):
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=lpids[name]))
        uv = await op.uv.stub.UvStatus(upb.UvStatusRequest())
        in_use = uv.pool_pages_in_use - pool_before
    finally:
        await op.close()
    events.sort()
    return {"guests": [r.as_json() for r in results.values()], "uv_secure_pages_in_use": in_use,
            "guest_policy": policy, "run_dir": str(_histories_dir(stack) or "(in the containers)"),
            "aborted_calls": abort_sequence(stack, lpids.get("aborted", 0)),
            "_results": results, "_events": events}


def _histories_dir(stack) -> Path | None:
    """Where a local stack's services write their call histories; None for a compose stack (they
    are in its containers)."""
    if not hasattr(stack, "attached"):
        return None
    return stack.home


def abort_sequence(stack, lpid: int) -> list[dict]:
    """The aborted guest's calls across the processes, in time order, from the UV's and the HV's
    call histories: who served what (the HV's own ucalls to the UV too), and the result; a run of
    the same call collapsed into one line with its count."""
    base = _histories_dir(stack)
    if base is None:
        return []
    found = []
    for svc in ("uv", "hv"):
        path = base / f"{svc}.history.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("lpid") != lpid or not e.get("call") or e.get("dir") == "out":
                continue  # (the HV's own record of a ucall it made: the UV's line says the same)
            where = f"{e.get('caller', '').removeprefix('ROLE_').lower()} -> {svc}"
            start = e["t"] - e.get("dur_s", 0.0)  # lines are written as calls end: order by start
            found.append((start, where, e["call"], e.get("rc_name") or e.get("error") or ""))
    seq: list[dict] = []
    for t, where, call, rc in sorted(found):
        if seq and (seq[-1]["where"], seq[-1]["call"], seq[-1]["result"]) == (where, call, rc):
            seq[-1]["count"] += 1
            continue
        seq.append({"t": t, "where": where, "call": call, "result": rc, "count": 1})
    return seq


def sequence_lines(seq: list[dict]) -> list[str]:
    """abort_sequence's calls, one line each: seconds from the first, who served it, the call,
    its result and how many in a row."""
    t0 = seq[0]["t"] if seq else 0.0
    return [f"{s['t'] - t0:8.3f}s  {s['where']:<14} {s['call']:<24} {s['result']}"
            + (f"  x{s['count']}" if s["count"] > 1 else "") for s in seq]


def esm_rc_name(rc: int, outcome: str) -> str:
    """UV_ESM's result: a U_* code, or the H_PARAMETER an abort delivers."""
    return rc_name(rc, H if outcome == "aborted" else U)


def write_timeline(stack, summary: dict, out: Path) -> Path:
    """The demo's four guests as a timeline page (pefsim/timeline): every call of the UV, the HV
    and the guests from their histories, with each guest's own events."""
    from pefsim.timeline import from_stack, render_html

    guests = {r.name: {"name": r.name, "report": {"outcome": r.outcome, "timeline": [
        {"unixNs": ns, "what": what} for ns, who, what in summary["_events"] if who == r.name]}}
        for r in summary["_results"].values()}
    model = from_stack(sorted({stack.home, stack.run_dir}), guests, title="pefsim demo: secure, aborted, terminated, reset")
    out = Path(out)
    out.write_text(render_html(model))
    return out


def render(summary: dict) -> str:
    """The timeline and the summary table, for people."""
    lines = ["Timeline", "--------"]
    if summary["_events"]:
        t0 = summary["_events"][0][0]
        for ns, who, what in summary["_events"]:
            lines.append(f"{(ns - t0) / 1e9:8.3f}s  {who:<14} {what}")
    lines += ["", "Checks", "------"]
    for res in summary["_results"].values():
        lines += [f"{res.name:<14} {c}" for c in res.checks]
    lines += ["", f"{'guest':<14} {'outcome':<11} {'UV_ESM rc':<13} {'memory':<8} "
                  f"{'abort':>10} {'terminate':>10}"]
    for g in summary["guests"]:
        fmt = lambda v: "-" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        lines.append(f"{g['name']:<14} {g['outcome']:<11} {esm_rc_name(g['esm_rc'], g['outcome']):<13} "
                     f"{'intact' if g['memory_intact'] else 'DAMAGED':<8} "
                     f"{fmt(g['abort_latency_s']):>10} {fmt(g['terminate_latency_s']):>10}")
    for g in summary["guests"]:
        if g["esm_failure"]:
            lines.append(f"{g['name']}: the UV aborted its ESM: {g['esm_failure']}")
    if summary["aborted_calls"]:
        lines += ["", "The aborted guest's calls, across the processes (from the UV's and the HV's call histories)", ""]
        lines += sequence_lines(summary["aborted_calls"])
    lines.append(f"\nUV secure pages in use at the end: {summary['uv_secure_pages_in_use']}")
    lines.append(f"run directory (logs, call histories, keys): {summary['run_dir']}")
    lines.append(f"after a failed UV_ESM the guests ran --on-esm-failure {summary['guest_policy']}"
                 + (" (Linux's prom_init: ibm,os-term)" if summary["guest_policy"] == "os-term" else ""))
    return "\n".join(lines)


def succeeded(summary: dict) -> bool:
    """Every memory intact, every outcome the scenario's, every check passed, nothing left."""
    return (all(g["memory_intact"] for g in summary["guests"])
            and all(r.outcome == r.expected for r in summary["_results"].values())
            and all(c.startswith("ok") for r in summary["_results"].values() for c in r.checks)
            and summary["uv_secure_pages_in_use"] == 0)


def public(summary: dict) -> str:
    return json.dumps({k: v for k, v in summary.items() if not k.startswith("_")}, indent=2)

