"""One simulated run: the real UV, HV and guest cores in one process (services/local.Machine) on
virtual time (loop.py) with seeded entropy, a fault drawn from the seed, and the chaos checkers
(pefsim/chaos/checker.py, the same code that judges real-process runs) on what was recorded.

A run: boot a bystander guest to secure; boot the victim (a blob that does not match: its ESM
aborts; or a good one: the fault lands in its ESM); the nemesis puts the plan's fault in place
(an HV crash at a failpoint or as a frame arrives, a lost answer on the HV<->UV link, a partition
of that link for a while); restart a crashed HV after a seeded downtime; wait (bounded, virtual)
for every guest to be final; read memory back (each guest checks its own), let the host touch a
secure page, destroy the run's VMs; then check every invariant on the record and the histories.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf import json_format

from pefsim import entropy, faults
from pefsim.abi import PAGE_SIZE, Errno, Role
from pefsim.blob import make_blob
from pefsim.calltable import Caller
from pefsim.chaos import checker
from pefsim.chaos.store import read_history
from pefsim.image import GuestImage, page_digest
from pefsim.sim import loop as vloop
from pefsim.v1 import hypervisor_pb2 as hpb, ultravisor_pb2 as upb

PAGES = 16  # a guest of 16 pages of 64 KiB (1 MiB)
MEM = PAGES * PAGE_SIZE
FINAL_BOUND_S = 90.0  # virtual seconds for every guest to be final after the last fault heals (as chaos)
FAULTS = ("none", "kill-hv", "lose", "partition", "reset-uv", "kill-guest", "hang", "hv-gone")
DURINGS = ("abort", "esm")
OPERATOR = Caller(Role.ROLE_OPERATOR, "operator")
ABORT_POINTS = ("hv.abort.page_out", "hv.abort.before_terminate", "hv.abort.before_resume")
DISK_POINT = "hv.disk.before_rename"  # a crash between a vm.json's fsync'd temporary and its rename
VM_JSON_WRITES = {"abort": 7, "esm": 4}  # how many times the victim's boot replaces its vm.json
# partition of the guest's host from the HV (both directions): at the resume of the aborted vCPU, or
# at the VMM's loading of its image; healed within the HV's resume retry and the guest's HV wait
GUEST_CUT_CALLS = {"abort": ("VcpuResume",), "esm": ("VcpuStore", "RunVm")}
CUT_CALLS = {"abort": ("H_SVM_INIT_ABORT", "UvPageOutStream", "UV_SVM_TERMINATE"),
             "esm": ("H_SVM_INIT_START", "UV_REGISTER_MEM_SLOT", "HSvmPageInBulk", "H_SVM_INIT_DONE")}
# hang: from this call of the victim's on, the HV answers nothing the UV asks for the victim (alive
# for every other guest); a late guest must still get to secure, and what the victim pins stay bounded
HANG_CALLS = {"abort": ("H_SVM_INIT_ABORT",), "esm": ("H_SVM_INIT_START", "HSvmPageInBulk", "H_SVM_INIT_DONE")}
HELD_FOR_S = 60.0  # how long (virtual s) the held SVM's pins are watched for growth
# the late guest's boot to secure while the HV ignores the victim (~0.05 s alone): a wait of the
# order of the UV's hcall timeout (30 s) means the held SVM's calls stood in the others' way
LATE_BOUND_S = 5.0
LOSABLE = {"uv->hv": ("H_SVM_INIT_ABORT", "H_SVM_INIT_DONE", "HSvmPageInBulk", "H_SVM_INIT_START"),
           "hv->uv": ("UvPageOutStream", "UvPageInStream", "UV_SVM_TERMINATE", "UV_REGISTER_MEM_SLOT"),
           "hv->guest": ("VcpuResume",),  # the HV's resume of an aborted guest's vCPU
           "guest->uv": ("UV_ESM",),  # the guest's `sc 2`
           "guest->hv": ("CreateVm", "RunVm", "VcpuStore")}  # the guest's VMM


@dataclass
class Plan:
    """What the nemesis does in one run, drawn from the run's seed alone."""

    seed: int
    fault: str
    during: str
    failpoint: str = ""  # kill-hv: a failpoint armed =crash
    arrival: tuple[str, int] = ("", 0)  # kill-hv: crash the HV as the n-th answer of this call arrives
    link: str = ""  # lose: a LOSABLE link; partition: "hv<->guest" ("": HV<->UV)
    lose: tuple[str, int] = ("", 0)  # lose: the n-th answer of this call
    cut_at: tuple[str, int] = ("", 0)  # partition: the link is cut as the n-th such call goes;
    # reset-uv: the UV is reset (a machine reset) as it goes; kill-guest: the victim is killed;
    # hang: from it on, the HV never answers the UV's calls for the victim
    for_s: float = 0.0  # partition: how long (virtual s); kill-hv: the HV's downtime
    again: str = ""  # kill-hv: a failpoint armed =crash in the restarted HV (a crash during recovery)

