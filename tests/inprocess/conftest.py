"""Stage fixtures over the in-process adapter (services/local.py): the UV and HV cores in this
event loop, no sockets. ``stage`` builds a machine with one guest's VM at a stage of its life
(created with its image, or aborting) for a test to drive."""
from __future__ import annotations

import asyncio
import inspect
import os
from dataclasses import dataclass

import pytest

from pefsim.abi import PAGE_SIZE, Errno, Role, U, gpa_of
from pefsim.blob import make_blob, new_signing_key
from pefsim.image import GuestImage
from pefsim.calltable import Caller
from pefsim.dataplane import MAX_DATA_PAGES
from pefsim.v1 import common_pb2, hypervisor_pb2 as hpb, ultravisor_pb2 as upb
from services.local import Machine, machine

NIP = 0x11004  # where the guest's `sc 2` returns to
KBASE, FDT = 0x10000, 0x20000  # in random memory: the FDT does not parse, the ESM aborts


@dataclass
class GuestVm:
    """A guest's VM in a Machine: its owner identity, lpid and the memory it wrote."""

    m: Machine
    name: str
    lpid: int
    pages: list[bytes]

    @property
    def caller(self) -> Caller:
        return Caller(Role.ROLE_GUEST, self.name)

    image: GuestImage | None = None

    def esm(self) -> asyncio.Task:
        """The guest's `sc 2` UV_ESM, running: its vCPU waits for the return (the test's task)."""
        self.m.vcpus.of(self.lpid).waiting = True
        kbase, fdt = (self.image.kbase, self.image.fdt) if self.image else (KBASE, FDT)
        return asyncio.ensure_future(self.m.uv_call("UV_ESM", upb.UvEsmRequest(
            vcpu=common_pb2.VcpuContext(lpid=self.lpid, nip=NIP), kbase=kbase, fdt=fdt), self.caller))

    async def memory(self) -> list[bytes]:
        """Every page as the (normal) VM's vCPU loads it now."""
        out = []
        for first in range(0, len(self.pages), 64):
            n = min(64, len(self.pages) - first)
            resp = await self.m.hv_call("VcpuLoad", hpb.VcpuLoadRequest(lpid=self.lpid, gpa=gpa_of(first), npages=n),
                                        self.caller)
            assert resp.errno == Errno.OK, resp
            out += [resp.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(n)]
        return out


async def create_guest(m: Machine, name: str = "g1", npages: int = 48, image: GuestImage | None = None,
                       blob: bytes = b"") -> GuestVm:
    """CreateVm from the guest's VMM and its memory written with VcpuStore: ``image`` (with its
    ``blob``: its ESM can go secure), else random pages, so no FDT parses and its ESM aborts."""
    caller = Caller(Role.ROLE_GUEST, name)
    resp = await m.hv_call("CreateVm", hpb.CreateVmRequest(
        name=name, vcpu_endpoint="127.0.0.1:1", secure_capable=True,
        memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=npages)]), caller)
    assert resp.errno == Errno.OK, resp
    pages = ([image.page(g, blob) for g in range(npages)] if image is not None
             else [os.urandom(PAGE_SIZE) for _ in range(npages)])
    for first in range(0, npages, MAX_DATA_PAGES):
        data = b"".join(pages[first:first + MAX_DATA_PAGES])
        store = await m.hv_call("VcpuStore", hpb.VcpuStoreRequest(lpid=resp.lpid, gpa=gpa_of(first), data=data),
                                caller)
        assert store.errno == Errno.OK, store
    return GuestVm(m, name, resp.lpid, pages, image)


async def secure_guest(m: Machine, name: str = "s1", npages: int = 48) -> GuestVm:
    """A guest whose signed image went secure (UV_ESM answered U_SUCCESS with MSR[S])."""
    image = GuestImage.of_size(name, npages * PAGE_SIZE)
    g = await create_guest(m, name, npages, image, make_blob(image, m.signing_key))
    answer = await asyncio.wait_for(g.esm(), 20)
    assert (answer.rc, answer.msr_s) == (U.U_SUCCESS, True), answer
    return g


@pytest.fixture
def stage(tmp_path):
    """An async context factory: ``async with stage(**hv_config) as m`` gives a started Machine
    whose HV keeps its data under tmp_path, closed afterwards."""
    class _Stage:
        def __init__(self, **hv_kw):
            self.hv_kw = hv_kw

        async def __aenter__(self) -> Machine:
            key = new_signing_key()
            self.m = machine(tmp_path / "hv", trusted=key.public_key(), **self.hv_kw)
            self.m.signing_key = key  # what the guests' owner signs their blobs with
            self.m.start_hv()
            return self.m

        async def __aexit__(self, *exc) -> None:
            await self.m.close()
    return _Stage


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests here in a fresh event loop each (no plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**kwargs))
        return True
    return None
