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


def test_file_batch_takes_buffers_of_several_pages(tmp_path):
    """A run's frames come as views of several pages back to back (SecurePool.views): they join
    the run of the page before them, and the flush moves every byte to its place."""
    path = tmp_path / "ram"
    path.write_bytes(bytes(8 * PAGE_SIZE))
    fd = os.open(path, os.O_RDWR)
    try:
        batch = FileBatch(os.pwritev)
        batch.add(fd, 0, b"\x01" * PAGE_SIZE)
        batch.add_run(fd, PAGE_SIZE, [b"\x02" * (3 * PAGE_SIZE), b"\x03" * PAGE_SIZE])
        batch.add_run(fd, 6 * PAGE_SIZE, [b"\x04" * (2 * PAGE_SIZE)])
        assert [(offset, len(bufs), size) for _, offset, bufs, size in batch.runs] == [
            (0, 3, 5 * PAGE_SIZE), (6 * PAGE_SIZE, 1, 2 * PAGE_SIZE)]
        batch.flush()
        data = path.read_bytes()
        assert [data[i * PAGE_SIZE] for i in range(8)] == [1, 2, 2, 2, 3, 0, 4, 4]
    finally:
        os.close(fd)


def test_pool_views_are_one_per_run_of_consecutive_frames():
    from services.ultravisor.core.state import SecurePool

    pool = SecurePool(16, populate=False)
    for frame in range(16):
        pool.view(frame)[:1] = bytes([frame])
    views = pool.views([3, 4, 5, 9, 2, 3])
    assert [len(v) // PAGE_SIZE for v in views] == [3, 1, 2]
    assert [v[0] for v in views] == [3, 9, 2]
    assert pool.views([]) == []
