"""``pefsim bench``: page transfer against the machine's own limits, measured in one run.

  (a) physical references: memcpy of 64 KiB slices between two resident mmaps, the best of three
      passes (the UV's pool and the HV's RAM file are resident too), and raw TCP over loopback
      between two Python processes (sendall / recv_into of 64 KiB buffers into a resident buffer,
      the best of three passes); for information, memcpy and TCP into fresh memory, whose first
      touch (a fault and a zeroing per 4 KiB) costs far more than the copy on these VMs; and the
      bare gRPC stream the page streams run on (grpc_Bps: their frames, window, mTLS and
      options, between two processes, nothing done with the frames), the ceiling of the stream;
  (b) pefsim's ESM page-in and abort page-out of a guest (default 1 GiB) over the gRPC stream,
      over shared memory (the best of SHM_RUNS runs, as memcpy is the best of its passes; every
      run in the JSON's shm_runs), and with one unary call a page (on a smaller guest), each
      timed by the services' own phase metrics (the UV's ESM page-in, the HV's abort page-out
      phase); the abort latency is the whole abort, H_SVM_INIT_ABORT issued to answered;
  (c) control-plane latency of a simple hcall (H_SVM_PAGE_OUT of a page that is not secure: the
      checks, the lock and H_SUCCESS), p50 / p99;
  (d) the HV's and UV's peak RSS;
  and, with --sizes, (b) and (d) again at each of several guest sizes (how cost grows with the
  guest: the ``sizes`` array); with --scaling, N guests aborting at once (how it grows with the
  number of guests: the ``scaling`` array); with --channel-options, the stream page-in and
  page-out under each of a set of gRPC channel arguments (CHANNEL_VARIANTS, handed to every
  service through $PEFSIM_GRPC_OPTIONS), in paired rounds, so which of them matter is measured
  here rather than assumed. --plot DIR draws the result (matplotlib, the optional extra
  ``pefsim[plots]``: imported by plot() alone, never by the services); --from RESULT.json draws
  a result saved with --json again without measuring anything.

Speeds are ratios to (a), printed with the targets they are held to; they are measurements, not
tests (tests only check that the bench runs and its JSON is well formed).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pefsim.abi import PAGE_SHIFT, PAGE_SIZE, H, Role
from pefsim.blob import make_blob
from pefsim.ops.demo import Operator
from pefsim.image import GuestImage
from pefsim.ops.stack import LocalStack, StackConfig
from pefsim.v1 import common_pb2, guest_pb2, hypervisor_pb2 as hpb

MiB = 1 << 20
GiB = 1 << 30
RSS_HEADROOM = 64 * MiB  # each service's RSS bound: its guest memory (HV) or secure pool (UV) + this


class Progress:
    def __init__(self, steps: int, enabled: bool):
        self.steps, self.done, self.enabled = steps, 0, enabled

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.steps
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.steps} {what:<48}")
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# -- (a) physical references -----------------------------------------------------------------------

def touched_mmap(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    for off in range(0, size, PAGE_SIZE):
        m[off:off + PAGE_SIZE] = page
    return m


def memcpy_Bps(size: int, fresh: bool = False, passes: int = 3) -> float:
    """64 KiB slices from one resident mmap to another, the best of ``passes`` passes (one pass
    swings by a third on these VMs; the best is the machine's limit, the strictest reference);
    ``fresh``: one pass into memory never touched."""
    src, dst = touched_mmap(size), (mmap.mmap(-1, size) if fresh else touched_mmap(size))
    s, d = memoryview(src), memoryview(dst)
    seconds = float("inf")
    for _ in range(1 if fresh else passes):
        t0 = time.perf_counter()
        for off in range(0, size, PAGE_SIZE):
            d[off:off + PAGE_SIZE] = s[off:off + PAGE_SIZE]
        seconds = min(seconds, time.perf_counter() - t0)
    s.release()
    d.release()
    src.close()
    dst.close()
    return size / seconds


RECEIVER = r"""
import mmap, socket, sys
size, port, passes, resident = (int(x) for x in sys.argv[1:5])
buf = mmap.mmap(-1, size)
if resident:  # as the UV's pool: every frame faulted in before the first byte arrives
    try:
        buf.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
    except OSError:
        for off in range(0, size, 4096):
            buf[off] = 1
view = memoryview(buf)
s = socket.create_connection(("127.0.0.1", port))
for _ in range(passes):
    got = 0
    while got < size:
        n = s.recv_into(view[got:got + 65536])
        if not n:
            sys.exit(1)
        got += n
    s.sendall(b"k")
"""


def tcp_Bps(size: int, resident: bool = True, passes: int = 3) -> float:
    """Raw TCP over loopback between two processes, 64 KiB sends and receives: the best of
    ``passes`` passes into a receive buffer resident before the first (the UV's pool it is held
    against is resident from its start: the strictest honest reference), or, with
    ``resident=False``, one pass into fresh memory (a fault and a zeroing per 4 KiB: for
    information only)."""
    src = touched_mmap(size)
    view = memoryview(src)
    passes = passes if resident else 1
    seconds = float("inf")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        child = subprocess.Popen([sys.executable, "-c", RECEIVER, str(size), str(listener.getsockname()[1]),
                                  str(passes), str(int(resident))])
        conn, _ = listener.accept()
        with conn:
            for _ in range(passes):
                t0 = time.perf_counter()
                for off in range(0, size, PAGE_SIZE):
                    conn.sendall(view[off:off + PAGE_SIZE])
                if conn.recv(1) != b"k":
                    raise RuntimeError("the TCP reference's receiver ended early")
                seconds = min(seconds, time.perf_counter() - t0)
    if child.wait() != 0:
        raise RuntimeError("the TCP reference's receiver failed")
    view.release()
    src.close()
    return size / seconds


GRPC_RECEIVER = r"""
import asyncio, sys
from pathlib import Path
import grpc
from pefsim import rpc
from pefsim.tls import Tls

async def main(tls_dir, port_file):
    async def frames(requests, context):
        async for _ in requests:  # the frame is dropped: the transport alone is measured
            yield b"k"
    handler = grpc.stream_stream_rpc_method_handler(frames, request_deserializer=None, response_serializer=None)
    server, port = await rpc.start_server("127.0.0.1:0", [grpc.method_handlers_generic_handler(
        "pefsim.bench.Frames", {"Send": handler})], tls=Tls(Path(tls_dir), "uv"))
    Path(port_file).write_text(str(port))
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench ends or dies

rpc.run(lambda: main(*sys.argv[1:3]))
"""


def grpc_Bps(size: int, root: Path, passes: int = 3) -> float:
    """The bare gRPC stream the page streams run on, between two processes: ``size`` bytes in
    frames as large as a page stream's (MAX_DATA_PAGES pages), WINDOW of them in flight (as the
    HV's page-in stream keeps), over mTLS with the services' channel and server options, to a
    handler that drops them; the best of ``passes``. What gRPC and TLS allow here with none of
    pefsim's work (the frames are made once, the receiver neither parses nor copies them): the
    ceiling the stream is measured against, for information."""
    from pefsim import rpc, tls
    from pefsim.dataplane import MAX_DATA_PAGES
    from services.hypervisor.core.bulk import WINDOW

    certs = root / "grpc-reference-tls"
    certs.mkdir()
    tls.make_ca(certs)
    for identity in ("uv", "hv"):
        tls.make_cert(certs, identity)
    port_file = root / "grpc-reference.port"
    child = subprocess.Popen([sys.executable, "-c", GRPC_RECEIVER, str(certs), str(port_file)], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gRPC reference's receiver did not start")
            time.sleep(0.05)
        frame = bytes(touched_mmap(MAX_DATA_PAGES * PAGE_SIZE))
        count = max(1, size // len(frame))

        async def send() -> float:
            channel = rpc.channel(f"127.0.0.1:{port_file.read_text()}", Role.ROLE_HV, "hv",
                                  tls.Tls(certs, "hv"), "uv")
            stream = channel.stream_stream("/pefsim.bench.Frames/Send")
            best = float("inf")
            try:
                for _ in range(passes):
                    window = asyncio.Semaphore(WINDOW)

                    async def frames():
                        for _ in range(count):
                            await window.acquire()
                            yield frame

                    t0 = time.perf_counter()
                    async for _ in stream(frames()):
                        window.release()
                    best = min(best, time.perf_counter() - t0)
            finally:
                await channel.close()
            return best

        seconds = asyncio.run(send())
    finally:
        child.kill()
        child.wait()
    return count * len(frame) / seconds


# -- (b) pefsim ---------------------------------------------------------------------------------------

def scrape(addr: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def file_system(path: Path) -> str:
    """The type of the file system ``path`` is on (ext4, tmpfs, ...), from /proc/self/mounts:
    what the HV's guest RAM files live on decides how shared memory grows with guest size
    (docs/performance.md)."""
    best, fs = "", "unknown"
    real = os.path.realpath(path)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return fs
    for line in mounts:
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fs = point, fields[2]
    return fs


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start_stack(root: Path, mode: str, pool_bytes: int, env: dict | None = None) -> LocalStack:
    cfg = StackConfig(run_dir=root / mode, transfer="unary" if mode == "unary" else "stream",
                      shared_memory=mode == "shm", pool_pages=max(pool_bytes // PAGE_SIZE, 16), env=env or {})
    return LocalStack(cfg).start()


@contextlib.contextmanager
def bench_stack(root: Path, mode: str, pool_bytes: int, env: dict | None = None):
    """A stack for one measurement, stopped and its data directory removed afterwards: the HV's
    guest RAM files are dirty page cache, and left behind (~5 GiB over a whole run with channel
    options) they would be written back to disk while later measurements run."""
    stack = start_stack(root, mode, pool_bytes, env)
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(stack.run_dir, ignore_errors=True)


async def abort_guests(stack: LocalStack, sizes: list[int], tag: str, together: bool = False) -> list[dict]:
    """Boot guests whose blob does not match (so ESM pages everything in, then aborts and pages
    everything out); returns their reports, in order. ``together``: every guest stops itself
    once its image is loaded (failpoint guest.before_esm=stop) and all go on at once, so their
    ESMs and aborts run side by side rather than next to other guests still loading memory."""
    op = Operator.of(stack)
    extra = ("--resume-timeout", "3600") + (("--failpoint", "guest.before_esm=stop") if together else ())
    try:
        names = []
        for i, size in enumerate(sizes):
            name = f"{tag}-{i}"
            blob = make_blob(GuestImage.of_size(name, size), stack.signing_key(), omit=("kernel",))
            op.guest(name, await asyncio.to_thread(stack.add_guest, name, size, blob, True, False, extra))
            names.append(name)
        boots = asyncio.gather(*(op.guest(n).Boot(guest_pb2.BootRequest(), timeout=3600) for n in names))
        if together:
            await release_together([stack.procs[f"guest-{n}"].popen.pid for n in names], boots)
        boots = await boots
        for rep in boots:
            if rep.report.outcome != "aborted" or not rep.report.memory_intact:
                raise RuntimeError(f"bench guest {rep.report.name}: {rep.report.outcome} {rep.report.detail}")
            await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=rep.report.lpid))
        return [dict(name=r.report.name, abort_s=r.report.abort_latency_s) for r in boots]
    finally:
        await op.close()


async def release_together(pids: list[int], boots: asyncio.Future, timeout: float = 600.0) -> None:
    """Wait until every guest process has stopped itself, then SIGCONT them all."""
    deadline = time.monotonic() + timeout
    try:
        while not all(stopped(pid) for pid in pids):
            if boots.done():
                if boots.exception() is None:
                    raise RuntimeError("bench guests ran through guest.before_esm without stopping")
                return  # a boot failed before its stop: its error is the answer
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench guests not all at their ESM after {timeout} s")
            await asyncio.sleep(0.01)
    finally:
        for pid in pids:  # also on the way out of a failure: no guest is left stopped
            os.kill(pid, signal.SIGCONT)


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def transfer(root: Path, mode: str, size: int, env: dict | None = None) -> dict:
    """Page-in and page-out of one guest of ``size`` bytes in ``mode`` (stream, shm, unary)."""
    with bench_stack(root, mode, size, env) as stack:
        asyncio.run(abort_guests(stack, [size], mode))
        uv, hv = scrape(stack.metrics_targets()["uv"]), scrape(stack.metrics_targets()["hv"])
        transfer_label = "unary" if mode == "unary" else "stream"
        pagein_s = uv[f'pefsim_uv_esm_page_in_duration_seconds_sum{{transfer="{transfer_label}"}}']
        pageout_s = hv['pefsim_hv_abort_phase_duration_seconds_sum{phase="page-out"}']
        abort_e2e_s = sum(v for k, v in uv.items() if k.startswith("pefsim_uv_abort_duration_seconds_sum"))
        return {"pagein_Bps": size / pagein_s, "pageout_Bps": size / pageout_s, "abort_s": abort_e2e_s,
                "hv_rss": peak_rss(stack.procs["hv"].popen.pid), "uv_rss": peak_rss(stack.procs["uv"].popen.pid),
                "guest_rss": peak_rss(stack.procs[f"guest-{mode}-0"].popen.pid)}


async def hcall_latency(stack: LocalStack, n: int) -> list[float]:
    from pefsim import rpc
    from pefsim.v1 import hypervisor_pb2_grpc

    op = Operator.of(stack)
    uv_role = rpc.Peer(stack.hv_addr, Role.ROLE_UV, hypervisor_pb2_grpc.HypervisorServiceStub, "uv",
                       stack.tls("uv"), "hv")
    try:
        vm = await op.hv.stub.CreateVm(hpb.CreateVmRequest(
            name="hcall-bench", vcpu_endpoint="127.0.0.1:1", secure_capable=True,
            memslots=[common_pb2.Memslot(slot_id=0, base_gfn=0, npages=16)]))
        await uv_role.stub.H_SVM_INIT_START(hpb.HSvmInitStartRequest(lpid=vm.lpid))  # -> transient
        request = hpb.HSvmPageOutRequest(lpid=vm.lpid, guest_pa=0, flags=0, order=PAGE_SHIFT)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            rc = (await uv_role.stub.H_SVM_PAGE_OUT(request)).rc
            samples.append(time.perf_counter() - t0)
            assert rc == H.H_SUCCESS, rc
        await op.hv.stub.DestroyVm(hpb.DestroyVmRequest(lpid=vm.lpid))
        return samples
    finally:
        await uv_role.close()
        await op.close()


def scaling(root: Path, counts: list[int], guest_bytes: int, progress: Progress) -> list[dict]:
    rows = []
    for n in counts:
        with bench_stack(root / f"scale-{n}", "shm", n * guest_bytes) as stack:
            t0 = time.perf_counter()
            reports = asyncio.run(abort_guests(stack, [guest_bytes] * n, f"s{n}", together=True))
            uv = scrape(stack.metrics_targets()["uv"])
            wall = time.perf_counter() - t0
            lat = sorted(r["abort_s"] for r in reports)
            pagein_s = sum(v for k, v in uv.items() if k.startswith("pefsim_uv_esm_page_in_duration_seconds_sum"))
            rows.append({"guests": n, "guest_bytes": guest_bytes, "wall_s": round(wall, 3),
                         "abort_MBps": round(n * guest_bytes / 1e6 / max(lat[-1], 1e-9), 1),
                         "pagein_busy_s": round(pagein_s, 3),
                         "abort_p50_s": round(statistics.median(lat), 4),
                         "abort_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4)})
        progress.step(f"{n} guests aborting at once")
    return rows


# gRPC channel arguments worth measuring for the bulk stream (on both ends of every channel).
CHANNEL_VARIANTS = [
    ("as shipped (pefsim.rpc)", {}),
    ("BDP probing on (gRPC default)", {"grpc.http2.bdp_probe": 1}),
    ("receive window 1 MiB", {"grpc.http2.lookahead_bytes": 1 << 20}),
    ("max HTTP/2 frame 16 MiB", {"grpc.http2.max_frame_size": (16 << 20) - 1}),
    ("write buffer 4 MiB", {"grpc.http2.write_buffer_size": 4 << 20}),
    ("TCP reads of 1-4 MiB", {"grpc.experimental.tcp_min_read_chunk_size": 1 << 20,
                              "grpc.experimental.tcp_max_read_chunk_size": 4 << 20}),
    ("TCP reads of at most 64 KiB", {"grpc.experimental.tcp_max_read_chunk_size": 64 << 10}),
]


def channel_options(root: Path, guest_bytes: int, rounds: int, progress: Progress) -> list[dict]:
    """Each variant's stream page-in and page-out, ``rounds`` times in turn (paired rounds: a slow
    moment of the machine hits every variant alike); medians."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in CHANNEL_VARIANTS}
    for r in range(rounds):
        for i, (name, options) in enumerate(CHANNEL_VARIANTS):
            env = {"PEFSIM_GRPC_OPTIONS": json.dumps(options)} if options else {}
            runs[name].append(transfer(root / f"opts-{r}-{i}", "stream", guest_bytes, env))
        progress.step(f"channel options, round {r + 1}/{rounds}")
    return [{"variant": name, "options": options,
             "pagein_MBps": round(statistics.median(x["pagein_Bps"] for x in runs[name]) / 1e6, 1),
             "pageout_MBps": round(statistics.median(x["pageout_Bps"] for x in runs[name]) / 1e6, 1),
             "hv_rss_bytes": max(x["hv_rss"] for x in runs[name]),
             "uv_rss_bytes": max(x["uv_rss"] for x in runs[name])}
            for name, options in CHANNEL_VARIANTS]


