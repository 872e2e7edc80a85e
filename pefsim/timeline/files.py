"""Where timelines go: a chaos run's ``timeline.html`` (``trace.json``) in its run directory, a
simulator failure's ``seed-N….timeline.html`` (``.trace.json``) beside its JSON file, a campaign's
``index.html`` in the campaign directory."""
from __future__ import annotations

import json
from pathlib import Path

from pefsim.timeline.html import render_html
from pefsim.timeline.index import SIM_TIMELINE_SUFFIX, is_campaign, is_sim_dir, render_index
from pefsim.timeline.model import Model, NotARun, load
from pefsim.timeline.trace import render_trace


def default_output(source: Path, fmt: str = "html") -> Path:
    source = Path(source)
    if source.is_dir():
        return source / ("timeline.html" if fmt == "html" else "trace.json")
    return source.with_name(source.stem + (SIM_TIMELINE_SUFFIX if fmt == "html" else ".trace.json"))


def render(model: Model, fmt: str = "html") -> str:
    if fmt == "trace":
        return json.dumps(render_trace(model), separators=(",", ":"), default=str)
    return render_html(model)


def write_timeline(source: Path, out: Path | None = None, fmt: str = "html") -> tuple[Path, Model]:
    """Draw one run (a chaos run directory or a simulator failure's JSON file) into ``out``."""
    model = load(source)
    out = Path(out) if out is not None else default_output(source, fmt)
    out.write_text(render(model, fmt))
    return out, model


def campaign_sources(directory: Path) -> list[Path]:
    """The runs of a chaos campaign directory, or the failing seeds of a simulator results directory."""
    directory = Path(directory)
    if is_campaign(directory):
        return sorted(p.parent for p in directory.glob("run-[0-9]*/record.json"))
    if is_sim_dir(directory):
        return sorted(p for p in directory.glob("seed-*.json") if not p.name.endswith(".trace.json"))
    raise NotARun(f"{directory}: not a chaos campaign or a directory of simulator failures")


def write_index(directory: Path, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else Path(directory) / "index.html"
    out.write_text(render_index(Path(directory)))
    return out


def write_campaign(directory: Path, fmt: str = "html", index_out: Path | None = None) -> tuple[list[Path], Path | None]:
    """Every run's timeline, and (HTML) the index linking them."""
    written = [write_timeline(src, fmt=fmt)[0] for src in campaign_sources(directory)]
    index = write_index(directory, index_out) if fmt == "html" else None
    return written, index


def resolve(path: Path) -> tuple[str, Path]:
    """What ``path`` is: ("run", dir) | ("sim", file) | ("campaign", dir); a results directory's
    ``latest`` campaign stands for it. FileNotFoundError, NotARun otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such file or directory", str(path))
    if path.is_file():
        return "sim", path
    if (path / "record.json").is_file() or (path / "stack.json").is_file():  # a chaos run, a local stack
        return "run", path
    if is_campaign(path) or is_sim_dir(path):
        return "campaign", path
    latest = path / "latest"
    if latest.is_dir() and is_campaign(latest):
        return "campaign", latest.resolve()
    raise NotARun(f"{path}: not a chaos run (record.json), a stack's run directory (stack.json), a campaign (run-NNNN/), a results directory "
                  f"(latest) or a directory of simulator failures (seed-*.json)")