def plan_of(seed: int, faults_: tuple[str, ...] = FAULTS, durings: tuple[str, ...] = DURINGS) -> Plan:
    """The plan of run ``seed``: the same seed and the same choice of faults and moments give the
    same plan (each draw takes the same random numbers whatever the choice)."""
    rng = random.Random(seed)
    plan = Plan(seed, faults_[rng.randrange(len(FAULTS)) % len(faults_)],
                durings[rng.randrange(len(DURINGS)) % len(durings)])
    if plan.fault in ("kill-hv", "hv-gone"):
        downtime = round(rng.uniform(0.0, 5.0), 3)  # drawn for both, so the draws after it are the same
        plan.for_s = downtime if plan.fault == "kill-hv" else HELD_FOR_S  # hv-gone: a minute, then a new HV
        if rng.random() < 0.5:
            if plan.during == "abort":
                point = rng.choices(ABORT_POINTS + (DISK_POINT,), weights=(6, 2, 2, 2))[0]
                nth = rng.randint(1, PAGES) if point == "hv.abort.page_out" else 1
            else:
                point = rng.choice(("hv.esm.page_in", "hv.esm.init_done", DISK_POINT))
                nth = rng.randint(1, PAGES) if point == "hv.esm.page_in" else 1
            if point == DISK_POINT:
                nth = rng.randint(1, VM_JSON_WRITES[plan.during])
            plan.failpoint = f"{point}:{nth}@victim"
        else:
            calls = (("UvPageOutStream", 2), ("UV_SVM_TERMINATE", 1)) if plan.during == "abort" \
                else (("UvPageInStream", 2), ("UV_REGISTER_MEM_SLOT", 1))
            call, frames = rng.choice(calls)
            plan.arrival = (call, rng.randint(1, frames))
    elif plan.fault == "lose":
        plan.link = rng.choice(tuple(LOSABLE))
        plan.lose = (rng.choice(LOSABLE[plan.link]), 1)
    elif plan.fault == "hang":
        calls = HANG_CALLS[plan.during]
        plan.cut_at = (calls[rng.randrange(len(calls))], 1)
    elif plan.fault in ("partition", "reset-uv", "kill-guest"):
        calls = CUT_CALLS[plan.during]
        if plan.fault == "partition" and rng.random() < 0.25:  # the guest's host cut off from the HV
            plan.link, calls = "hv<->guest", GUEST_CUT_CALLS[plan.during]
        plan.cut_at = (calls[rng.randrange(len(calls))], 1)
        plan.for_s = round(rng.uniform(0.1, 10.0), 3)
    return plan


def _blob_hex(image: GuestImage, key, good: bool) -> str:
    return make_blob(image, key, override=None if good else {"kernel": "0" * 128}).hex()


