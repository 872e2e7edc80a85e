"""pefsim's bulk data plane: raw frames for page batches, and the HV memory the UV can share.

Frames. ``UvPageInStream`` requests and ``UvPageOutStream`` responses carry page data. Protobuf
would copy every page into and out of a message; a frame is instead

    u32 big-endian header length | header (a protobuf message, no page data) | payload

and the receiver reads the payload through a memoryview of the buffer gRPC hands it, so a page is
copied once on the way in (into the pool frame or the file it lands in). The sender builds the
frame with a single join of its pages (the HV reads them from its RAM file, so a page sent is
copied twice: gRPC takes a message only as ``bytes``, not a bytearray or memoryview that a
``preadv`` could fill behind the header, checked with grpcio 1.85's SendMessageOperation).

Shared memory. When UV and HV run on one host (or share a volume), the HV offers the UV the file
behind each memslot's RAM (``UvShareHvMemory``). The UV then reads a page at its real address
with one ``preadv`` into the secure frame, and writes a page given back with one ``pwritev`` into
the HV's file: the RPCs carry page numbers only. The UV does not mmap the HV's file, so its
resident memory stays its own pool. A bulk batch gathers its copies (``FileBatch``) and moves the
pages at consecutive offsets of one file with a single preadv / pwritev.

The HV names the file, and the HV is not trusted: the UV opens only a file of the HV's RAM-file
shape (``vm-<lpid>/slot-<id>.ram``, the request's lpid and slot) inside the one directory it was
configured with (``--hv-memory-dir``), never through a symlink, regular, with one link and exactly
the slot's size (``HvMemory.offer``). So what a hostile HV can make the UV read or write is a file
of its own guests' RAM, which it holds anyway; without the directory, nothing is shared and pages
travel in the stream.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import PurePath

from pefsim.abi import PAGE_SIZE

_LEN = struct.Struct(">I")


@dataclass(slots=True)
class Frame:
    header: object
    payload: memoryview


def encode(header, payload_parts=()) -> bytes:
    h = header.SerializeToString()
    return b"".join([_LEN.pack(len(h)), h, *payload_parts])


def decoder(header_cls, max_pages: int | None = None):
    """Frame parser; with ``max_pages``, a header naming more pages than that does not parse."""
    def decode(data: bytes) -> Frame:
        (n,) = _LEN.unpack_from(data)
        view = memoryview(data)
        header = header_cls.FromString(bytes(view[4:4 + n]))
        if max_pages is not None:
            limit_pages(header, max_pages)
        return Frame(header, view[4 + n:])
    return decode


# -- page runs ----------------------------------------------------------------------------------
#
# A PageRef names one page or a run of ``count`` pages at consecutive addresses. Each page of a run
# is still its own UV_PAGE_IN / UV_PAGE_OUT with its own result; a run only lets both sides check
# and move its pages together (services/ultravisor/core/page.py: page_in_run, page_out_run).

MAX_FRAME_PAGES = 1024  # pages one PageInBatch may name
# pages of data one request may carry (VcpuStore, SvmStore, a PageInBatch frame in the stream):
# 512 KiB, which bounds every request a server takes (rpc.MAX_REQUEST_BYTES); answers (loads,
# page-out frames) are not bound by it
MAX_DATA_PAGES = 8
MAX_REQUEST_PAGES = 1 << 20  # pages one PageOutRequest may name (64 GiB)


def pages_named(refs) -> int:
    return sum(ref.count or 1 for ref in refs)


def limit_pages(message, max_pages: int):
    """``message`` if its pages, runs counted out, are at most ``max_pages``; else ValueError
    (the request does not parse: INVALID_ARGUMENT)."""
    n = pages_named(message.pages)
    if n > max_pages:
        raise ValueError(f"{n} pages named, at most {max_pages} per message")
    return message


def limited(message_cls, max_pages: int):
    """A request parser that refuses messages naming more than ``max_pages`` pages."""
    return lambda data: limit_pages(message_cls.FromString(data), max_pages)


def runs_of(refs):
    """[(ra, gpa, flags, order, count)] of PageRefs."""
    return [(ref.ra, ref.gpa, ref.flags, ref.order, ref.count or 1) for ref in refs]


def pages_of(refs):
    """(ra, gpa, flags, order) of every page the PageRefs name, runs counted out."""
    for ra, gpa, flags, order, n in runs_of(refs):
        for i in range(n):
            yield ra + i * PAGE_SIZE, gpa + i * PAGE_SIZE, flags, order


def split_runs(runs, size: int):
    """Lists of runs holding at most ``size`` pages each (runs cut where they must be)."""
    out, room = [], size
    for ra, gpa, flags, order, n in runs:
        while n:
            take = min(n, room)
            out.append((ra, gpa, flags, order, take))
            ra, gpa, n, room = ra + take * PAGE_SIZE, gpa + take * PAGE_SIZE, n - take, room - take
            if not room:
                yield out
                out, room = [], size
    if out:
        yield out


@dataclass(slots=True)
class Page:
    """The fields of one page's UV_PAGE_IN / UV_PAGE_OUT, as the call table's checks read them."""

    lpid: int
    src_ra: int = 0
    dest_ra: int = 0
    dest_gpa: int = 0
    src_gpa: int = 0
    flags: int = 0
    order: int = 16
    data: bytes = b""


# -- where page data comes from and goes to -----------------------------------------------------


class BytesSource:
    """Page data carried by the call (a unary ucall's bytes, or a slice of a frame's payload)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def whole(self) -> bool:
        return len(self.data) == PAGE_SIZE

    def read(self) -> bytes:
        return bytes(self.data)

    def fill(self, view: memoryview) -> None:
        view[:] = self.data