TARGETS = [
    ("stream page-in and page-out >= 0.35 x raw TCP", lambda r: min(r["pagein_stream_MBps"], r["pageout_stream_MBps"]) / r["tcp_MBps"], 0.35, ">="),
    ("shared memory >= 0.5 x memcpy", lambda r: min(r["pagein_shm_MBps"], r["pageout_shm_MBps"]) / r["memcpy_MBps"], 0.5, ">="),
    ("bulk stream >= 12 x unary", lambda r: r["pagein_stream_MBps"] / r["pagein_unary_MBps"], 12, ">="),
    ("shared memory >= 50 x unary", lambda r: r["pagein_shm_MBps"] / r["pagein_unary_MBps"], 50, ">="),
    ("abort (stream) <= 3.5 x raw TCP time", lambda r: r["abort_latency_s"]["stream"] / (r["guest_bytes"] / (r["tcp_MBps"] * 1e6)), 3.5, "<="),
    ("abort (shm) <= 3 x memcpy time", lambda r: r["abort_latency_s"]["shm"] / (r["guest_bytes"] / (r["memcpy_MBps"] * 1e6)), 3.0, "<="),
    ("HV RSS <= guest + 64 MiB", lambda r: r["hv_rss_bytes"] / (r["guest_bytes"] + RSS_HEADROOM), 1.0, "<="),
    ("UV RSS <= secure pool + 64 MiB", lambda r: r["uv_rss_bytes"] / (r["guest_bytes"] + RSS_HEADROOM), 1.0, "<="),
]

