"""`pefsim bench` runs and prints the documented JSON, and draws it (speeds are measured, not
tested: these tests check structure, never timing)."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pefsim.ops.stack import ROOT

MiB = 1 << 20
KEYS = {"guest_bytes", "memcpy_MBps", "memcpy_fresh_MBps", "tcp_MBps", "tcp_fresh_MBps", "grpc_MBps", "pagein_stream_MBps", "pageout_stream_MBps",
        "pagein_shm_MBps", "pageout_shm_MBps", "pagein_unary_MBps", "abort_latency_s", "hcall_p50_us",
        "hcall_p99_us", "hv_rss_bytes", "uv_rss_bytes"}
SIZE_KEYS = {"guest_bytes", "pagein_stream_MBps", "pageout_stream_MBps", "pagein_shm_MBps", "pageout_shm_MBps",
             "abort_latency_s", "abort_s_per_GiB", "hv_rss_bytes", "uv_rss_bytes", "rss_bound_bytes", "guest_rss_bytes",
             "shm_runs"}
UNARY_KEYS = {"unary_bytes", "pagein_unary_MBps", "pageout_unary_MBps"}
SCALING_KEYS = {"guests", "guest_bytes", "wall_s", "abort_MBps", "pagein_busy_s", "abort_p50_s", "abort_p99_s"}
PLOTS = {f"{name}.{ext}" for name in ("throughput_vs_size", "scaling", "rss_vs_size") for ext in ("svg", "png")}


def pefsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pefsim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One small run of everything (--sizes 1,2 with the 2 MiB guest reused and a fresh unary run at
    1 MiB, as --unary-mib is smaller; 1 and 2 guests at once; one channel-option round; plots)."""
    plots = tmp_path_factory.mktemp("plots")
    out = pefsim("bench", "--guest-mib", "2", "--unary-mib", "0.75", "--hcalls", "50", "--sizes", "1,2",
                 "--scaling", "1,2", "--scale-guest-mib", "1", "--channel-options", "1", "--options-guest-mib", "1",
                 "--plot", str(plots), "--json")
    return out, json.loads(out.stdout), plots


def test_bench_json_is_well_formed(bench):
    out, doc, _ = bench
    # the targets are judged in the JSON, and a missed one is exit 1 (a 2 MiB guest misses some)
    assert [t["target"] for t in doc["targets"]] and all(set(t) == {"target", "value", "bound", "op", "ok"}
                                                          for t in doc["targets"])
    assert out.returncode == (0 if all(t["ok"] for t in doc["targets"]) else 1), out.stderr[-3000:]
    assert KEYS <= set(doc)
    assert doc["guest_bytes"] == 2 * MiB
    assert set(doc["abort_latency_s"]) == {"stream", "shm"}
    assert all(doc[k] > 0 for k in KEYS - {"abort_latency_s"})
    assert all(v > 0 for v in doc["abort_latency_s"].values())
    from pefsim.ops.bench import SHM_RUNS

    runs = doc["shm_runs"]
    assert len(runs) == SHM_RUNS and all(r["pagein_MBps"] > 0 and r["pageout_MBps"] > 0 for r in runs)
    assert doc["pagein_shm_MBps"] == max(r["pagein_MBps"] for r in runs)
    assert doc["pageout_shm_MBps"] == max(r["pageout_MBps"] for r in runs)
    from pefsim.ops.bench import CHANNEL_VARIANTS

    assert [row["variant"] for row in doc["channel_options"]] == [name for name, _ in CHANNEL_VARIANTS]
    assert all(row["pagein_MBps"] > 0 and row["pageout_MBps"] > 0 and row["hv_rss_bytes"] > 0
               for row in doc["channel_options"])