async def _scenario(plan: Plan, root: Path, mutants: tuple[str, ...]) -> tuple[dict, dict]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.hypervisor.core.hypervisor import HvConfig
    from services.local import Machine
    from services.ultravisor.core.ultravisor import UvConfig

    key = Ed25519PrivateKey.from_private_bytes(entropy.token_bytes(32))
    m = Machine(HvConfig(data_dir=root / "hv", shared_memory=False, history=str(root / "hv.history.jsonl")),
                UvConfig(pool_pages=4 * PAGES, lazy_pool=True, history=str(root / "uv.history.jsonl")),
                trusted=key.public_key(), background=True)
    jitter = random.Random(plan.seed ^ 0x5EED)
    m.latency = m.uv_service.latency = lambda: jitter.uniform(0.0, 0.002)  # 0-2 ms a message, seeded
    m.start_hv()
    record = {"run": plan.seed, "plan": asdict(plan), "final_bound_s": FINAL_BOUND_S, "guests": {},
              "host_touches": [], "pool_before": 0}
    guests = {}
    for role, good in (("bystander", True), ("victim", plan.during != "abort")):
        image = GuestImage.of_size(role, MEM)
        blob = _blob_hex(image, key, good)
        guests[role] = m.add_guest(role, MEM, bytes.fromhex(blob))
        record["guests"][role] = {"name": role, "mem_bytes": MEM, "blob_hex": blob, "role": role}
    try:
        by = await asyncio.wait_for(guests["bystander"].boot(), FINAL_BOUND_S)
        record["guests"]["bystander"]["outcome"] = by.outcome
        with _nemesis(m, plan) as nemesis:
            victim = asyncio.ensure_future(guests["victim"].boot())
            fault = await _fault(m, plan, victim, nemesis)
        if "held" in fault:  # hv-gone: what the UV kept while no HV ran
            record["held"] = fault.pop("held")
        record["fault"] = fault
        held = fault["injected"] and plan.fault == "hang"
        if held:  # another guest gets to secure meanwhile, and the victim's pins are watched
            await _held(m, plan, key, record, guests)
        killed = fault["injected"] and plan.fault == "kill-guest"
        try:
            if killed:  # final once the HV destroyed its VM and the UV forgot its SVM
                lpid = guests["victim"].lpid
                await _until(lambda: m.hv is not None and lpid not in m.hv.state.vms
                             and lpid not in m.uv.state.svms, FINAL_BOUND_S)
            else:
                await asyncio.wait_for(asyncio.shield(victim), FINAL_BOUND_S)
        except TimeoutError:
            pass
        for role, g in guests.items():
            if role == "victim" and killed:
                gone = m.hv is not None and g.lpid not in m.hv.state.vms
                record["guests"][role]["outcome"] = "killed" if gone else "not-destroyed"
                continue
            rep = g.report
            if role == "victim" and held and rep.outcome not in checker.FINAL:
                record["guests"][role]["outcome"] = "held"  # judged by held-svm-bounded
                continue
            if rep.outcome == "secure":
                await g.verify()
                record["host_touches"].append(await _host_touch(m, record["guests"][role], rep.lpid))
            elif rep.outcome in ("aborted", "normal"):
                await g.verify()
            record["guests"][role]["report"] = json_format.MessageToDict(rep)
            record["guests"][role]["report"]["lpid"] = rep.lpid
            record["guests"][role]["outcome"] = rep.outcome if rep.outcome in checker.FINAL else "not-final"
        for g in guests.values():
            if g.lpid and m.hv is not None:
                await m.hv_call("DestroyVm", hpb.DestroyVmRequest(lpid=g.lpid), OPERATOR, timeout=FINAL_BOUND_S)
        if m.hv is not None:
            record["hv_after"] = [{"lpid": vm.lpid, "name": vm.name, "owner": vm.owner}
                                  for vm in m.hv.state.vms.values()]
        status = await m.uv_call("UvStatus", upb.UvStatusRequest(), OPERATOR)
        record["uv_after"] = json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
    finally:
        await m.close()
    history = {svc: read_history(root / f"{svc}.history.jsonl", [0, float("inf")]) for svc in ("uv", "hv")}
    return record, history


async def _pins(m, lpid: int) -> dict:
    """What the UV holds for ``lpid`` now: its SVM (frames <= its reservation), the hcall it is
    still asking, and how many calls for it wait on a silent HV."""
    status = await m.uv_call("UvStatus", upb.UvStatusRequest(), OPERATOR)
    svm = next((s for s in status.svms if s.lpid == lpid), None)
    return {"t": asyncio.get_running_loop().time(), "held_by_uv": svm is not None,
            "pages": max(svm.secure_pages, svm.reserved_pages) if svm else 0,
            "unanswered": svm.unanswered_hcall if svm else "", "in_flight": m.uv_to_hv.ignored_in_flight}


async def _gone(m, rec: dict) -> None:
    """The HV is down and stays down for HELD_FOR_S: what the UV keeps of the victim meanwhile
    (sampled at the start and the end), and whether the secure bystander, which needs no HV for
    its own memory, still reads it intact through the UV. Then an operator starts a new HV."""
    lpid = m.guests["victim"].lpid
    samples = [await _pins(m, lpid)]
    intact = (await m.guests["bystander"].verify()).memory_intact
    await asyncio.sleep(HELD_FOR_S)
    samples.append(await _pins(m, lpid))
    rec["held"] = {"guest": "victim", "lpid": lpid, "svm_pages": PAGES, "samples": samples,
                   "bystander_intact": intact}
    await m.restart_hv()