# What pefsim's own work costs the stream: the page streams against the bare gRPC stream they run
# on (grpc_Bps: same frames, window, TLS and options, nothing done with the frames).
GRPC_TARGET = ("stream page-in and page-out >= 0.7 x bare gRPC stream",
               lambda r: min(r["pagein_stream_MBps"], r["pageout_stream_MBps"]) / r["grpc_MBps"], 0.7, ">=")

# The shared-memory path is compared with memcpy, which is the best of 3 passes; it gets the same
# rule (one run of it swings 7.8-11.6 GB/s on these VMs), and the JSON keeps every run.
SHM_RUNS = 3


def best_of(runs: list[dict]) -> dict:
    """The best rate and abort time over runs of transfer(), and the highest peak RSS."""
    return {"pagein_Bps": max(r["pagein_Bps"] for r in runs), "pageout_Bps": max(r["pageout_Bps"] for r in runs),
            "abort_s": min(r["abort_s"] for r in runs),
            "hv_rss": max(r["hv_rss"] for r in runs), "uv_rss": max(r["uv_rss"] for r in runs),
            "guest_rss": max(r["guest_rss"] for r in runs)}


def stream_and_shm(root: Path, size: int, progress: Progress, what: str) -> tuple[dict, list[dict]]:
    """A guest of ``size`` bytes over the gRPC stream once and over shared memory SHM_RUNS times
    (each a fresh stack under ``root``), a progress step each."""
    stream = transfer(root, "stream", size)
    progress.step(f"{what}, gRPC stream")
    shm_runs = []
    for i in range(SHM_RUNS):
        shm_runs.append(transfer(root / f"shm-{i}", "shm", size))
        progress.step(f"{what}, shared memory, {i + 1}/{SHM_RUNS}")
    return stream, shm_runs


