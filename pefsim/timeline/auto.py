"""Timelines written without being asked: every failing chaos run and every failing simulator
seed gets one next to its record; ``pefsim chaos --timeline all`` (ChaosConfig.timeline) draws
every run, and a chaos campaign gets its index page. A timeline that cannot be drawn costs
a log line, never the campaign."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("pefsim.timeline")

MODES = ("failed", "all", "none")  # which runs get a timeline.html
FORMATS = ("html", "trace")  # what `pefsim timeline` writes (files.render)


def mode(cfg=None) -> str:
    """A config's ``timeline`` (one of MODES) if it has one, else "failed"."""
    return getattr(cfg, "timeline", None) or "failed"


def chaos_run(cfg, run_dir: Path, failed: bool) -> Path | None:
    """After a chaos run is stored: its timeline.html when it failed (or the mode is "all")."""
    chosen = mode(cfg)
    if chosen == "none" or (chosen == "failed" and not failed):
        return None
    from pefsim.timeline.files import write_timeline

    try:
        return write_timeline(Path(run_dir))[0]
    except Exception as exc:  # noqa: BLE001 - a drawing bug must not cost the campaign its records
        log.error("timeline of %s not written: %r", run_dir, exc)
        return None


def chaos_campaign(cfg, root: Path) -> Path | None:
    """After a chaos campaign: its index.html (every run, its verdicts and recovery, linking the
    timelines written)."""
    if mode(cfg) == "none":
        return None
    from pefsim.timeline.files import write_index

    try:
        return write_index(Path(root))
    except Exception as exc:  # noqa: BLE001
        log.error("index of %s not written: %r", root, exc)
        return None


def sim_failure(path: Path) -> Path | None:
    """After a failing simulated run's JSON is written: its timeline beside it."""
    if mode() == "none":
        return None
    from pefsim.timeline.files import write_timeline

    try:
        return write_timeline(Path(path))[0]
    except Exception as exc:  # noqa: BLE001
        log.error("timeline of %s not written: %r", path, exc)
        return None