async def _held(m, plan: Plan, key, record: dict, guests: dict) -> None:
    """The HV went silent for the victim: boot a late guest to secure past it, and sample what
    the victim pins in the UV (its secure and reserved pages, the calls for it waiting) now and
    HELD_FOR_S later."""
    image = GuestImage.of_size("late", MEM)
    blob = _blob_hex(image, key, True)
    guests["late"] = m.add_guest("late", MEM, bytes.fromhex(blob))
    record["guests"]["late"] = {"name": "late", "mem_bytes": MEM, "blob_hex": blob, "role": "late"}
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(guests["late"].boot(), FINAL_BOUND_S)
    late_s = asyncio.get_running_loop().time() - t0
    lpid, samples = guests["victim"].lpid, []
    for wait in (0.0, HELD_FOR_S):
        await asyncio.sleep(wait)
        samples.append(await _pins(m, lpid))
    record["held"] = {"guest": "victim", "lpid": lpid, "svm_pages": PAGES, "late": "late", "late_boot_s": late_s,
                      "late_bound_s": LATE_BOUND_S, "samples": samples}


async def _until(cond, timeout: float, every: float = 0.05) -> None:
    """Wait (virtual time) until ``cond()``; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(every)


class _nemesis:
    """Arms the plan's fault for the victim's boot (and disarms whatever is left after)."""

    def __init__(self, m, plan: Plan):
        self.m, self.plan = m, plan
        self.cut: asyncio.Future | None = None

    def __enter__(self):
        m, plan = self.m, self.plan
        for link in _links(m).values():
            link.reset()
        if plan.cut_at[0]:
            call, nth = plan.cut_at
            self.cut = asyncio.get_running_loop().create_future()

            def maybe_cut(name: str, n: int) -> None:
                if name == call and n == nth and not self.cut.done():
                    if plan.fault == "hang":  # this call and every later one for the victim
                        m.uv_to_hv.ignore.add("victim")
                    elif plan.link == "hv<->guest":
                        m.hv_to_guest.cut = m.guest_to_hv.cut = True
                    elif plan.fault != "kill-guest":  # a partition; a reset: down until the new UV is up
                        m.hv_to_uv.cut = m.uv_to_hv.cut = True
                    self.cut.set_result(asyncio.get_running_loop().time())
            for link in _links(m).values():
                link.on_call = maybe_cut
        if plan.failpoint:
            faults.arm(f"{plan.failpoint}=crash", on_crash=m.crash_hv)
        if plan.arrival[0]:
            call, nth = plan.arrival
            m.hv_to_uv.crash = lambda name, n: name == call and n == nth
        if plan.lose[0]:
            call, nth = plan.lose
            _links(m)[plan.link].lose = lambda name, n: name == call and n == nth
        return self

    def __exit__(self, *exc):
        if self.plan.failpoint:
            faults.disarm(self.plan.failpoint)


async def _first(event, victim: asyncio.Future) -> None:
    """Wait (bounded) for ``event`` (a coroutine, or a future the nemesis shares) or the victim's
    end, whichever comes first; a coroutine's task is cancelled after, a shared future never."""
    waiting = asyncio.ensure_future(event)
    await asyncio.wait({waiting, victim}, timeout=FINAL_BOUND_S, return_when=asyncio.FIRST_COMPLETED)
    if waiting is not event:
        waiting.cancel()


def _links(m) -> dict:
    """The machine's links by the names plans use."""
    return {"uv->hv": m.uv_to_hv, "hv->uv": m.hv_to_uv, "hv->guest": m.hv_to_guest, "guest->uv": m.guest_to_uv,
            "guest->hv": m.guest_to_hv}


def _heal_links(m) -> None:
    for link in _links(m).values():
        link.cut, link.on_call = False, None