def size_row(size: int, stream: dict, shm_runs: list[dict], unary: dict | None = None,
             unary_bytes: int = 0) -> dict:
    """One row of the ``sizes`` array: a guest of ``size`` bytes over the stream (one run) and
    shared memory (the best of its runs), and with ``unary`` (the smallest size only) one call a
    page. RSS: the highest peak of any run at this size; the bound is the guest (the HV's RAM
    file) or the pool (the UV's, as large as the guest) + 64 MiB."""
    shm = best_of(shm_runs)
    runs = [stream, *shm_runs, *([unary] if unary else [])]
    latency = {"stream": round(stream["abort_s"], 4), "shm": round(shm["abort_s"], 4)}
    row = {"guest_bytes": size,
           "pagein_stream_MBps": round(stream["pagein_Bps"] / 1e6, 1),
           "pageout_stream_MBps": round(stream["pageout_Bps"] / 1e6, 1),
           "pagein_shm_MBps": round(shm["pagein_Bps"] / 1e6, 1),
           "pageout_shm_MBps": round(shm["pageout_Bps"] / 1e6, 1),
           "abort_latency_s": latency,
           "abort_s_per_GiB": {path: round(s * GiB / size, 4) for path, s in latency.items()},
           "hv_rss_bytes": max(r["hv_rss"] for r in runs), "uv_rss_bytes": max(r["uv_rss"] for r in runs),
           "rss_bound_bytes": size + RSS_HEADROOM,
           "guest_rss_bytes": max(r["guest_rss"] for r in runs),  # no bound: it keeps no copy of its memory
           "shm_runs": [{"pagein_MBps": round(r["pagein_Bps"] / 1e6, 1),
                         "pageout_MBps": round(r["pageout_Bps"] / 1e6, 1),
                         "abort_s": round(r["abort_s"], 4)} for r in shm_runs]}
    if unary:
        row.update(unary_bytes=unary_bytes, pagein_unary_MBps=round(unary["pagein_Bps"] / 1e6, 2),
                   pageout_unary_MBps=round(unary["pageout_Bps"] / 1e6, 2))
        latency["unary"] = round(unary["abort_s"], 4)
    return row


