"""Timelines of pefsim's runs (issue 18): what a chaos run or a simulated seed recorded, drawn.

  model.py   the model: lanes per process incarnation, calls, state bands, fault windows, verdicts
  html.py    render_html(model): one self-contained page (page.py: its style and script)
  trace.py   render_trace(model): Chrome trace-event JSON (Perfetto, chrome://tracing)
  index.py   a campaign's index page
  files.py   where they are written; auto.py: written after failing runs; cli.py: `pefsim timeline`
"""
from __future__ import annotations

import importlib

# what each name comes from: imported on first use, so the CLI (which registers `pefsim timeline`
# for every command it runs) and the chaos runner pay for the drawing code only when they draw
_FROM = {"register": "cli", "render_html": "html", "render_index": "index", "render_trace": "trace",
         "Model": "model", "build": "model", "from_sim": "model", "from_stack": "model", "load": "model"}

__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
