"""Deterministic guest images: what a guest writes into its memory before UV_ESM.

Layout of a guest of ``npages`` 64 KiB pages (one memslot, slot 0, from GFN 0):

  GFN 0                      low memory (exception vectors)
  GFN 1 .. 1+K-1             kernel; kbase = GPA of GFN 1; ``kernel-size`` bytes are measured
  next I pages               initrd (/chosen linux,initrd-start .. linux,initrd-end)
  next page                  FDT (a JSON document standing in for the flattened device tree)
  next B pages               ESM blob (/chosen linux,esm-blob-start .. linux,esm-blob-end)
  the rest                   data

Every page's content is a pure function of (seed, gfn), so a guest, a checker or a test can say
what any page must hold without keeping a copy.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Iterator

from pefsim.abi import PAGE_SIZE, gpa_of

FDT_MAGIC = "pefsim-fdt-v1"
BLOB_PAGES = 1
MIN_PAGES = 9


@functools.lru_cache(maxsize=256)  # 16 MiB at most; the simulator's guests read theirs thousands of times
def _random_page(key: str) -> bytes:
    return random.Random(key).randbytes(PAGE_SIZE)


@dataclass(frozen=True)
class GuestImage:
    name: str
    npages: int
    seed: str = ""
    bootargs: str = "console=hvc0 root=/dev/sda2 svm=on"

    def __post_init__(self) -> None:
        if self.npages < MIN_PAGES:
            raise ValueError(f"a guest needs at least {MIN_PAGES} pages of 64 KiB, got {self.npages}")

    @classmethod
    def of_size(cls, name: str, mem_bytes: int, **kw) -> "GuestImage":
        if mem_bytes % PAGE_SIZE:
            raise ValueError("guest memory must be a multiple of 64 KiB")
        return cls(name=name, npages=mem_bytes // PAGE_SIZE, **kw)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def kernel_pages(self) -> int:
        return max(2, min(64, self.npages // 16))

    @property
    def initrd_pages(self) -> int:
        return max(1, self.kernel_pages // 2)

    @property
    def kbase(self) -> int:
        return gpa_of(1)

    @property
    def kernel_size(self) -> int:
        # not page aligned on purpose: the UV must hash exactly kernel-size bytes
        return self.kernel_pages * PAGE_SIZE - 4096

    @property
    def initrd_start(self) -> int:
        return gpa_of(1 + self.kernel_pages)

    @property
    def initrd_end(self) -> int:
        return self.initrd_start + self.initrd_pages * PAGE_SIZE

    @property
    def fdt(self) -> int:
        return self.initrd_end

    @property
    def blob_start(self) -> int:
        return self.fdt + PAGE_SIZE

    @property
    def data_start(self) -> int:
        return self.blob_start + BLOB_PAGES * PAGE_SIZE

    @property
    def mem_bytes(self) -> int:
        return self.npages * PAGE_SIZE

    # -- content --------------------------------------------------------------------------------

    def _random_page(self, gfn: int) -> bytes:
        return _random_page(f"{self.seed or self.name}:{gfn}")

    def fdt_document(self, blob_len: int) -> dict:
        return {
            "magic": FDT_MAGIC,
            "memory": {"reg": [0, self.mem_bytes]},
            "chosen": {
                "bootargs": self.bootargs,
                "linux,initrd-start": self.initrd_start,
                "linux,initrd-end": self.initrd_end,
                "linux,esm-blob-start": self.blob_start,
                "linux,esm-blob-end": self.blob_start + blob_len,
            },
        }

    def fdt_page(self, blob_len: int) -> bytes:
        raw = json.dumps(self.fdt_document(blob_len), sort_keys=True).encode()
        if len(raw) >= PAGE_SIZE:
            raise ValueError("FDT does not fit in a page")
        return raw + bytes(PAGE_SIZE - len(raw))

    def page(self, gfn: int, blob: bytes = b"") -> bytes:
        """The content of ``gfn`` after the guest has loaded itself (``blob`` in its region)."""
        gpa = gpa_of(gfn)
        if gpa == self.fdt:
            return self.fdt_page(len(blob))
        if self.blob_start <= gpa < self.data_start:
            off = gpa - self.blob_start
            chunk = blob[off:off + PAGE_SIZE]
            return chunk + bytes(PAGE_SIZE - len(chunk))
        return self._random_page(gfn)

    def pages(self, blob: bytes = b"") -> Iterator[bytes]:
        for gfn in range(self.npages):
            yield self.page(gfn, blob)

    # -- measurements (what the ESM blob's digests cover) ---------------------------------------

    def kernel_bytes(self) -> bytes:
        first = 1
        raw = b"".join(self._random_page(g) for g in range(first, first + self.kernel_pages))
        return raw[: self.kernel_size]

    def initrd_bytes(self) -> bytes:
        first = self.initrd_start // PAGE_SIZE
        return b"".join(self._random_page(g) for g in range(first, first + self.initrd_pages))

    def digests(self) -> dict:
        return {
            "kernel": hashlib.sha512(self.kernel_bytes()).hexdigest(),
            "kernel-size": self.kernel_size,
            "initrd": hashlib.sha512(self.initrd_bytes()).hexdigest(),
            "bootargs": hashlib.sha512(self.bootargs.encode()).hexdigest(),
        }


def page_digest(data: bytes) -> str:
    """What a history keeps of a page: enough to recognise it, nothing to read."""
    return hashlib.sha256(data).hexdigest()[:24]