def run(guest_bytes: int = 1 << 30, unary_bytes: int = 64 * MiB, hcalls: int = 2000,
        scale_counts: list[int] | None = None, scale_guest_bytes: int = 16 * MiB, show_progress: bool = True,
        option_rounds: int = 0, option_guest_bytes: int = 256 * MiB, sizes: list[int] | None = None,
        data_dir: Path | None = None) -> dict:
    """``sizes``: guest sizes (bytes) measured again one by one, each over the stream once and
    over shared memory SHM_RUNS times, and the smallest also one call a page (unary, at that very
    size); a size equal to ``guest_bytes`` reuses the runs already made for it. ``data_dir``: where
    the stacks keep their data, the HV's guest RAM files included (default: the temp directory);
    its file system is in the result (``data_fs``)."""
    sizes = sorted(set(sizes or []))
    extra = [n for n in sizes if n != guest_bytes]
    progress = Progress(8 + SHM_RUNS + len(scale_counts or []) + option_rounds + len(extra) * (1 + SHM_RUNS)
                        + bool(sizes), show_progress)
    with tempfile.TemporaryDirectory(prefix="pefsim-bench-", dir=data_dir) as tmp:
        root = Path(tmp)
        data_fs = file_system(root)
        memcpy = memcpy_Bps(guest_bytes)
        memcpy_fresh = memcpy_Bps(guest_bytes, fresh=True)
        progress.step("memcpy of 64 KiB slices")
        tcp = tcp_Bps(guest_bytes)
        tcp_fresh = tcp_Bps(guest_bytes, resident=False)
        progress.step("raw TCP over loopback")
        grpc_ref = grpc_Bps(guest_bytes, root)
        progress.step("bare gRPC stream (mTLS)")
        stream, shm_runs = stream_and_shm(root, guest_bytes, progress, "ESM page-in and abort page-out")
        unary_size = min(unary_bytes, guest_bytes)
        unary = transfer(root, "unary", unary_size)
        progress.step("ESM page-in and abort page-out, unary")
        size_rows = []
        for size in sizes:
            if size == guest_bytes:
                size_stream, size_shm = stream, shm_runs
            else:
                size_stream, size_shm = stream_and_shm(root / f"size-{size}", size, progress, f"{size / MiB:g} MiB guest")
            size_unary = None
            if size == sizes[0]:  # one call a page is slow: the smallest size only
                size_unary = unary if size == unary_size else transfer(root / f"size-{size}", "unary", size)
                progress.step(f"{size / MiB:g} MiB guest, unary")
            size_rows.append(size_row(size, size_stream, size_shm, size_unary, size))
        with bench_stack(root, "hcall", 16 * PAGE_SIZE) as stack:
            samples = sorted(asyncio.run(hcall_latency(stack, hcalls)))
        progress.step("hcall latency")
        rows = scaling(root, scale_counts or [], scale_guest_bytes, progress)
        options = channel_options(root, option_guest_bytes, option_rounds, progress) if option_rounds else []
        progress.step("done")
        progress.end()
    main = size_row(guest_bytes, stream, shm_runs)  # the guest size's figures, as each --sizes row has them
    result = {
        "guest_bytes": guest_bytes, "data_fs": data_fs,
        "memcpy_MBps": round(memcpy / 1e6, 1), "memcpy_fresh_MBps": round(memcpy_fresh / 1e6, 1),
        "tcp_MBps": round(tcp / 1e6, 1), "tcp_fresh_MBps": round(tcp_fresh / 1e6, 1),
        "grpc_MBps": round(grpc_ref / 1e6, 1),
        **{key: main[key] for key in ("pagein_stream_MBps", "pageout_stream_MBps", "pagein_shm_MBps",
                                      "pageout_shm_MBps", "abort_latency_s", "hv_rss_bytes", "uv_rss_bytes",
                                      "shm_runs")},
        "pagein_unary_MBps": round(unary["pagein_Bps"] / 1e6, 2),
        "hcall_p50_us": round(statistics.median(samples) * 1e6, 1),
        "hcall_p99_us": round(samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e6, 1),
    }
    if size_rows:
        result["sizes"] = size_rows
    if rows:
        result["scaling"] = rows
    if options:
        result["channel_options"] = options
    return result


