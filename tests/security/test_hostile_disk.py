"""A hostile guest against the HV's disk, and a power cut against its files, with real processes.

* Full disk: guest RAM is a file behind a shared mapping. A store into a hole of a sparse file on a
  full file system is a SIGBUS, which killed the HV (and again at every restart). Now a slot's
  blocks are reserved when it is made, so a guest filling the disk gets ENOSPC and every store
  into what it was given lands.
* A damaged vm.json (a power cut before its data reached the disk) used to make the HV delete the
  VM, RAM included; now that VM is quarantined and the HV serves the others.
"""
from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import pytest

from pefsim import rpc
from pefsim.abi import PAGE_SIZE, Errno, Role
from pefsim.ops.demo import Operator
from pefsim.ops.stack import LocalStack, StackConfig
from pefsim.v1 import common_pb2, guest_pb2, hypervisor_pb2 as hpb, hypervisor_pb2_grpc
from tests.conftest import assert_clean_exit, unique
from tests.helpers import boot_guest, operating

DISK_MIB = 16  # the HV's whole data directory
ATTACK_PAGES = 32  # 2 MiB a VM: the disk holds a handful
ATTACKER = "attacker"


def metric(stack, name: str) -> float:
    text = urllib.request.urlopen(f"http://{stack.metrics_targets()['hv']}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def hv_log(stack) -> str:
    return stack.procs["hv"].log_path.read_text(errors="replace")


@pytest.fixture
def small_disk_stack(tmp_path_factory):
    """A stack whose HV data directory is a tmpfs of DISK_MIB MiB (mounted here, unmounted after
    the stack stopped)."""
    run_dir = tmp_path_factory.mktemp("stack")
    data = run_dir / "hv-data"  # where LocalStack puts the data directory of the HV named "hv"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0700", "tmpfs", str(data)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {DISK_MIB} MiB tmpfs for the HV's data directory (needs root or "
                    f"CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    stack = None
    try:
        stack = LocalStack(StackConfig(run_dir=run_dir)).start()
        yield stack
    finally:
        try:
            if stack is not None:
                assert_clean_exit(stack)
        finally:
            if subprocess.run(["umount", str(data)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(data)], check=True)


def attack_page(lpid: int, idx: int) -> bytes:
    stamp = f"lpid {lpid} page {idx} ".encode()
    return (stamp * (PAGE_SIZE // len(stamp) + 1))[:PAGE_SIZE]


def test_guest_filling_the_disk_gets_enospc_and_the_hv_survives(small_disk_stack, run):
    """A guest creates VMs until the disk is full: ENOSPC (CreateVm, then SetMemslot), nothing of a
    refused VM or slot left behind. It then stores into every page it was given: the HV stays up,
    logs no traceback, a bystander guest's memory is intact, and space given back is usable."""
    stack = small_disk_stack
    data = stack.run_dir / "hv-data"

    async def scenario():
        op = Operator.of(stack)
        hv = rpc.Peer(stack.hv_addr, Role.ROLE_GUEST, hypervisor_pb2_grpc.HypervisorServiceStub, ATTACKER,
                      stack.tls(f"guest:{ATTACKER}"), "hv")
        sessions = []

        async def create() -> hpb.CreateVmResponse:
            return await hv.stub.CreateVm(hpb.CreateVmRequest(
                name=unique("fill"), vcpu_endpoint="127.0.0.1:1",
                memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=ATTACK_PAGES)]))

        async def hold(lpid: int) -> None:
            """The attacker's VMM holds each VM (an unheld guest VM would be reaped)."""
            call = hv.stub.VmSession(hpb.VmSessionRequest(lpid=lpid))
            assert (await call.read()).errno == Errno.OK
            sessions.append(call)

        async def store_everywhere(lpid: int) -> None:
            for idx in range(0, ATTACK_PAGES, 8):
                blob = b"".join(attack_page(lpid, i) for i in range(idx, idx + 8))
                resp = await hv.stub.VcpuStore(hpb.VcpuStoreRequest(lpid=lpid, gpa=idx * PAGE_SIZE, data=blob))
                assert resp.errno == Errno.OK

        async def read_back(lpid: int) -> bool:
            resp = await hv.stub.VcpuLoad(hpb.VcpuLoadRequest(lpid=lpid, gpa=0, npages=ATTACK_PAGES))
            return resp.errno == Errno.OK and resp.data == b"".join(attack_page(lpid, i)
                                                                     for i in range(ATTACK_PAGES))
        try:
            bystander = await boot_guest(stack, op, unique("bystander"), extra=("--no-svm",))
            assert bystander.outcome == "normal" and bystander.memory_intact
            created = []
            for _ in range(4 * DISK_MIB):
                resp = await create()
                if resp.errno != Errno.OK:
                    break
                created.append(resp.lpid)
                await hold(resp.lpid)
            assert resp.errno == Errno.ENOSPC, Errno(resp.errno).name
            assert len(created) >= 2, "the disk should have held a few VMs"
            # nothing of the refused VM: no directory, not in HvStatus
            status = await op.hv.stub.HvStatus(hpb.HvStatusRequest())
            lpids = sorted(v.lpid for v in status.vms)
            assert lpids == sorted([bystander.lpid, *created])
            assert sorted(p.name for p in data.glob("vm-*")) == sorted(f"vm-{lpid}" for lpid in lpids)
            # a slot that does not fit either: ENOSPC, and the VM keeps only its slot
            more = await hv.stub.SetMemslot(hpb.SetMemslotRequest(lpid=created[0], slot=common_pb2.Memslot(
                slot_id=1, base_gfn=1000, npages=ATTACK_PAGES)))
            assert more.errno == Errno.ENOSPC
            assert sorted(p.name for p in (data / f"vm-{created[0]}").glob("slot-*")) == ["slot-0.gfn",
                                                                                        "slot-0.ram"]
            # every page the guest was given takes its store (this was the SIGBUS)
            for lpid in created:
                await store_everywhere(lpid)
            assert stack.procs["hv"].alive
            assert all([await read_back(lpid) for lpid in created])
            verify = await op.guest(bystander.name).Verify(guest_pb2.VerifyRequest())
            assert verify.report.memory_intact, verify.report.detail
            # space given back is space again
            assert (await hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=created[-1]))).errno == Errno.OK
            again = await create()
            assert again.errno == Errno.OK
            await hold(again.lpid)
            await store_everywhere(again.lpid)
            assert await read_back(again.lpid)
            assert stack.procs["hv"].alive
            text = hv_log(stack)
            assert "Traceback" not in text and "the data directory is full" in text
        finally:
            for call in sessions:
                call.cancel()
            await hv.close()
            await op.close()
    run(scenario())