def test_bench_sizes_array(bench):
    _, doc, _ = bench
    from pefsim.ops.bench import SHM_RUNS

    rows = doc["sizes"]
    assert [row["guest_bytes"] for row in rows] == [1 * MiB, 2 * MiB]
    assert all(SIZE_KEYS <= set(row) for row in rows)
    small, same = rows
    # one call a page at the smallest size only, at that very size
    assert UNARY_KEYS <= set(small) and not UNARY_KEYS & set(same)
    assert small["unary_bytes"] == 1 * MiB and small["pagein_unary_MBps"] > 0 and small["pageout_unary_MBps"] > 0
    assert set(small["abort_latency_s"]) == {"stream", "shm", "unary"}
    assert set(same["abort_latency_s"]) == {"stream", "shm"}
    for row in rows:
        assert all(row[k] > 0 for k in ("pagein_stream_MBps", "pageout_stream_MBps", "pagein_shm_MBps",
                                         "pageout_shm_MBps", "hv_rss_bytes", "uv_rss_bytes"))
        assert set(row["abort_s_per_GiB"]) == {"stream", "shm"}
        for path, per_gib in row["abort_s_per_GiB"].items():
            assert per_gib == pytest.approx(row["abort_latency_s"][path] * (1 << 30) / row["guest_bytes"], rel=1e-3)
        assert row["rss_bound_bytes"] == row["guest_bytes"] + 64 * MiB
        assert len(row["shm_runs"]) == SHM_RUNS
        assert row["pagein_shm_MBps"] == max(r["pagein_MBps"] for r in row["shm_runs"])
    # the size equal to --guest-mib is the run already made for it, not a second one
    assert [same[k] for k in ("pagein_stream_MBps", "pagein_shm_MBps", "pageout_shm_MBps")] == \
        [doc[k] for k in ("pagein_stream_MBps", "pagein_shm_MBps", "pageout_shm_MBps")]
    names = [t["target"] for t in doc["targets"]]
    assert [n for n in names if " at 1 MiB" in n or " at 2 MiB" in n] == [
        "HV RSS <= guest + 64 MiB at 1 MiB", "UV RSS <= pool + 64 MiB at 1 MiB",
        "HV RSS <= guest + 64 MiB at 2 MiB", "UV RSS <= pool + 64 MiB at 2 MiB"]
    assert not any("per GiB" in n for n in names)  # 1 GiB was not measured


def test_bench_scaling_array(bench):
    _, doc, _ = bench
    rows = doc["scaling"]
    assert [row["guests"] for row in rows] == [1, 2]
    assert all(set(row) == SCALING_KEYS for row in rows)
    assert all(row["guest_bytes"] == 1 * MiB and row["abort_MBps"] > 0 and 0 < row["abort_p50_s"] <= row["abort_p99_s"]
               for row in rows)


def test_targets_for_sizes_and_guest_counts():
    """The --sizes and --scaling targets, on a made-up result: present when what they compare was
    measured, with the ratios they are held to."""
    from pefsim.ops.bench import GiB, targets

    def size(n_bytes: int, abort_s: float, rss_over: int) -> dict:
        per_gib = abort_s * GiB / n_bytes
        return {"guest_bytes": n_bytes, "abort_s_per_GiB": {"stream": per_gib, "shm": per_gib / 10},
                "hv_rss_bytes": n_bytes + rss_over, "uv_rss_bytes": n_bytes + 32 * MiB,
                "rss_bound_bytes": n_bytes + 64 * MiB}

    result = {"guest_bytes": GiB, "memcpy_MBps": 10000, "tcp_MBps": 1000, "pagein_stream_MBps": 500,
              "pageout_stream_MBps": 500, "pagein_shm_MBps": 6000, "pageout_shm_MBps": 6000, "pagein_unary_MBps": 20,
              "abort_latency_s": {"stream": 2.0, "shm": 0.2}, "hv_rss_bytes": GiB, "uv_rss_bytes": GiB,
              "sizes": [size(GiB, 1.0, 10 * MiB), size(8 * GiB, 9.0, 80 * MiB)],
              "scaling": [{"guests": n, "abort_MBps": mbps}
                          for n, mbps in ((1, 1000), (4, 1500), (16, 900), (64, 700))]}
    got = {name: (round(value, 3), bound, op, ok) for name, value, bound, op, ok in targets(result)}
    assert got["abort per GiB at 8192 MiB <= 1.2 x 1 GiB's (stream)"] == (1.125, 1.2, "<=", True)
    assert got["abort per GiB at 8192 MiB <= 1.2 x 1 GiB's (shm)"] == (1.125, 1.2, "<=", True)
    assert got["HV RSS <= guest + 64 MiB at 8192 MiB"][3] is False and got["HV RSS <= guest + 64 MiB at 1024 MiB"][3]
    assert got["UV RSS <= pool + 64 MiB at 8192 MiB"][3]
    assert got["16 guests aborting at once >= 0.8 x one guest"] == (0.9, 0.8, ">=", True)
    assert got["64 guests aborting at once >= 0.8 x one guest"] == (0.7, 0.8, ">=", False)
    assert not any("bare gRPC" in name for name in got)  # a result saved before that reference
    result["grpc_MBps"] = 600
    got = {name: (round(value, 3), bound, op, ok) for name, value, bound, op, ok in targets(result)}
    assert got["stream page-in and page-out >= 0.7 x bare gRPC stream"] == (0.833, 0.7, ">=", True)
    result["sizes"] = [size(256 * MiB, 0.3, 0), size(GiB, 1.0, 0)]  # the largest is 1 GiB: nothing to compare
    result["scaling"] = result["scaling"][1:]  # no single guest: no count target
    names = [name for name, *_ in targets(result)]
    assert not any("per GiB" in n or "guests aborting" in n for n in names)


def check_plots(directory, expected=PLOTS) -> None:
    assert {p.name for p in directory.iterdir()} == expected
    for path in directory.iterdir():
        data = path.read_bytes()
        assert data, path
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        else:
            assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg", path