# Guest counts held to >= 0.8 x one guest's aggregate, each when it and 1 were measured.
SCALING_TARGETS = (16, 64)
# The largest guest's abort time per GiB against 1 GiB's (no bookkeeping that grows faster than the
# guest), when 1 GiB and a larger size were measured.
PER_GIB_BOUND = 1.2


def size_targets(result: dict) -> list:
    """The --sizes targets: per-GiB abort time of the largest size against 1 GiB's, each path;
    the RSS bounds at every size."""
    rows = {row["guest_bytes"]: row for row in result.get("sizes", [])}
    out = []
    if GiB in rows and max(rows) > GiB:
        big = rows[max(rows)]
        for path in ("stream", "shm"):
            out.append((f"abort per GiB at {big['guest_bytes'] / MiB:.0f} MiB <= {PER_GIB_BOUND} x 1 GiB's ({path})",
                        lambda r, big=big, path=path: big["abort_s_per_GiB"][path] / rows[GiB]["abort_s_per_GiB"][path],
                        PER_GIB_BOUND, "<="))
    for size, row in rows.items():
        for who, what in (("hv", "guest"), ("uv", "pool")):
            out.append((f"{who.upper()} RSS <= {what} + 64 MiB at {size / MiB:g} MiB",
                        lambda r, row=row, who=who: row[f"{who}_rss_bytes"] / row["rss_bound_bytes"], 1.0, "<="))
    return out


def targets(result: dict) -> list[tuple[str, float, float, str, bool]]:
    out = []
    rows = {row["guests"]: row for row in result.get("scaling", [])}
    extra = [(f"{n} guests aborting at once >= 0.8 x one guest",
              lambda r, n=n: rows[n]["abort_MBps"] / rows[1]["abort_MBps"], 0.8, ">=")
             for n in SCALING_TARGETS if 1 in rows and n in rows]
    if "grpc_MBps" in result:  # results saved before the bare-gRPC reference have none
        extra.insert(0, GRPC_TARGET)
    for name, ratio, bound, op in TARGETS + size_targets(result) + extra:
        value = ratio(result)
        out.append((name, value, bound, op, value >= bound if op == ">=" else value <= bound))
    return out


def render(result: dict) -> str:
    mb = result["guest_bytes"] / MiB
    lines = [f"pefsim bench: guest {mb:.0f} MiB, {os.cpu_count()} CPUs, guest RAM files on "
             f"{result.get('data_fs', '?')}", "",
             f"{'what':<44}{'value':>14}", "-" * 58]
    for key, label, unit in [
        ("memcpy_MBps", "memcpy, 64 KiB slices", "MB/s"),
        ("memcpy_fresh_MBps", "memcpy into fresh memory (first touch)", "MB/s"),
        ("tcp_MBps", "raw TCP loopback, 64 KiB, resident (best of 3)", "MB/s"),
        ("tcp_fresh_MBps", "raw TCP into fresh memory (first touch)", "MB/s"),
        ("grpc_MBps", "bare gRPC stream, mTLS, 512 KiB frames", "MB/s"),
        ("pagein_stream_MBps", "ESM page-in, gRPC stream", "MB/s"),
        ("pageout_stream_MBps", "abort page-out, gRPC stream", "MB/s"),
        ("pagein_shm_MBps", f"ESM page-in, shared memory (best of {SHM_RUNS})", "MB/s"),
        ("pageout_shm_MBps", f"abort page-out, shared memory (best of {SHM_RUNS})", "MB/s"),
        ("pagein_unary_MBps", "ESM page-in, one H_SVM_PAGE_IN a page", "MB/s"),
        ("hcall_p50_us", "hcall latency p50", "us"), ("hcall_p99_us", "hcall latency p99", "us")]:
        if key in result:  # a result saved before the reference existed
            lines.append(f"{label:<44}{result[key]:>10} {unit}")
    lines.append(f"{'abort latency, stream / shared memory':<44}{result['abort_latency_s']['stream']:>8.3f} s / "
                 f"{result['abort_latency_s']['shm']:.3f} s")
    lines.append(f"{'shared memory, each run, in / out':<44}"
                 + ", ".join(f"{r['pagein_MBps']:.0f} / {r['pageout_MBps']:.0f}" for r in result["shm_runs"]) + " MB/s")
    lines.append(f"{'peak RSS, HV / UV':<44}{result['hv_rss_bytes'] / MiB:>8.0f} / {result['uv_rss_bytes'] / MiB:.0f} MiB")
    verdicts = targets(result)
    width = max(44, *(len(name) for name, *_ in verdicts))
    lines += ["", "targets (ratios measured in this run)", "-" * (width + 20)]
    for name, value, bound, op, ok in verdicts:
        shown = f"{value:6.4f}" if abs(value - bound) < 0.005 * bound else f"{value:6.2f}"  # 1.0004 is not 1.00
        lines.append(f"{'ok  ' if ok else 'MISS'} {name:<{width}} {shown:>6} ({op} {bound})")
    if result.get("sizes"):
        lines += ["", "by guest size (MB/s; abort s, and s per GiB; peak RSS against guest or pool + 64 MiB)",
                  "-" * 100,
                  f"{'MiB':>6} {'stream in / out':>15} {'shm in / out':>15} {'abort stream (/GiB)':>20}"
                  f" {'abort shm (/GiB)':>18} {'RSS HV / UV / bound MiB':>24} {'guest RSS':>9}"]
        for row in result["sizes"]:
            lat, per = row["abort_latency_s"], row["abort_s_per_GiB"]
            rss = " / ".join(f"{row[k] / MiB:.0f}" for k in ("hv_rss_bytes", "uv_rss_bytes", "rss_bound_bytes"))
            stream = f"{row['pagein_stream_MBps']:.0f} / {row['pageout_stream_MBps']:.0f}"
            shm = f"{row['pagein_shm_MBps']:.0f} / {row['pageout_shm_MBps']:.0f}"
            lines.append(f"{row['guest_bytes'] / MiB:>6g} {stream:>15} {shm:>15} "
                         f"{lat['stream']:>9.3f} ({per['stream']:>7.3f}) {lat['shm']:>8.3f} ({per['shm']:>6.3f})"
                         f" {rss:>24} {row.get('guest_rss_bytes', 0) / MiB:>9.0f}")
        for row in result["sizes"]:
            if "pagein_unary_MBps" in row:
                lines.append(f"one call a page (unary), {row['unary_bytes'] / MiB:g} MiB: "
                             f"{row['pagein_unary_MBps']} / {row['pageout_unary_MBps']} MB/s in / out, "
                             f"abort {row['abort_latency_s']['unary']:.3f} s")
    if result.get("scaling"):
        lines += ["", "guests aborting at once (shared memory)", "-" * 58,
                  f"{'N':>4} {'aggregate MB/s':>15} {'abort p50 s':>12} {'abort p99 s':>12}"]
        for row in result["scaling"]:
            lines.append(f"{row['guests']:>4} {row['abort_MBps']:>15.1f} {row['abort_p50_s']:>12.3f} {row['abort_p99_s']:>12.3f}")
    if result.get("channel_options"):
        lines += ["", "gRPC channel options, stream (medians of paired rounds)", "-" * 76,
                  f"{'variant':<30} {'page-in MB/s':>13} {'page-out MB/s':>14} {'HV / UV peak RSS MiB':>21}"]
        for row in result["channel_options"]:
            rss = f"{row['hv_rss_bytes'] / MiB:.0f} / {row['uv_rss_bytes'] / MiB:.0f}"
            lines.append(f"{row['variant']:<30} {row['pagein_MBps']:>13.1f} {row['pageout_MBps']:>14.1f} {rss:>21}")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------------

