"""The guest's call table and its allowed-calls-per-vCPU-state table (see program.py)."""
from __future__ import annotations

from dataclasses import replace

import asyncio

from pefsim.abi import H, Role, VcpuState
from pefsim.calltable import ALLOW, Call
from pefsim.v1 import guest_pb2 as pb
from services.guest.core.program import Resume


async def vcpu_resume(guest, req: pb.VcpuResumeRequest, caller) -> pb.VcpuResumeResponse:
    """HRFID into this vCPU. A resume for another lpid than this guest's VM is refused
    (H_PARAMETER) before anything changes: whoever sent it does not hold this vCPU."""
    if not guest.lpid or req.lpid != guest.lpid:
        guest.event(f"resume for lpid {req.lpid} by {Role(caller.role).name} refused: this vCPU is lpid {guest.lpid}")
        return pb.VcpuResumeResponse(rc=H.H_PARAMETER)
    rc, duplicate = guest.resume(Resume(r3=req.r3, msr_s=req.msr_s, nip=req.nip,
                                        by=req.resumed_by or caller.role,
                                        abort_issued_ns=req.trace.abort_issued_unix_ns, token=req.token))
    return pb.VcpuResumeResponse(rc=rc, duplicate=duplicate)


async def machine_check(guest, req: pb.MachineCheckRequest, caller) -> pb.MachineCheckResponse:
    guest.machine_check(req.reason)
    return pb.MachineCheckResponse()


async def boot(guest, req: pb.BootRequest, caller) -> pb.BootResponse:
    """Run the boot program once; a second Boot waits for (or returns) the first one's report."""
    if guest.booting is None:
        guest.booting = asyncio.ensure_future(guest.boot())
    return pb.BootResponse(report=await asyncio.shield(guest.booting))


async def verify(guest, req: pb.VerifyRequest, caller) -> pb.VerifyResponse:
    return pb.VerifyResponse(report=await guest.verify())


async def exercise(guest, req: pb.ExerciseRequest, caller) -> pb.ExerciseResponse:
    return await guest.exercise()


async def guest_status(guest, req: pb.GuestStatusRequest, caller) -> pb.GuestStatusResponse:
    return pb.GuestStatusResponse(report=guest.report)


OPERATOR = frozenset({Role.ROLE_OPERATOR})
CALLS = [
    Call("VcpuResume", vcpu_resume, frozenset({Role.ROLE_HV, Role.ROLE_UV}), H.H_PERMISSION, family=H),
    Call("Boot", boot, OPERATOR, None, checks=(), result=None),
    Call("Verify", verify, OPERATOR, None, checks=(), result=None),
    Call("Exercise", exercise, OPERATOR, None, checks=(), result=None),
    # the guest's timeline says when it sits in `sc 2`: for operators only
    Call("GuestStatus", guest_status, OPERATOR, None, checks=(), result=None),
    Call("MachineCheck", machine_check, frozenset({Role.ROLE_HV}), None, checks=(), result=None),
]


# call -> what its handler itself may answer, beyond the checks above (the chaos checker holds
# every observed result to these, with calltable.legal_results).
RESULTS = {
    "VcpuResume": (H.H_SUCCESS, H.H_STATE, H.H_PARAMETER),
}
CALLS = [replace(c, results=frozenset(RESULTS.get(c.name, ()))) for c in CALLS]

# A resume is taken in VCPU_IN_UCALL; in the other states only a repeat of the one taken (same
# abort token) is acknowledged, which the handler decides, so every state reaches it.
STATE_TABLE = {
    "VcpuResume": {VcpuState.VCPU_STOPPED: ALLOW, VcpuState.VCPU_RUNNING: ALLOW,
                   VcpuState.VCPU_IN_UCALL: ALLOW, VcpuState.VCPU_SECURE: ALLOW},
}


def state_of(guest, call, request) -> VcpuState:
    return VcpuState(guest.vcpu_state)
