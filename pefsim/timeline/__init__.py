"""Timelines of pefsim's runs (issue 18): what a chaos run or a simulated seed recorded, drawn.

  model.py   the model: lanes per process incarnation, calls, state bands, fault windows, verdicts
  html.py    render_html(model): one self-contained page (page.py: its style and script)
  trace.py   render_trace(model): Chrome trace-event JSON (Perfetto, chrome://tracing)
  index.py   a campaign's index page
  files.py   where they are written; auto.py: written after failing runs; cli.py: `pefsim timeline`
"""
from pefsim.timeline.cli import register
from pefsim.timeline.html import render_html
from pefsim.timeline.index import render_index
from pefsim.timeline.model import Model, build, from_sim, from_stack, load
from pefsim.timeline.trace import render_trace

__all__ = ["Model", "build", "from_sim", "from_stack", "load", "register", "render_html", "render_index", "render_trace"]
