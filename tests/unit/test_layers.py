"""The architecture, held by a test: the protocol cores (services/<svc>/core/), their ports, the
call tables and the in-process adapter import nothing of grpc, so the whole stack can run in one
process (services/local.py) and a core cannot reach a peer but through its ports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("hypervisor", "ultravisor", "guest")
CORE = sorted(
    [f"services.{svc}.core.{p.stem}" for svc in SERVICES
     for p in (ROOT / "services" / svc / "core").glob("*.py") if p.stem != "__init__"]
    + [f"services.{svc}.{m}" for svc in SERVICES for m in ("ports", "calltable")]
    + ["pefsim.calltable", "pefsim.history", "services.local"])


def test_the_cores_import_no_grpc():
    """Each module imported in a fresh interpreter where importing grpc fails."""
    probe = ("import sys; sys.modules['grpc'] = None\n"
             "import importlib\n"
             f"for name in {CORE!r}:\n"
             "    importlib.import_module(name)\n"
             "assert 'grpc' not in [m for m in sys.modules if sys.modules[m] is not None], 'grpc imported'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_probe_can_fail():
    """The same probe on a module that does import grpc (the gRPC adapter) fails: the test above
    would catch a core that did."""
    probe = "import sys; sys.modules['grpc'] = None\nimport services.hypervisor.adapters.grpc\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "grpc" in done.stderr


def test_every_core_module_is_listed():
    assert len([m for m in CORE if ".core." in m]) >= 22


def test_the_cores_read_time_and_entropy_only_through_their_ports():
    """No core module reads the time, sleeps or draws random bytes but through pefsim.clock and
    pefsim.entropy (a simulator swaps both, so a seed replays)."""
    import re

    offenders = []
    for svc in SERVICES:
        for path in sorted((ROOT / "services" / svc / "core").glob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\btime\.(time|monotonic|perf_counter|time_ns)\b|asyncio\.sleep\((?!0\))"
                             r"|os\.urandom|\bsecrets\.|generate_key", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