class FileSource:
    """A page read from the HV's shared RAM file at a real address (one copy, into ``view``)."""

    __slots__ = ("fd", "offset")

    def __init__(self, fd: int, offset: int):
        self.fd, self.offset = fd, offset

    def whole(self) -> bool:
        return True

    def read(self) -> bytes:
        return os.pread(self.fd, PAGE_SIZE, self.offset)

    def fill(self, view: memoryview) -> None:
        if os.preadv(self.fd, [view], self.offset) != PAGE_SIZE:
            raise OSError("short read from the HV's memory")


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class FileBatch:
    """Shared-memory page copies gathered over one batch and done together (``flush``): buffers
    at consecutive offsets of one file go in one ``op`` call (os.preadv or os.pwritev), up to
    IOV_MAX buffers (a buffer is a page, or several pages back to back). The caller holds the
    SVM's lock from the first page's transition until after the flush, so no frame is seen
    before its content lands and no answer leaves before the HV's file holds the pages."""

    __slots__ = ("op", "runs")

    def __init__(self, op):
        self.op = op
        self.runs: list[list] = []  # [fd, offset, buffers, bytes]

    def add(self, fd: int, offset: int, buf) -> None:
        size = len(buf)
        if self.runs:
            run = self.runs[-1]
            if run[0] == fd and run[1] + run[3] == offset and len(run[2]) < IOV_MAX:
                run[2].append(buf)
                run[3] += size
                return
        self.runs.append([fd, offset, [buf], size])

    def add_run(self, fd: int, offset: int, bufs) -> None:
        """Buffers back to back in the file from ``offset`` (as ``add`` for each)."""
        for buf in bufs:
            self.add(fd, offset, buf)
            offset += len(buf)

    def flush(self) -> None:
        runs, self.runs = self.runs, []
        for fd, offset, bufs, size in runs:
            if self.op(fd, bufs, offset) != size:
                raise OSError("short transfer with the HV's memory")


class BatchedFileSource(FileSource):
    """A FileSource whose copy into the frame is left to the batch's flush."""

    __slots__ = ("batch",)

    def __init__(self, fd: int, offset: int, batch: FileBatch):
        super().__init__(fd, offset)
        self.batch = batch

    def fill(self, view: memoryview) -> None:
        self.batch.add(self.fd, self.offset, view)


class NotHvMemory(Exception):
    """An offered file the UV will not open (UvShareHvMemory answers U_P2 with the reason)."""


def _open_in(dir_fd: int, name: str, flags: int) -> int:
    """``name`` in the directory ``dir_fd``, opened only if it is a regular file with one link
    and not a symlink. lstat first, so no device or FIFO is ever opened (an open can act, or
    block); O_NOFOLLOW and the inode compared afterwards, so a file swapped in between is not
    taken either. One link: a hard link would put a file from outside the directory inside it."""
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(before.st_mode) or before.st_nlink != 1:
        raise NotHvMemory(f"{name} is not a regular file with one link")
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or after.st_nlink != 1:
        os.close(fd)
        raise NotHvMemory(f"{name} changed while it was opened")
    return fd


