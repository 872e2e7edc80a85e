"""Test helpers shared by the suites: guests with chosen blobs, operator stubs, page maths."""
from __future__ import annotations

import contextlib

from pefsim.abi import PAGE_SIZE
from pefsim.blob import make_blob
from pefsim.ops.demo import Operator
from pefsim.image import GuestImage
from pefsim.v1 import guest_pb2

MEM = 1 << 20  # 16 pages of 64 KiB: small guests keep the suite fast


def blob_for(stack, name: str, mem: int = MEM, key=None, **kw) -> bytes:
    return make_blob(GuestImage.of_size(name, mem), key or stack.signing_key(), **kw)


async def boot_guest(stack, op: Operator, name: str, mem: int = MEM, blob: bytes | None = None,
                     extra: tuple[str, ...] = ()):
    """Start a guest process, run its boot program, return its report."""
    import asyncio

    if blob is None:
        blob = blob_for(stack, name, mem)
    addr = await asyncio.to_thread(stack.add_guest, name, mem, blob, True, False, extra)
    op.guest(name, addr)
    return (await op.guest(name).Boot(guest_pb2.BootRequest())).report


def flip_byte(path, offset: int) -> bytes:
    """Flip one byte of a file in place (the HV's RAM file); returns the old page for restoring."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))
    return old


def page_offset(gfn: int) -> int:
    return gfn * PAGE_SIZE


def metric(stack, svc: str, name: str) -> float:
    """The sum of a series (``name`` or ``name{labels}``) in a service's /metrics, now."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{stack.metrics_targets()[svc]}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


@contextlib.asynccontextmanager
async def operating(stack):
    """An Operator of ``stack`` (gRPC stubs as the operator, each guest's as its owner), closed
    after the block: the frame of a test's scenario."""
    op = Operator.of(stack)
    try:
        yield op
    finally:
        await op.close()