PLOTS = ("throughput_vs_size", "scaling", "rss_vs_size")


def plotting_missing() -> str | None:
    """Why --plot cannot draw (one line), or None; asked before measuring, without importing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return ("--plot needs matplotlib, which is not installed: pip install 'pefsim[plots]' "
                "(or -r requirements-dev.txt in a checkout)")
    return None


def rows_by_size(result: dict) -> list[dict]:
    """The ``sizes`` rows, or, from a run without --sizes, the one size it measured."""
    if result.get("sizes"):
        return result["sizes"]
    keys = ("guest_bytes", "pagein_stream_MBps", "pageout_stream_MBps", "pagein_shm_MBps", "pageout_shm_MBps",
            "hv_rss_bytes", "uv_rss_bytes")
    return [{**{k: result[k] for k in keys}, "rss_bound_bytes": result["guest_bytes"] + RSS_HEADROOM}]


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Draw ``result`` (run()'s, or a saved --json) into ``out_dir`` as SVG and PNG: throughput
    against guest size per path with the memcpy and TCP references as lines; aggregate throughput
    and abort p50 / p99 against guest count (with --scaling); peak RSS against guest size with
    the bound. Returns the files written. matplotlib is imported here and nowhere else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plt.rcParams.update({"svg.hashsalt": "pefsim-bench", "figure.dpi": 100, "font.size": 9})
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    count = FuncFormatter(lambda x, _: f"{x:g}")

    def save(fig, name: str) -> None:
        fig.tight_layout()
        for ext, meta in (("svg", {"Date": None}), ("png", {"Software": None})):
            path = out_dir / f"{name}.{ext}"
            fig.savefig(path, format=ext, metadata=meta, dpi=120 if ext == "png" else None)
            written.append(path)
        plt.close(fig)

    rows = rows_by_size(result)
    mib = [row["guest_bytes"] / MiB for row in rows]

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for key, label, style in (("pagein_shm_MBps", "ESM page-in, shared memory", "o-"),
                              ("pageout_shm_MBps", "abort page-out, shared memory", "s--"),
                              ("pagein_stream_MBps", "ESM page-in, gRPC stream", "o-"),
                              ("pageout_stream_MBps", "abort page-out, gRPC stream", "s--")):
        ax.plot(mib, [row[key] for row in rows], style, label=label)
    unary = [row for row in rows if "pagein_unary_MBps" in row]
    if unary:
        ax.plot([row["unary_bytes"] / MiB for row in unary], [row["pagein_unary_MBps"] for row in unary], "v",
                color="grey", label="ESM page-in, one call a page")
    for key, label, style in (("memcpy_MBps", "memcpy (resident, best of 3)", ":"),
                              ("tcp_MBps", "raw TCP loopback (resident, best of 3)", "-."),
                              ("grpc_MBps", "bare gRPC stream, mTLS (best of 3)", "--")):
        if key in result:
            ax.axhline(result[key], color="black", linestyle=style, linewidth=1,
                       label=f"{label}: {result[key]:.0f} MB/s at {result['guest_bytes'] / MiB:g} MiB")
    ax.set(xscale="log", yscale="log", xlabel="guest size (MiB)", ylabel="MB/s",
           title="Page transfer against guest size")
    ax.set_xticks(mib)
    ax.xaxis.set_major_formatter(count)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    ax.yaxis.set_major_formatter(count)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    save(fig, "throughput_vs_size")

    scaling_rows = result.get("scaling") or []
    if scaling_rows:
        guests = [row["guests"] for row in scaling_rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
        left.plot(guests, [row["abort_MBps"] for row in scaling_rows], "o-", label="aggregate abort MB/s")
        one = next((row["abort_MBps"] for row in scaling_rows if row["guests"] == 1), None)
        if one is not None:
            left.axhline(0.8 * one, color="black", linestyle=":", linewidth=1, label="target: 0.8 x one guest")
        left.set(xscale="log", xlabel="guests aborting at once", ylabel="MB/s",
                 title=f"Aggregate, {scaling_rows[0]['guest_bytes'] / MiB:g} MiB guests, shared memory")
        right.plot(guests, [row["abort_p50_s"] for row in scaling_rows], "o-", label="abort p50")
        right.plot(guests, [row["abort_p99_s"] for row in scaling_rows], "s--", label="abort p99")
        right.set(xscale="log", xlabel="guests aborting at once", ylabel="seconds", title="Abort latency")
        for ax in (left, right):
            ax.set_xticks(guests)
            ax.xaxis.set_major_formatter(count)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "scaling")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for key, label, style in (("hv_rss_bytes", "HV peak RSS", "o-"), ("uv_rss_bytes", "UV peak RSS", "s--")):
        left.plot(mib, [row[key] / MiB for row in rows], style, label=label)
        right.plot(mib, [(row[key] - row["guest_bytes"]) / MiB for row in rows], style, label=label)
    left.plot(mib, [row["rss_bound_bytes"] / MiB for row in rows], ":", color="black",
              label="bound: guest (pool) + 64 MiB")
    right.axhline(RSS_HEADROOM / MiB, color="black", linestyle=":", linewidth=1, label="bound: + 64 MiB")
    left.set(xscale="log", xlabel="guest size (MiB)", ylabel="MiB", title="Peak RSS")
    right.set(xscale="log", xlabel="guest size (MiB)", ylabel="MiB over the guest (pool)",
              title="Peak RSS less the guest (pool)")
    over = [(row[k] - row["guest_bytes"]) / MiB for row in rows for k in ("hv_rss_bytes", "uv_rss_bytes")]
    right.set_ylim(bottom=0, top=max(RSS_HEADROOM / MiB * 1.25, max(over) * 1.1))
    for row in rows:  # below 0: the HV's RAM file did not all stay resident (memory pressure): said, not drawn
        for k, who in (("hv_rss_bytes", "HV"), ("uv_rss_bytes", "UV")):
            if row[k] < row["guest_bytes"]:
                x = row["guest_bytes"] / MiB
                right.annotate(f"{who}: {(row[k] - row['guest_bytes']) / MiB:.0f} MiB\n(not all resident)", (x, 0),
                               xytext=(x, RSS_HEADROOM / MiB * 0.4), ha="center", fontsize=7,
                               arrowprops={"arrowstyle": "->", "color": "grey"})
    for ax in (left, right):
        ax.set_xticks(mib)
        ax.xaxis.set_major_formatter(count)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "rss_vs_size")
    return written


def main(a) -> int:
    plot_dir = Path(a.plot) if a.plot else None
    if a.from_json and not plot_dir:
        raise ValueError("--from re-plots a saved result: give --plot DIR too")
    if plot_dir and (why := plotting_missing()):
        print(f"pefsim bench: {why}", file=sys.stderr)
        return 3
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        if not isinstance(result, dict) or "guest_bytes" not in result:
            raise ValueError(f"{a.from_json} is not a result of pefsim bench --json")
        for path in plot(result, plot_dir):
            print(path)
        return 0
    for option in ("guest_mib", "unary_mib", "scale_guest_mib", "options_guest_mib"):
        size = int(getattr(a, option) * MiB)
        if size <= 0 or size % (64 << 10):
            raise ValueError(f"--{option.replace('_', '-')} must be a positive multiple of 64 KiB (0.0625 MiB), "
                             f"not {getattr(a, option)}")
    data_dir = Path(a.data_dir) if a.data_dir else None
    if data_dir is not None and not (data_dir.is_dir() and os.access(data_dir, os.W_OK | os.X_OK)):
        print(f"pefsim bench: --data-dir {data_dir} is not a directory this user can write in", file=sys.stderr)
        return 3
    result = run(guest_bytes=int(a.guest_mib * MiB), unary_bytes=int(a.unary_mib * MiB), hcalls=a.hcalls,
                 scale_counts=[int(n) for n in a.scaling.split(",")] if a.scaling else None,
                 scale_guest_bytes=int(a.scale_guest_mib * MiB), show_progress=not a.json,
                 option_rounds=a.channel_options, option_guest_bytes=int(a.options_guest_mib * MiB),
                 sizes=[int(n) * MiB for n in a.sizes.split(",")] if a.sizes else None,
                 data_dir=data_dir)
    verdicts = targets(result)
    if a.json:
        result["targets"] = [{"target": name, "value": round(value, 4), "bound": bound, "op": op, "ok": ok}
                             for name, value, bound, op, ok in verdicts]
    print(json.dumps(result) if a.json else render(result))
    if plot_dir:
        for path in plot(result, plot_dir):
            print(f"pefsim bench: wrote {path}", file=sys.stderr)
    return 0 if all(ok for *_, ok in verdicts) else 1  # a missed target is a failed check
