"""`pefsim bench` runs and prints the documented JSON (speeds are measured, not tested)."""
from __future__ import annotations

import json
import subprocess
import sys

from pefsim.stack import ROOT

KEYS = {"guest_bytes", "memcpy_MBps", "tcp_MBps", "pagein_stream_MBps", "pageout_stream_MBps",
        "pagein_shm_MBps", "pageout_shm_MBps", "pagein_unary_MBps", "abort_latency_s", "hcall_p50_us",
        "hcall_p99_us", "hv_rss_bytes", "uv_rss_bytes"}


def test_bench_json_is_well_formed():
    out = subprocess.run([sys.executable, "-m", "pefsim", "bench", "--guest-mib", "4", "--unary-mib", "1",
                          "--hcalls", "50", "--scaling", "1,2", "--scale-guest-mib", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert KEYS <= set(doc)
    assert doc["guest_bytes"] == 4 << 20
    assert set(doc["abort_latency_s"]) == {"stream", "shm"}
    assert all(doc[k] > 0 for k in KEYS - {"abort_latency_s"})
    assert all(v > 0 for v in doc["abort_latency_s"].values())
    assert [row["guests"] for row in doc["scaling"]] == [1, 2]