async def _fault(m, plan: Plan, victim: asyncio.Future, nemesis: "_nemesis") -> dict:
    """Wait for the fault to happen (or the victim to finish first), heal it; what happened."""
    rec = {"injected": False, "t_inject": 0.0, "t_heal": 0.0, "detail": ""}
    now = asyncio.get_running_loop().time
    if plan.fault in ("kill-hv", "hv-gone"):
        await _first(m.crashed.wait(), victim)
        m.hv_to_uv.crash = None
        if m.crashed.is_set() and plan.fault == "hv-gone":  # down a minute; then an operator starts a new HV
            rec.update(injected=True, t_inject=now(), detail=f"HV crashed at {m.crashes[-1]}, down {HELD_FOR_S} s")
            await _gone(m, rec)
        elif m.crashed.is_set():
            rec.update(injected=True, t_inject=now(), detail=f"HV crashed at {m.crashes[-1]}")
            await asyncio.sleep(plan.for_s)
            if plan.again:  # and once more while the restarted HV recovers
                faults.arm(f"{plan.again}=crash", on_crash=m.crash_hv)
                try:
                    await m.restart_hv()
                    await _first(m.crashed.wait(), victim)
                finally:
                    faults.disarm(plan.again)
                if m.crashed.is_set():
                    rec["detail"] += f", then at {m.crashes[-1]} while recovering"
                    await asyncio.sleep(plan.for_s)
                    await m.restart_hv()
            else:
                await m.restart_hv()
            rec["disk_discarded"] = list(m.disk.discarded)  # what the dead HV's unwinding wrote: undone
    elif plan.fault in ("partition", "kill-guest", "reset-uv"):
        await _first(nemesis.cut, victim)
        if nemesis.cut.done() and plan.fault == "partition":
            rec.update(injected=True, t_inject=now(),
                       detail=f"{'HV<->guest' if plan.link else 'HV<->UV'} cut at {plan.cut_at[0]} for {plan.for_s} s")
            await asyncio.sleep(plan.for_s)
        elif nemesis.cut.done() and plan.fault == "reset-uv":
            rec.update(injected=True, t_inject=now(), detail=f"UV reset at {plan.cut_at[0]}")
            await m.reset_uv()
        _heal_links(m)
        if plan.fault == "kill-guest" and nemesis.cut.done() and not victim.done():
            rec.update(injected=True, t_inject=now(), detail=f"kill -9 the victim guest at {plan.cut_at[0]}")
            m.kill_guest("victim", victim)
    elif plan.fault == "hang":  # never healed: the HV stays silent for the victim
        await _first(nemesis.cut, victim)
        for link in _links(m).values():
            link.on_call = None
        if nemesis.cut.done():
            rec.update(injected=True, t_inject=now(), detail=f"the HV answers nothing for the victim from its "
                                                             f"{plan.cut_at[0]} on")
    elif plan.fault == "lose":
        rec.update(injected=True, t_inject=now(), detail=f"{plan.link} {plan.lose[0]} answer lost")
    if plan.fault != "none":
        rec["t_heal"] = now()
    return rec


async def _host_touch(m, guest: dict, lpid: int) -> dict:
    """The host reads a data page of a secure guest: it must get ciphertext."""
    image = GuestImage.of_size(guest["name"], guest["mem_bytes"])
    resp = await m.hv_call("HostReadPage", hpb.HostReadPageRequest(lpid=lpid, gpa=image.data_start), OPERATOR)
    plain = image.page(image.data_start // PAGE_SIZE, bytes.fromhex(guest["blob_hex"]))
    return {"guest": guest["name"], "errno": Errno(resp.errno).name, "data_sha": page_digest(resp.data),
            "plaintext": resp.errno == Errno.OK and resp.data == plain}


@dataclass
class Outcome:
    plan: Plan
    violations: list
    digest: str  # sha256 of the record and the histories: a seed replays to the same digest
    virtual_s: float
    record: dict  # what the run recorded (plan, fault, guests' outcomes), as the checkers read it
    history: dict  # the UV's and the HV's call histories of the run, as the checkers read them


def scratch_dir() -> Path | None:
    """Where runs keep the HV's data directory: a memory file system when there is one (the HV
    fsyncs every metadata write; on a disk that is most of a run's time), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


SCHEDULES = ("seeded", "fifo")


def run_one(plan: Plan, mutants: tuple[str, ...] = (), scratch: Path | None = None,
            schedule: str = "seeded") -> Outcome:
    """One run on its own virtual-time loop, entropy seeded from the plan's seed; ready work runs
    in an order drawn from the seed (``seeded``) or first come first served (``fifo``)."""
    root = Path(tempfile.mkdtemp(prefix=f"pefsim-sim-{plan.seed}-", dir=scratch or scratch_dir()))
    try:
        with entropy.use(plan.seed), faults.mutants(mutants):
            loop_time: list[float] = []

            async def main():
                try:
                    return await _scenario(plan, root, mutants)
                finally:
                    loop_time.append(asyncio.get_running_loop().time())
            order = random.Random(plan.seed ^ 0x5C4ED) if schedule == "seeded" else None
            record, history = vloop.run(main(), order)
        found = checker.check(record, history)
        text = json.dumps({"record": record, "history": history}, sort_keys=True, default=str)
        return Outcome(plan, found, hashlib.sha256(text.encode()).hexdigest(), loop_time[0], record, history)
    finally:
        shutil.rmtree(root, ignore_errors=True)