def test_power_cut_empty_vm_json_quarantines_that_vm_only(stack_factory, run):
    """kill -9 of the HV, one VM's vm.json left empty (what a power cut can leave), HV restarted:
    the other VM's memory is intact and it is the only one served; the damaged VM's files are kept
    under quarantine/, the HV says so in an ERROR line and a metric, and its lpid is not reused."""
    stack = stack_factory()

    async def scenario():
        async with operating(stack) as op:
            kept = await boot_guest(stack, op, unique("kept"), extra=("--no-svm",))
            victim = await boot_guest(stack, op, unique("victim"), extra=("--no-svm",))
            assert kept.memory_intact and victim.memory_intact
            stack.procs["hv"].kill()
            data = stack.run_dir / "hv-data"
            (data / f"vm-{victim.lpid}" / "vm.json").write_bytes(b"")
            await asyncio.to_thread(stack.restart, "hv")
            rep = (await op.guest(kept.name).Verify(guest_pb2.VerifyRequest(), timeout=30)).report
            assert rep.memory_intact, rep.detail
            status = await op.hv.stub.HvStatus(hpb.HvStatusRequest())
            assert [v.lpid for v in status.vms] == [kept.lpid] and status.vms_recovered == 1
            kept_files = data / "quarantine" / f"vm-{victim.lpid}-bad-vm-json"
            assert {"vm.json", "slot-0.ram", "slot-0.gfn"} <= {p.name for p in kept_files.iterdir()}
            assert not (data / f"vm-{victim.lpid}").exists()
            assert f"ERROR lpid {victim.lpid} quarantined (bad-vm-json)" in hv_log(stack)
            assert str(kept_files) in hv_log(stack)
            assert metric(stack, 'pefsim_hv_vms_quarantined_total{reason="bad-vm-json"}') == 1
            third = await boot_guest(stack, op, unique("third"), extra=("--no-svm",))
            assert third.memory_intact and third.lpid > victim.lpid
    run(scenario())