class HvMemory:
    """The HV RAM files a UV was offered, by real-address range. ``root`` is the HV's data
    directory as the UV sees it (``--hv-memory-dir``); without it every offer is refused."""

    def __init__(self, root: str | None = None):
        self.root = root
        self.ranges: dict[tuple[int, int], tuple[int, int, int]] = {}  # (lpid, slot) -> (ra, size, fd)

    def offer(self, lpid: int, slot_id: int, path: str, size: int, nonce_path: str, nonce: bytes,
              ra_base: int) -> None:
        """Take the HV's RAM file for (lpid, slot_id) if it is one (module docstring): ``path``
        must be ``vm-<lpid>/slot-<slot_id>.ram`` under ``root`` once every symlink is resolved
        and have no ``..``; ``size`` is the slot's registered size, which the file must have;
        the nonce file beside it must hold ``nonce`` (this directory is the HV's, not a stale
        one of another HV). NotHvMemory (or OSError) otherwise, and nothing is opened."""
        if self.root is None:
            raise NotHvMemory("this UV has no --hv-memory-dir: pages travel in the stream")
        vm_dir, ram, nonce_file = f"vm-{lpid}", f"slot-{slot_id}.ram", f"slot-{slot_id}.nonce"
        root = os.path.realpath(self.root)
        for named, want in ((path, ram), (nonce_path, nonce_file)):
            if ".." in PurePath(named).parts or \
                    os.path.realpath(named) != os.path.join(root, vm_dir, want):
                raise NotHvMemory(f"{named!r} is not {vm_dir}/{want} in the HV's memory directory")
        if not nonce:
            raise NotHvMemory("no nonce")
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dir_fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        finally:
            os.close(root_fd)
        try:
            nonce_fd = _open_in(dir_fd, nonce_file, os.O_RDONLY)
            try:
                if os.read(nonce_fd, len(nonce) + 1) != nonce:
                    raise NotHvMemory("nonce mismatch: not the HV's file")
            finally:
                os.close(nonce_fd)
            fd = _open_in(dir_fd, ram, os.O_RDWR)
        finally:
            os.close(dir_fd)
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise NotHvMemory(f"{vm_dir}/{ram} is not the slot's size ({size} bytes)")
        self.add(lpid, slot_id, fd, ra_base, size)

    def add(self, lpid: int, slot_id: int, fd: int, ra_base: int, size: int) -> None:
        """Keep an open file (``fd``, now this object's) as (lpid, slot_id)'s memory at ra_base."""
        self.drop(lpid, slot_id)
        self.ranges[(lpid, slot_id)] = (ra_base, size, fd)

    def drop(self, lpid: int, slot_id: int | None = None) -> None:
        for key in [k for k in self.ranges if k[0] == lpid and (slot_id is None or k[1] == slot_id)]:
            os.close(self.ranges.pop(key)[2])

    def locate(self, lpid: int, ra: int) -> tuple[int, int] | None:
        """(fd, offset) of the page at ``ra`` in one of ``lpid``'s shared files, or None."""
        for (owner, _), (base, size, fd) in self.ranges.items():
            if owner == lpid and base <= ra and ra + PAGE_SIZE <= base + size:
                return fd, ra - base
        return None

    def source(self, lpid: int, ra: int, batch: FileBatch | None = None) -> FileSource | None:
        where = self.locate(lpid, ra)
        if where is None:
            return None
        return FileSource(*where) if batch is None else BatchedFileSource(*where, batch)

    def write(self, lpid: int, ra: int, data, batch: FileBatch | None = None) -> bool:
        """Write a page into the HV's memory at ``ra`` (now, or at ``batch``'s flush); False if
        that memory is not shared."""
        where = self.locate(lpid, ra)
        if where is None:
            return False
        fd, offset = where
        if batch is not None:
            batch.add(fd, offset, data)
        elif os.pwritev(fd, [data], offset) != PAGE_SIZE:
            raise OSError("short write to the HV's memory")
        return True
