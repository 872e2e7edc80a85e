"""``pefsim timeline``: draw a chaos run, a failing simulator seed or a whole campaign."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pefsim.timeline.auto import FORMATS, MODES  # noqa: F401 - MODES for pefsim/ops/cli.py's chaos parser

EXIT_ENVIRONMENT = 3

DESCRIPTION = """Draw a run as one self-contained HTML page (lanes per process incarnation, every
call a bar, state bands, fault windows, verdicts; zoom with the wheel, pan by dragging), or as a
Chrome trace-event JSON for Perfetto / chrome://tracing (--format trace).

  RUN_DIR            a chaos run (record.json, verdicts.json, *.history.jsonl): RUN_DIR/timeline.html
  STACK_RUN_DIR      a `pefsim up` stack's run directory (stack.json): every call so far
  SIM_FAILURE.json   a failing simulated seed (pefsim sim --results): seed-N.timeline.html beside it
  CAMPAIGN_DIR       a chaos campaign (run-NNNN/), its results directory (latest), or a directory of
                     simulator failures: every run's timeline and an index.html"""


def register(sub) -> None:
    """Add ``pefsim timeline`` to the CLI's subcommands."""
    p = sub.add_parser("timeline", help="draw a chaos run, a failing simulator seed or a campaign (HTML, trace JSON)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR|SIM_FAILURE.json|CAMPAIGN_DIR")
    p.add_argument("-o", "--output", type=Path, help="the file to write (a campaign: its index page)")
    p.add_argument("--format", choices=FORMATS, default="html",
                   help="html (default): the page; trace: Chrome trace-event JSON (Perfetto, chrome://tracing)")
    p.set_defaults(func=cmd_timeline)


def cmd_timeline(a) -> int:
    from pefsim.timeline.files import resolve, write_campaign, write_timeline
    from pefsim.timeline.model import NotARun

    try:
        kind, path = resolve(Path(a.path))
    except FileNotFoundError:
        print(f"pefsim timeline: {a.path}: no such file or directory", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except NotARun as exc:
        print(f"pefsim timeline: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    try:
        if kind == "campaign":
            if a.output is not None and a.format != "html":
                print("pefsim timeline: -o names a campaign's index page (--format html); trace files go in "
                      "each run's directory", file=sys.stderr)
                return 2
            written, index = write_campaign(path, a.format, a.output)
            print(f"{len(written)} {'timelines' if a.format == 'html' else 'traces'} written"
                  + (f"; index: {index}" if index else f" ({path})"))
            return 0
        out, model = write_timeline(path, a.output, a.format)
    except NotARun as exc:
        print(f"pefsim timeline: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    failed = [v.name for v in model.verdicts if not v.held]
    print(f"{out} ({len(model.calls)} calls, {len(model.faults)} fault windows, "
          f"{out.stat().st_size // 1024} KiB){'; violated: ' + ', '.join(failed) if failed else ''}")
    return 0

