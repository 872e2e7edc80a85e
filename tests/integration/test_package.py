"""The wheel a user pip-installs carries what the package reads at run time outside its modules:
the Prometheus rules (`pefsim up --prometheus` loads them) and the protos the services speak."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from pefsim.ops import observability
from pefsim.ops.stack import ROOT


def test_the_rules_the_package_loads_are_the_deployed_ones():
    names = sorted(p.name for p in observability.RULES.glob("*.yml"))
    assert names and names == sorted(p.name for p in (ROOT / "deploy/prometheus/rules").glob("*.yml"))


def test_the_wheel_ships_the_rules_and_the_protos(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "node_modules", "tests", "build", "*.egg-info", "__pycache__", "wheelhouse"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("pefsim-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    rules = {f"pefsim/data/prometheus-rules/{p.name}" for p in (ROOT / "deploy/prometheus/rules").glob("*.yml")}
    protos = {f"pefsim/data/protos/pefsim/v1/{p.name}" for p in (ROOT / "protos/pefsim/v1").glob("*.proto")}
    assert rules and protos and rules | protos <= names, sorted((rules | protos) - names)
