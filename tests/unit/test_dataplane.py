"""The shared-memory data plane's batched copies (pefsim/dataplane.py) on a real file."""
from __future__ import annotations

import os

import pytest

from pefsim.abi import PAGE_SIZE
from pefsim.dataplane import FileBatch


def test_file_batch_moves_consecutive_pages_in_one_call_each_run(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"".join(bytes([i]) * PAGE_SIZE for i in range(8)))
    fd = os.open(path, os.O_RDWR)
    calls = []

    def preadv(fd_, bufs, offset):
        calls.append((offset, len(bufs)))
        return os.preadv(fd_, bufs, offset)
    try:
        frames = [bytearray(PAGE_SIZE) for _ in range(5)]
        batch = FileBatch(preadv)
        for frame, page in zip(frames, (0, 1, 2, 5, 6)):  # two runs: 0-2 and 5-6
            batch.add(fd, page * PAGE_SIZE, memoryview(frame))
        assert calls == []  # nothing moves before the flush
        batch.flush()
        assert calls == [(0, 3), (5 * PAGE_SIZE, 2)]
        assert [f[0] for f in frames] == [0, 1, 2, 5, 6] and all(len(set(f)) == 1 for f in frames)

        writes = FileBatch(os.pwritev)
        writes.add(fd, 7 * PAGE_SIZE, b"\xee" * PAGE_SIZE)
        writes.flush()
        assert os.pread(fd, PAGE_SIZE, 7 * PAGE_SIZE) == b"\xee" * PAGE_SIZE

        short = FileBatch(os.preadv)
        short.add(fd, 8 * PAGE_SIZE, memoryview(bytearray(PAGE_SIZE)))  # past the end of the file
        with pytest.raises(OSError, match="short transfer"):
            short.flush()
    finally:
        os.close(fd)
