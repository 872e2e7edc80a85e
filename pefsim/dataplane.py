"""pefsim's bulk data plane: raw frames for page batches, and the HV memory the UV can share.

Frames. ``UvPageInStream`` requests and ``UvPageOutStream`` responses carry page data. Protobuf
would copy every page into and out of a message; a frame is instead

    u32 big-endian header length | header (a protobuf message, no page data) | payload

and the receiver reads the payload through a memoryview of the buffer gRPC hands it, so a page is
copied once on the way in (into the mmap it lands in). The sender builds the frame with a single
join over memoryviews of its mmap.

Shared memory. When UV and HV run on one host (or share a volume), the HV offers the UV the file
behind each memslot's RAM (``UvShareHvMemory``). The UV then reads a page at its real address
with one ``preadv`` into the secure frame, and writes a page given back with one ``pwritev`` into
the HV's file: the RPCs carry page numbers only. The UV does not mmap the HV's file, so its
resident memory stays its own pool. A bulk batch gathers its copies (``FileBatch``) and moves the
pages at consecutive offsets of one file with a single preadv / pwritev.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

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
# and move its pages together (services/ultravisor/calls/page.py: page_in_run, page_out_run).

MAX_FRAME_PAGES = 1024  # pages one PageInBatch may name
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


class HvMemory:
    """The HV RAM files a UV was offered, by real-address range."""

    def __init__(self):
        self.ranges: dict[tuple[int, int], tuple[int, int, int]] = {}  # (lpid, slot) -> (ra, size, fd)

    def add(self, lpid: int, slot_id: int, path: str, ra_base: int, size: int) -> None:
        self.drop(lpid, slot_id)
        fd = os.open(path, os.O_RDWR)
        if os.fstat(fd).st_size < size:
            os.close(fd)
            raise OSError(f"{path} is smaller than the slot")
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
