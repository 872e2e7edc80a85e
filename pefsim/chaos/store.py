"""The chaos store: where each run's record, verdicts and history slices are kept (Jepsen's
store): ``<results>/<stamp>-<fault>-<during>-seed<seed>/run-NNNN/``, ``latest`` pointing at the
newest campaign, ``summary.json`` at its end."""
from __future__ import annotations

import json
import time
from pathlib import Path


class Store:
    """One campaign's directory under the results directory."""

    def __init__(self, results: Path, fault: str, during: str, seed: int):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.root = Path(results) / f"{stamp}-{fault}-{during}-seed{seed}"
        self.root.mkdir(parents=True, exist_ok=True)
        latest = Path(results) / "latest"
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(self.root.name)

    def write_run(self, run: int, record: dict, verdicts: list, history: dict[str, list[dict]]) -> Path:
        run_dir = self.root / f"run-{run:04d}"
        run_dir.mkdir()
        (run_dir / "record.json").write_text(json.dumps(record, indent=1, default=str))
        (run_dir / "verdicts.json").write_text(json.dumps(every_verdict(verdicts), indent=1))
        for svc, events in history.items():
            (run_dir / f"{svc}.history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return run_dir

    def write_summary(self, summary: dict) -> None:
        (self.root / "summary.json").write_text(json.dumps(summary, indent=1))


def read_history(path: Path, window: list[float]) -> list[dict]:
    """The history lines of one window (a line cut short by a kill -9 is skipped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if window[0] <= event.get("t", 0) <= window[1]:
            out.append(event)
    return out


def every_verdict(violations: list) -> dict:
    """Every invariant checked, held or not: {invariant: {"held": bool, "what": its statement,
    "violations": [detail, ...]}} (an invariant that held is a verdict too, not a silence)."""
    from pefsim.chaos.checker import INVARIANTS

    found: dict[str, list[str]] = {name: [] for name in INVARIANTS}
    for v in violations:
        found[v.invariant].append(v.detail)
    return {name: {"held": not found[name], "what": what, "violations": found[name]}
            for name, what in INVARIANTS.items()}