def test_bench_plots(bench):
    out, _, plots = bench
    check_plots(plots)
    assert all(f"wrote {plots / name}" in out.stderr for name in PLOTS)


def test_bench_replots_a_saved_result(bench, tmp_path):
    _, doc, _ = bench
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(doc))
    again = pefsim("bench", "--plot", str(tmp_path / "again"), "--from", str(saved), timeout=120)
    assert again.returncode == 0, again.stderr
    check_plots(tmp_path / "again")
    assert set(again.stdout.split()) == {str(tmp_path / "again" / name) for name in PLOTS}
    # a result without --sizes or --scaling: its one size, and no guest-count plot
    plain = {k: v for k, v in doc.items() if k not in ("sizes", "scaling")}
    saved.write_text(json.dumps(plain))
    again = pefsim("bench", "--plot", str(tmp_path / "plain"), "--from", str(saved), timeout=120)
    assert again.returncode == 0, again.stderr
    check_plots(tmp_path / "plain", PLOTS - {"scaling.svg", "scaling.png"})


def test_bench_plot_usage_errors(tmp_path):
    """--from without --plot is a usage error (2); --plot without matplotlib is one line and 3,
    before anything is measured."""
    out = pefsim("bench", "--from", str(tmp_path / "x.json"), timeout=60)
    assert out.returncode == 2 and "--plot" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    blocked = ("import sys; sys.modules['matplotlib'] = None; from pefsim.ops.cli import main; "
               f"sys.exit(main(['bench', '--plot', {str(tmp_path / 'p')!r}, '--guest-mib', '1']))")
    out = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "matplotlib" in out.stderr and "pefsim[plots]" in out.stderr
    assert not (tmp_path / "p").exists()


def test_bench_data_dir(bench, tmp_path):
    """The result names the file system the guest RAM files were on (the temp directory's by
    default); a --data-dir that is not a writable directory is one line and exit 3, before
    anything is measured."""
    import tempfile

    from pefsim.ops.bench import file_system

    _, doc, _ = bench
    assert doc["data_fs"] == file_system(Path(tempfile.gettempdir())) != "unknown"
    assert file_system(Path("/dev/shm")) == "tmpfs" and file_system(Path("/proc/self")) == "proc"
    for bad in (tmp_path / "missing", tmp_path / "file"):
        if bad.name == "file":
            bad.write_text("")
        out = pefsim("bench", "--data-dir", str(bad), "--guest-mib", "1", timeout=60)
        assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1 and "--data-dir" in out.stderr


def test_services_never_import_matplotlib():
    code = ("import sys, services.ultravisor.server, services.hypervisor.server, services.guest.server, "
            "pefsim.ops.cli, pefsim.ops.bench; sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_grpc_option_overrides():
    """$PEFSIM_GRPC_OPTIONS adds or replaces channel arguments; anything else is refused clearly."""
    from pefsim.rpc import with_overrides

    base = [("grpc.a", 1), ("grpc.b", 2)]
    assert with_overrides(base, "") == base
    assert with_overrides(base, '{"grpc.b": 3, "grpc.c": "x"}') == [("grpc.a", 1), ("grpc.b", 3), ("grpc.c", "x")]
    for bad in ("{not json", "[1, 2]", '{"grpc.a": 1.5}', '{"grpc.a": true}'):
        with pytest.raises(ValueError, match="PEFSIM_GRPC_OPTIONS"):
            with_overrides(base, bad)


def test_a_peers_own_channel_options():
    """A peer's own options replace the shared ones of the same name, each name once: the HV's
    channel to the UV probes for a wider receive window, every other channel keeps it fixed."""
    from pefsim.rpc import CLIENT_OPTIONS, WIDE_RECEIVE_OPTIONS, merged
    from services.hypervisor.adapters.grpc import GrpcUv

    hv_to_uv = merged(CLIENT_OPTIONS, GrpcUv("127.0.0.1:1", None, lambda boot_id: None).peer.options)
    names = [name for name, _ in hv_to_uv]
    assert len(names) == len(set(names)) and dict(hv_to_uv)["grpc.http2.bdp_probe"] == 1
    assert dict(CLIENT_OPTIONS)["grpc.http2.bdp_probe"] == 0 and set(WIDE_RECEIVE_OPTIONS) <= set(hv_to_uv)


def test_guest_keeps_no_copy_of_its_memory(tmp_path):
    """A guest process makes each request's pages as it sends them and verifies by making them
    again: its peak RSS stays far under its memory (it held all of it, ~270 MiB here, until the
    abort was over; an 8 GiB guest did not fit the machine)."""
    from pefsim.ops.bench import transfer

    size = 192 * MiB
    result = transfer(tmp_path, "shm", size)
    assert result["guest_rss"] < size // 2, result["guest_rss"] / MiB
