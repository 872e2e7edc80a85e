"""Prometheus for the local stack: a config whose targets follow the stack (file_sd, rewritten by
the stack as services start), the project's rules, and a Prometheus process to run it.

Jobs are named after the services: ``uv``, ``hv``, ``guest`` and ``chaos`` (the chaos harness),
as in the compose stack's deploy/prometheus/prometheus.yml, so the same rules and dashboards work
on both.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (pefsim/ops/ is two levels down)
# the package's copy: in a checkout a symlink to deploy/prometheus/rules, in a wheel the files themselves
# (a pip-installed `pefsim up --prometheus` loads the same rules)
RULES = Path(__file__).resolve().parents[1] / "data" / "prometheus-rules"
JOBS = ("uv", "hv", "guest", "chaos")
INSTALL_HINT = ("Prometheus is not installed. On Debian or Ubuntu: `apt-get install prometheus` "
                "(2.42 works); elsewhere: https://prometheus.io/download/ (put `prometheus` on PATH).")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def write_targets(target_dir: Path, targets: dict[str, list[str]], prefix: str = "") -> None:
    """file_sd files, one per job, named ``[PREFIX.]JOB.json`` so several writers (a stack, the
    demo attached to it, the chaos harness) can share a directory. Atomic: Prometheus may read
    them at any time."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for job in JOBS:
        doc = [{"targets": sorted(targets.get(job, [])), "labels": {}}] if targets.get(job) else []
        name = f"{prefix}.{job}.json" if prefix else f"{job}.json"
        tmp = target_dir / f"{name}.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(target_dir / name)


def write_config(path: Path, target_dirs: list[Path], interval: str = "5s") -> Path:
    """A Prometheus config scraping every job's targets from ``target_dirs``, with the rules."""
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}",
             "rule_files:", f"  - {RULES}/*.yml", "scrape_configs:"]
    for job in JOBS:
        lines += [f"  - job_name: {job}", "    file_sd_configs:", "      - refresh_interval: 1s",
                  "        files:"] + [f"          - {d}/*{job}.json" for d in target_dirs]
    path.write_text("\n".join(lines) + "\n")
    return path


class Prometheus:
    """A Prometheus process on 127.0.0.1 with its own storage."""

    def __init__(self, config: Path, storage: Path, port: int, log: Path):
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as fh:
            self.popen = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
                 f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
                 "--storage.tsdb.retention.time=1d"], stdout=fh, stderr=subprocess.STDOUT)
        self.log = log

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("prometheus not ready")

    def query(self, expr: str) -> list[dict]:
        from urllib.parse import urlencode

        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urlencode({'query': expr})}", timeout=10) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"{expr}: {doc}")
        return doc["data"]["result"]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
