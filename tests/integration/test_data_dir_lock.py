"""Two HVs on one data directory would each rebuild, journal and scrub the same VMs' files under
the other (issue 17: "a second HV on the same data must refuse to start"). The second one exits at
once with one line naming the holder; the first one serves on."""
from __future__ import annotations

import subprocess
import sys

from pefsim.v1 import hypervisor_pb2 as hpb
from pefsim.ops.stack import ROOT
from tests.helpers import operating


def test_a_second_hv_on_the_same_data_dir_refuses_to_start(stack, run):
    data_dir = stack.run_dir / "hv-data"
    holder = stack.procs["hv"].popen.pid
    second = subprocess.run([sys.executable, "-m", "services.hypervisor", "--uv", stack.uv_addr, "--insecure",
                             "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if "in use by an HV" in line]
    assert lines and f"pid {holder}" in lines[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr

    async def still_serving():
        async with operating(stack) as op:
            await op.hv.stub.HvStatus(hpb.HvStatusRequest(), timeout=10)
    run(still_serving())
