"""The timeline page as a person sees it: headless Chromium (Debian's `chromium`; .ci/run installs
it) opens the generated file, takes a screenshot (not blank, the HV's two incarnations visible),
and the DOM it built says the page logged no error, drew as many calls as the histories hold, and
put the fault window between the page-outs it interrupted. First, the same checks are shown to
catch a page whose script fails. Last, a real `pefsim chaos --timeline all` campaign (UV, HV and
guests as processes) leaves a timeline per run and an index that open the same way."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pefsim.ops.stack import ROOT
from pefsim.timeline import from_sim, from_stack, render_html
from pefsim.timeline.model import load, read_jsonl
from tests.unit.test_timeline import history_calls, sim_run

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                                          ".ci/run installs it)")
SIZE = (1400, 900)


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file URL; its console lines go to stderr (--enable-logging)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           f"--window-size={SIZE[0]},{SIZE[1]}", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def open_page(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """The DOM after the page's script ran, and every problem the page showed: a console line (the
    page logs nothing of its own: an uncaught error, a syntax error, a failed load), an error its
    script caught and wrote into #errors, or a script that never finished drawing."""
    done = chromium(page, tmp, "--dump-dom")
    dom = done.stdout
    problems = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    caught = re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S)
    if caught is None or caught.group(1).strip():
        problems.append(f"#errors: {caught.group(1).strip() if caught else 'missing'}")
    if 'data-ready="1"' not in dom:
        problems.append("the page's script did not finish (no data-ready)")
    return dom, problems


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """An 8-bit RGB(A) PNG's rows of pixels (zlib and the PNG filters; no imaging library)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def colours(path: Path) -> dict[tuple[int, int, int], int]:
    width, bpp, rows = png_pixels(path)
    out: dict[tuple[int, int, int], int] = {}
    for row in rows:
        for x in range(0, width * bpp, bpp):
            px = (row[x], row[x + 1], row[x + 2])
            out[px] = out.get(px, 0) + 1
    return out


def near(seen: dict, hex_colour: str, tol: int = 3) -> int:
    """How many pixels are of this colour (within ``tol`` per channel)."""
    want = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(n for px, n in seen.items() if all(abs(a - b) <= tol for a, b in zip(px, want)))


def rects(dom: str, cls: str) -> list[dict]:
    """The attributes of every <rect> of class ``cls`` (its first class) in the dumped DOM."""
    out = []
    for tag in re.findall(rf'<rect class="{cls}[ "][^>]*>', dom):
        out.append(dict(re.findall(r'([\w-]+)="([^"]*)"', tag)))
    return out


def test_the_checks_catch_a_page_whose_script_fails(tmp_path):
    """The same page with its script broken twice: a runtime error (the script's own handler writes
    it into #errors) and a syntax error (the script never runs: Chromium's console says so)."""
    page = render_html(from_sim(sim_run().record, sim_run().history, sim_run().violations))
    good = tmp_path / "good.html"
    good.write_text(page)
    assert open_page(good, tmp_path)[1] == []
    runtime = tmp_path / "runtime.html"
    runtime.write_text(page.replace("var D = JSON.parse(", "var D = undefinedThing + JSON.parse(", 1))
    dom, problems = open_page(runtime, tmp_path)
    assert any("undefinedThing" in p for p in problems) and 'data-errors="1"' in dom, problems
    syntax = tmp_path / "syntax.html"
    syntax.write_text(page.replace('"use strict";', '"use strict"; }}}', 1))
    _, problems = open_page(syntax, tmp_path)
    assert any("Uncaught SyntaxError" in p for p in problems), problems
    assert any("data-ready" in p for p in problems)


def check_kill_hv_page(dom: str, calls_in_histories: int) -> None:
    drawn = rects(dom, "call")
    assert len(drawn) == calls_in_histories, (len(drawn), calls_in_histories)
    assert f'data-calls-drawn="{calls_in_histories}"' in dom
    assert len({r["data-call-id"] for r in drawn}) == len(drawn)
    lanes = re.findall(r'<text class="lane-label"[^>]*>([^<]*)</text>', dom)
    assert {"HV (2 incarnations)", "UV"} <= set(lanes) and sum("victim" in lane for lane in lanes) == 1, lanes
    hv = sorted(r["data-inc"] for r in rects(dom, "segment") if r["data-lane"] == "hv")
    assert hv == ["1", "2"]
    (fault,) = rects(dom, "fault")
    start, end = float(fault["data-start"]), float(fault["data-end"])
    page_outs = [r for r in drawn if r["data-name"] == "UvPageOutStream"]
    before = [float(r["data-end"]) for r in page_outs if r["data-caller-inc"] == "1"]
    after = [float(r["data-start"]) for r in page_outs if r["data-caller-inc"] == "2"]
    assert before and after, page_outs
    assert max(before) <= start < end <= min(after)  # the HV died between the two page-outs
    made_by_new = [float(r["data-start"]) for r in drawn if r["data-caller"] == "hv" and r["data-caller-inc"] == "2"]
    assert made_by_new and min(made_by_new) >= end


def test_a_kill_hv_timeline_as_a_person_sees_it(tmp_path):
    out = sim_run()  # the exhaustive set's HV crash at the 8th page-out of the victim's abort
    page = tmp_path / "timeline.html"
    page.write_text(render_html(from_sim(out.record, out.history, out.violations)))
    dom, problems = open_page(page, tmp_path)
    assert problems == []
    check_kill_hv_page(dom, history_calls(out.history))
    shot = tmp_path / "shot.png"
    done = chromium(page, tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), done.stderr[-2000:]
    seen = colours(shot)
    assert len(seen) >= 64, f"{len(seen)} colours: a blank page?"
    # the HV's two incarnations' strips, and calls drawn in the success colour, are on the screen
    # (the second incarnation's strip is short: it runs from the heal to the run's end, ~180 pixels)
    for colour in ("#8fb3e0", "#7cc7b2", "#3b9a5e"):
        assert near(seen, colour) >= 100, colour


def test_a_chaos_campaign_with_timeline_all_draws_every_run(tmp_path):
    """`pefsim chaos --fault kill-hv --during abort --timeline all` through real processes: a
    timeline per run, an index linking it, both open in Chromium with no error."""
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "pefsim", "chaos", "--fault", "kill-hv", "--during", "abort",
                           "--runs", "1", "--seed", "1", "--mem-mib", "4", "--timeline", "all",
                           "--results", str(results), "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    campaign = Path(json.loads(done.stdout)["results"])
    run_dir = campaign / "run-0001"
    assert (run_dir / "timeline.html").is_file() and "timeline" in done.stderr
    history = {p.name.removesuffix(".history.jsonl"): read_jsonl(p) for p in run_dir.glob("*.history.jsonl")}
    dom, problems = open_page(run_dir / "timeline.html", tmp_path)
    assert problems == []
    check_kill_hv_page(dom, history_calls(history))
    calls = load(run_dir).calls  # causal arrows from the trace context (pefsim/tracing.py)
    caused = [(calls[c.cause].name, c.name) for c in calls if c.cause is not None]
    assert ("UV_ESM", "H_SVM_INIT_START") in caused, caused[:20]  # the UV's hcall, made for the guest's `sc 2`
    assert all(calls[c.cause].args["trace"] == c.args["trace"] for c in calls if c.cause is not None)
    index = chromium(campaign / "index.html", tmp_path, "--dump-dom")
    assert [line for line in index.stderr.splitlines() if ":CONSOLE" in line] == []
    assert 'href="run-0001/timeline.html"' in index.stdout and "all 8 held" in index.stdout


PROBE = """<script>
(function () {
  var out = {}, svg = document.getElementById("svg"), view = document.getElementById("view");
  function span() { var m = /view (-?[\\d.]+) s – (-?[\\d.]+) s/.exec(view.textContent); return [+m[1], +m[2]]; }
  var r = svg.getBoundingClientRect(), y = r.top + 100;
  out.fit = span();
  svg.dispatchEvent(new WheelEvent("wheel", {deltaY: -600, clientX: r.left + 270 + 400, clientY: y, bubbles: true, cancelable: true}));
  out.wheel = span();
  svg.dispatchEvent(new MouseEvent("mousedown", {button: 0, clientX: r.left + 700, clientY: y, bubbles: true}));
  window.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + 500, clientY: y, bubbles: true}));
  window.dispatchEvent(new MouseEvent("mouseup", {clientX: r.left + 500, clientY: y, bubbles: true}));
  out.drag = span();
  document.getElementById("fit").click(); out.refit = span();
  document.getElementById("zin").click(); out.zin = span();
  document.getElementById("tofault").click(); out.tofault = span();
  document.getElementById("fit").click();
  var call = document.querySelector('rect.call[data-name="UV_ESM"]');
  call.dispatchEvent(new MouseEvent("mousedown", {button: 0, clientX: 10, clientY: 10, bubbles: true}));
  call.dispatchEvent(new MouseEvent("mouseup", {button: 0, clientX: 10, clientY: 10, bubbles: true}));
  out.details = document.getElementById("details").textContent;
  out.selected = document.querySelectorAll("rect.call.sel").length;
  var chip = document.querySelector(".verdict.failed");
  chip.click();
  out.verdict = {hlmode: svg.classList.contains("hlmode"), linked: chip.getAttribute("data-calls").split(" ").length,
                 highlighted: document.querySelectorAll("rect.call.hl").length, view: span()};
  document.getElementById("probe").textContent = JSON.stringify(out);
})();
</script>"""


def test_zoom_pan_details_and_a_failing_verdict_work_in_the_browser(tmp_path):
    """The page's controls driven by a script added to it (wheel, drag, the buttons, a click on a
    call, a click on the violated invariant), read back through the DOM."""
    out = sim_run(mutant="uv-frees-at-abort")  # the HV crash mid-abort, and the UV giving the pages up early
    page = render_html(from_sim(out.record, out.history, out.violations))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", '<pre id="probe"></pre>' + PROBE + "</body>"))
    dom, problems = open_page(probe, tmp_path)
    assert problems == []
    got = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&amp;", "&"))
    width = lambda v: v[1] - v[0]  # noqa: E731
    assert width(got["wheel"]) < width(got["fit"]) / 2  # the wheel zoomed in about the pointer
    assert got["drag"][0] > got["wheel"][0] and abs(width(got["drag"]) - width(got["wheel"])) < 1e-3  # panned
    assert got["refit"] == got["fit"] and abs(width(got["zin"]) - width(got["fit"]) / 2) < 1e-3
    (fault,) = rects(dom, "fault")
    assert got["tofault"][0] <= float(fault["data-start"]) < float(fault["data-end"]) <= got["tofault"][1]
    assert width(got["tofault"]) <= width(got["fit"]) and got["tofault"] != got["zin"]
    assert got["selected"] == 1 and got["details"].startswith("×UV_ESM") and "lpid" in got["details"]
    verdict = got["verdict"]
    assert verdict["hlmode"] and verdict["linked"] == verdict["highlighted"] > 0
    assert width(verdict["view"]) <= width(got["fit"])  # zoomed to the calls the violation names
    named = [r for r in rects(dom, "call") if "hl" in r["class"].split()]
    assert len(named) == verdict["linked"]
    assert verdict["view"][0] <= min(float(r["data-start"]) for r in named)
    assert max(float(r["data-end"]) for r in named) <= verdict["view"][1]


def test_the_demo_draws_its_four_guests(tmp_path):
    """`pefsim demo --timeline FILE`: the four guests' calls across the UV, the HV and the guests,
    from their histories, open in Chromium with no error; the aborted guest's H_SVM_INIT_ABORT
    causes its UV_SVM_TERMINATE (trace context)."""
    page, run_dir = tmp_path / "demo.html", tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "pefsim", "demo", "--mem-mib", "1", "--run-dir", str(run_dir),
                           "--timeline", str(page)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"timeline: {page}" in done.stderr
    dom, problems = open_page(page, tmp_path)
    assert problems == []
    model = from_stack([run_dir])
    assert int(re.search(r'data-calls-drawn="(\d+)"', dom).group(1)) == len(model.calls) > 0
    for name in ("g-secure", "g-aborted", "g-terminated", "g-reset"):
        assert f"guest:{name}" in {lane.id for lane in model.lanes}, name
    causes = {(model.calls[c.cause].name, c.name) for c in model.calls if c.cause is not None}
    assert ("H_SVM_INIT_ABORT", "UV_SVM_TERMINATE") in causes, sorted(causes)
