"""The timeline page's style and script, inlined into every page (nothing is fetched: the file opens
offline). The script draws an SVG from the JSON the page embeds (``<script id="data">``).

What a test reads back (tests/integration/test_timeline_browser.py): every drawn call is a
``<rect class="call" data-call-id=... data-name data-start data-end data-lane data-inc data-caller
data-caller-inc>``, every fault window a ``<rect class="fault" data-start=... data-end=...>`` (seconds
from the page's time 0), each lane incarnation a ``<rect class="segment" data-lane data-inc>``,
``<body data-ready="1" data-calls-drawn=N>`` once drawn, and any script error lands in
``<pre id="errors">`` (and ``data-errors`` on the body)."""

CSS = r"""
:root { --ok: #3b9a5e; --error: #e0a019; --transport: #d23b35; --ink: #1d232b; --muted: #66707c; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f6f7f9; }
header { padding: 10px 16px 6px; background: #fff; border-bottom: 1px solid #dde1e6; }
h1 { font-size: 17px; margin: 0 0 4px; }
.meta { color: var(--muted); margin: 2px 0; }
.meta b { color: var(--ink); font-weight: 600; }
#verdicts { margin: 6px 0 2px; display: flex; flex-wrap: wrap; gap: 4px; }
.verdict { border-radius: 10px; padding: 1px 8px; font-size: 12px; border: 1px solid transparent; user-select: none; }
.verdict.held { background: #e5f3ea; color: #1f6a36; }
.verdict.failed { background: #fde6e5; color: #a1140f; border-color: #e9a29f; font-weight: 600; cursor: pointer; }
.verdict.failed.active { background: #a1140f; color: #fff; }
#toolbar { position: sticky; top: 0; z-index: 5; display: flex; align-items: center; gap: 6px; flex-wrap: wrap;
           padding: 6px 16px; background: #eef1f4; border-bottom: 1px solid #dde1e6; }
#toolbar button { font: inherit; padding: 2px 9px; border: 1px solid #b9c0c8; background: #fff; border-radius: 4px;
                  cursor: pointer; }
#toolbar button:hover { background: #f0f4ff; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; vertical-align: -1px; margin: 0 3px 0 8px; }
#view { color: var(--muted); margin-left: auto; font-variant-numeric: tabular-nums; }
#chart { padding: 0 0 12px; }
svg { display: block; user-select: none; cursor: grab; }
svg.dragging { cursor: grabbing; }
.lane-bg { fill: #fff; }
.lane-bg.odd { fill: #f9fafb; }
.lane-sep { stroke: #d5dae0; }
.lane-label { font-weight: 650; font-size: 13px; fill: var(--ink); }
.lane-note { font-size: 11px; fill: var(--muted); }
.row-label { font-size: 11px; fill: var(--muted); text-anchor: end; }
.grid { stroke: #e6e9ed; }
.tick { font-size: 11px; fill: var(--muted); text-anchor: middle; font-variant-numeric: tabular-nums; }
.segment { stroke: rgba(0,0,0,.25); stroke-width: .5; }
.segment.inc1 { fill: #8fb3e0; } .segment.inc2 { fill: #7cc7b2; } .segment.inc3 { fill: #c7a4e0; }
.segment.inc4 { fill: #e0c38f; }
.seg-label { font-size: 10.5px; fill: #10243d; pointer-events: none; }
.down { fill: url(#down); }
.lifecycle { font-size: 11px; font-weight: 650; pointer-events: none; }
.lifecycle.kill { fill: #b3120c; } .lifecycle.up { fill: #0b7a4b; }
.lifeline { stroke-width: 2; } .lifeline.kill { stroke: #b3120c; } .lifeline.up { stroke: #0b7a4b; }
.band { stroke: rgba(0,0,0,.15); stroke-width: .5; }
.band-label { font-size: 10px; fill: #2b333d; pointer-events: none; }
.mark { fill: #355c9a; stroke: #fff; stroke-width: .8; }
.mark:hover { fill: #000; }
.call { stroke: rgba(0,0,0,.35); stroke-width: .5; }
.call.c-ok { fill: var(--ok); } .call.c-error { fill: var(--error); } .call.c-transport { fill: var(--transport); }
.call.nostart { stroke-dasharray: 2 1; }
.call:hover { stroke: #000; stroke-width: 1.5; }
.call.sel { stroke: #000; stroke-width: 2.5; }
svg.hlmode .call:not(.hl):not(.sel) { opacity: .18; }
.call.hl { stroke: #8a0d08; stroke-width: 2; }
.clabel { font-size: 10px; fill: #fff; pointer-events: none; font-weight: 600; }
.clabel.out { fill: #1d232b; }
.mark-label { font-size: 10px; fill: #27466f; pointer-events: none; }
.arrows { stroke: #56606b; stroke-width: .8; fill: none; opacity: .55; pointer-events: none; }
.heads { fill: #56606b; opacity: .7; pointer-events: none; }
.selarrow { stroke: #000; stroke-width: 1.8; fill: none; pointer-events: none; }
.selhead { fill: #000; pointer-events: none; }
.fault { fill: url(#hatch); stroke: rgba(190,20,20,.55); stroke-width: 1; }
.fault-core { fill: rgba(210,40,40,.10); pointer-events: none; }
.fault-label { font-size: 11.5px; font-weight: 650; fill: #9d1510; }
.heal { stroke: #0b7a4b; stroke-width: 1.5; stroke-dasharray: 4 3; }
.heal-label { font-size: 11px; fill: #0b7a4b; font-weight: 600; }
#tip { position: fixed; z-index: 20; pointer-events: none; background: rgba(20,25,32,.94); color: #fff; padding: 6px 8px;
       border-radius: 4px; font-size: 12px; max-width: 520px; white-space: pre-wrap; display: none; }
#details { position: fixed; right: 12px; bottom: 12px; z-index: 10; width: 470px; max-height: 45vh; overflow: auto;
           background: #fff; border: 1px solid #c4cbd3; border-radius: 6px; box-shadow: 0 4px 18px rgba(0,0,0,.12);
           padding: 8px 10px; display: none; font-size: 12px; white-space: pre-wrap; }
#details .close { float: right; cursor: pointer; color: var(--muted); font-size: 15px; }
#details h3 { margin: 0 0 4px; font-size: 13px; }
#errors { color: #a1140f; background: #fff0f0; margin: 0; padding: 6px 16px; }
#errors:empty { display: none; }
"""

SCRIPT = r"""
(function () {
"use strict";
var errBox = document.getElementById("errors");
function report(msg) {
  errBox.textContent += msg + "\n";
  document.body.setAttribute("data-errors", "1");
}
window.addEventListener("error", function (e) { report("error: " + e.message + " (line " + e.lineno + ")"); });
window.addEventListener("unhandledrejection", function (e) { report("unhandled rejection: " + e.reason); });
try { main(); } catch (e) { report("error: " + (e && e.stack ? e.stack : e)); }

function main() {
  var D = JSON.parse(document.getElementById("data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var calls = D.calls.rows.map(function (r) {
    var o = {}; D.calls.cols.forEach(function (c, i) { o[c] = r[i]; }); return o;
  });
  var lanes = D.lanes, laneById = {};
  lanes.forEach(function (l) { laneById[l.id] = l; });
  var G = 270, ROW = 16, BAR = 11, BAND = 12, HDR = 20, MARKS = 16, PAD = 8, AXIS = 56, MINW = 1.5;
  var BULK = {}; D.bulk.forEach(function (n) { BULK[n] = true; });
  var full = [Math.min(0, D.duration * -0.01), D.duration * 1.01 || 1];
  var v0 = full[0], v1 = full[1];
  var svg = document.getElementById("svg");
  var showAll = false, selected = null, activeVerdict = null;

  function el(name, attrs, parent, text) {
    var e = document.createElementNS(SVGNS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmtT(t) { return (t >= 0 ? "+" : "") + t.toFixed(6) + " s"; }
  function fmtDur(s) {
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(3) + " ms";
    return s.toFixed(3) + " s";
  }
  function laneName(id, inc) {
    var l = laneById[id];
    if (!l) return id || "?";
    var base = l.kind === "guest" ? "guest " + id.split(":")[1] : (l.kind === "uv" || l.kind === "hv" ? l.kind.toUpperCase() : l.label);
    return l.segments.length > 1 && inc ? base + " #" + inc : base;
  }

  // -- layout (vertical) --
  var y = AXIS;
  lanes.forEach(function (l, i) {
    l.y0 = y; l.odd = i % 2; y += HDR + (l.note ? 13 : 0);
    l.bands.forEach(function (b) { b.y = y; y += BAND + 2; });
    if (l.marks.length) { l.marksY = y; y += MARKS; }
    l.rowY = l.rows.map(function () { var r = y; y += ROW; return r; });
    y += PAD; l.y1 = y;
  });
  var H = y + 6;
  var W = 100;
  function width() { return Math.max(300, (document.getElementById("chart").clientWidth || window.innerWidth) - 4); }
  svg.setAttribute("height", H);

  var defs = el("defs", {}, svg);
  var hatch = el("pattern", {id: "hatch", patternUnits: "userSpaceOnUse", width: 8, height: 8, patternTransform: "rotate(45)"}, defs);
  el("rect", {width: 8, height: 8, fill: "rgba(220,50,50,0.10)"}, hatch);
  el("line", {x1: 0, y1: 0, x2: 0, y2: 8, stroke: "rgba(200,30,30,0.35)", "stroke-width": 3}, hatch);
  var down = el("pattern", {id: "down", patternUnits: "userSpaceOnUse", width: 6, height: 6, patternTransform: "rotate(-45)"}, defs);
  el("rect", {width: 6, height: 6, fill: "rgba(60,60,60,0.10)"}, down);
  el("line", {x1: 0, y1: 0, x2: 0, y2: 6, stroke: "rgba(60,60,60,0.30)", "stroke-width": 2}, down);
  var clip = el("clipPath", {id: "clip"}, defs);
  var clipRect = el("rect", {x: G, y: 0, width: 100, height: H}, clip);

  var gBg = el("g", {}, svg);
  var gGrid = el("g", {"clip-path": "url(#clip)"}, svg);
  var gTime = el("g", {"clip-path": "url(#clip)"}, svg);
  var gBands = el("g", {}, gTime), gSeg = el("g", {}, gTime), gFault = el("g", {}, gTime);
  var arrows = el("path", {"class": "arrows", d: ""}, gTime), heads = el("path", {"class": "heads", d: ""}, gTime);
  var gCalls = el("g", {id: "calls"}, gTime), gLabels = el("g", {}, gTime), gMarks = el("g", {}, gTime);
  var selArrow = el("path", {"class": "selarrow", d: ""}, gTime), selHead = el("path", {"class": "selhead", d: ""}, gTime);
  var gLife = el("g", {}, gTime), gAxis = el("g", {}, svg);

  // lane backgrounds and gutter labels
  var bgRects = [];
  lanes.forEach(function (l) {
    bgRects.push(el("rect", {"class": "lane-bg" + (l.odd ? " odd" : ""), x: 0, y: l.y0, width: 100, height: l.y1 - l.y0}, gBg));
    el("line", {"class": "lane-sep", x1: 0, x2: 100000, y1: l.y1, y2: l.y1}, gBg);
    el("text", {"class": "lane-label", x: 10, y: l.y0 + 14}, gBg, l.label);
    if (l.note) el("text", {"class": "lane-note", x: 10, y: l.y0 + 30}, gBg, l.note);
    l.bands.forEach(function (b) { el("text", {"class": "row-label", x: G - 8, y: b.y + 10}, gBg, b.label); });
    if (l.marks.length) el("text", {"class": "row-label", x: G - 8, y: l.marksY + 11}, gBg, "events");
    l.rows.forEach(function (r, i) { if (r.label) el("text", {"class": "row-label", x: G - 8, y: l.rowY[i] + 12}, gBg, r.label); });
  });
  el("line", {"class": "lane-sep", x1: G - 0.5, x2: G - 0.5, y1: AXIS - 10, y2: H}, gBg);

  // incarnation segments, down gaps, kills and restarts
  var segEls = [], downEls = [], lifeEls = [];
  lanes.forEach(function (l) {
    l.segments.forEach(function (s, i) {
      var r = el("rect", {"class": "segment inc" + (((s.inc - 1) % 4) + 1), y: l.y0 + 4, height: 12,
                          "data-lane": l.id, "data-inc": s.inc}, gSeg);
      var t = el("text", {"class": "seg-label", y: l.y0 + 13.5}, gSeg,
                 laneName(l.id, l.segments.length > 1 ? s.inc : 0) + (s.start_why !== "run start" ? "  ▶ " + s.start_why : ""));
      r.setAttribute("data-tip", laneName(l.id, s.inc) + ": " + fmtT(s.start) + " (" + s.start_why + ") to " + fmtT(s.end) + " (" + s.end_why + ")");
      segEls.push({s: s, r: r, t: t});
      if (s.end_why !== "run end") {
        var line = el("line", {"class": "lifeline kill", y1: l.y0 + 1, y2: l.y1 - 1}, gLife);
        var txt = el("text", {"class": "lifecycle kill", y: l.y0 + 14}, gLife, "✕ " + s.end_why);
        var next = l.segments[i + 1];
        lifeEls.push({t: s.end, line: line, txt: txt, upto: next ? next.start : D.duration, seg: segEls[segEls.length - 1]});
        var gap = el("rect", {"class": "down", y: l.y0 + 1, height: l.y1 - l.y0 - 2,
                              "data-tip": laneName(l.id, s.inc) + " " + s.end_why + " at " + fmtT(s.end) + (next ? "; " + laneName(l.id, next.inc) + " from " + fmtT(next.start) : "; not restarted")}, gSeg);
        downEls.push({a: s.end, b: next ? next.start : D.duration, r: gap});
      }
      if (s.start_why !== "run start") {
        var line2 = el("line", {"class": "lifeline up", y1: l.y0 + 1, y2: l.y1 - 1}, gLife);
        lifeEls.push({t: s.start, line: line2, txt: null});
      }
    });
  });

  // state bands
  var STATE = {VM_NORMAL: "#cfe0f3", VM_TRANSIENT: "#f6e3a1", VM_SECURE: "#d5c4ef", destroyed: "#d9d9d9",
               SVM_ABSENT: "#e4e7eb", SVM_ACTIVE: "#f6e3a1", SVM_ABORT: "#f7c08f", SVM_SECURE: "#d5c4ef",
               terminated: "#d9d9d9"};
  var bandEls = [];
  lanes.forEach(function (l) {
    l.bands.forEach(function (b) {
      b.spans.forEach(function (sp) {
        var r = el("rect", {"class": "band", y: b.y, height: BAND, fill: STATE[sp.state] || "#e8e8e8",
                            "data-tip": b.label + ", lpid " + b.lpid + ": " + sp.state + " from " + fmtT(sp.start) + " to " + fmtT(sp.end)}, gBands);
        var t = el("text", {"class": "band-label", y: b.y + 9.5}, gBands, sp.state);
        bandEls.push({sp: sp, r: r, t: t});
      });
    });
  });

  // guest events
  var markEls = [];
  lanes.forEach(function (l) {
    l.marks.forEach(function (m) {
      var p = el("path", {"class": "mark", "data-tip": fmtT(m[0]) + "  " + m[1]}, gMarks);
      var t = el("text", {"class": "mark-label", y: l.marksY + 11.5}, gMarks);
      markEls.push({t: m[0], y: l.marksY + 8, p: p, label: t, text: m[1]});
    });
  });

  // fault windows
  var faultEls = [];
  D.faults.forEach(function (f, i) {
    var r = el("rect", {"class": "fault", y: AXIS - 14, height: H - AXIS + 14, "data-start": f.start, "data-end": f.end,
                        "data-kind": f.kind, "data-fault": i,
                        "data-tip": f.kind + ": " + f.label + "\n" + fmtT(f.start) + " to " + fmtT(f.end) + " (" + fmtDur(f.end - f.start) + ")" + (f.heal !== null ? "\nhealed (the harness's record) " + fmtT(f.heal) : "") + (f.note ? "\n" + f.note : "")}, gFault);
    var cores = f.lanes.map(function (id) { var l = laneById[id]; return el("rect", {"class": "fault-core", y: l.y0, height: l.y1 - l.y0}, gFault); });
    var lab = el("text", {"class": "fault-label", y: 13 + 13 * (i % 2)}, gFault, "⚡ " + f.kind + ": " + f.label);
    var heal = null, healLab = null;
    if (f.heal !== null && f.heal !== undefined && f.heal > f.start) {
      heal = el("line", {"class": "heal", y1: AXIS - 14, y2: H, "data-tip": "heal: " + fmtT(f.heal)}, gFault);
      healLab = el("text", {"class": "heal-label", y: AXIS - 3}, gFault, "heal");
    }
    faultEls.push({f: f, r: r, cores: cores, lab: lab, heal: heal, healLab: healLab});
  });

  // calls
  var callEls = new Array(calls.length), labels = [];
  calls.forEach(function (c, i) {
    var l = laneById[c.lane];
    var r = el("rect", {"class": "call c-" + c.cls + (c.start_known ? "" : " nostart"), y: l.rowY[c.row] + (ROW - BAR) / 2,
                        height: BAR, "data-call-id": c.id, "data-start": c.start, "data-end": c.end, "data-name": c.name,
                        "data-lane": c.lane, "data-inc": c.inc, "data-cls": c.cls, "data-caller": c.caller || "",
                        "data-caller-inc": c.caller_inc || ""}, gCalls);
    callEls[i] = r;
    var text = c.kind === "batch" && c.args.batches ? c.args.batches + " ×" + c.args.pages : c.name;
    if (!BULK[c.name]) labels.push({c: c, t: el("text", {"class": "clabel", y: l.rowY[c.row] + 11.5}, gLabels, text)});
  });
  // a label that does not fit in its bar goes after it, if the row is free up to the next call
  var byRow = {};
  calls.forEach(function (c) { (byRow[c.lane + "/" + c.row] = byRow[c.lane + "/" + c.row] || []).push(c); });
  Object.keys(byRow).forEach(function (k) {
    var list = byRow[k].slice().sort(function (a, b) { return a.start - b.start; });
    var reach = null;  // the latest end of the calls before (a label to the left needs the row free from it)
    list.forEach(function (c, i) {
      c.next = null; c.prev = reach;
      for (var j = i + 1; j < list.length; j++) if (list[j].start >= c.end) { c.next = list[j].start; break; }
      reach = reach === null ? c.end : Math.max(reach, c.end);
    });
  });
  function callerY(c) {
    var l = laneById[c.caller];
    if (!l) return null;
    for (var i = 0; i < l.rows.length; i++) if (l.rows[i].lpid === c.lpid && c.lpid !== null) return l.rowY[i] + ROW / 2;
    return l.marksY !== undefined ? l.marksY + 8 : l.y0 + HDR / 2;
  }
  calls.forEach(function (c) { c.by = laneById[c.lane].rowY[c.row] + ROW / 2; });
  // an arrow starts at the call that caused this one (its traceparent's span), else at the caller's lane
  calls.forEach(function (c) { c.cy = (c.cause !== null && c.cause !== undefined) ? calls[c.cause].by : callerY(c); });

  // -- horizontal: everything time-dependent --
  function X(t) { return G + (t - v0) / (v1 - v0) * W; }
  function C(x) { return Math.max(G - 20, Math.min(G + W + 20, x)); }
  function span(a, b, minw) {
    var xa = X(a), xb = X(b);
    if (xb < G - 5 || xa > G + W + 5) return null;
    xa = C(xa); xb = C(xb);
    return [xa, Math.max(minw, xb - xa)];
  }
  function shown(s) { return Math.min(s[0] + s[1], G + W) - Math.max(s[0], G); }  // the width on screen
  function put(e, s) {
    if (!s) { e.setAttribute("visibility", "hidden"); return; }
    e.removeAttribute("visibility"); e.setAttribute("x", s[0]); e.setAttribute("width", s[1]);
  }
  function arrowPath(c, x, parts, hparts) {
    if (c.cy === null) return;
    var yb = c.cy < c.by ? c.by - BAR / 2 : c.by + BAR / 2, dir = c.cy < c.by ? -1 : 1;
    parts.push("M" + x.toFixed(1) + "," + c.cy.toFixed(1) + "L" + x.toFixed(1) + "," + yb.toFixed(1));
    hparts.push("M" + x.toFixed(1) + "," + yb.toFixed(1) + "l-3," + (5 * dir) + "l6,0z");
  }
  function redraw() {
    W = width() - G - 12;
    svg.setAttribute("width", G + W + 12);
    clipRect.setAttribute("width", W + 2);
    bgRects.forEach(function (r) { r.setAttribute("width", G + W + 12); });
    // axis
    while (gAxis.firstChild) gAxis.removeChild(gAxis.firstChild);
    while (gGrid.firstChild) gGrid.removeChild(gGrid.firstChild);
    var spanS = v1 - v0, raw = spanS / Math.max(2, W / 110), p = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * p; }).filter(function (s) { return s >= raw; })[0];
    var dec = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    for (var t = Math.ceil(v0 / step) * step; t <= v1; t += step) {
      var x = X(t);
      el("line", {"class": "grid", x1: x, x2: x, y1: AXIS - 8, y2: H}, gGrid);
      el("text", {"class": "tick", x: x, y: AXIS - 17}, gAxis, t.toFixed(dec) + " s");
    }
    segEls.forEach(function (o) {
      var s = span(o.s.start, o.s.end, 1); put(o.r, s);
      if (s && shown(s) > o.t.textContent.length * 6.3 + 8) { o.t.removeAttribute("visibility"); o.t.setAttribute("x", Math.max(s[0], G) + 4); }
      else o.t.setAttribute("visibility", "hidden");
    });
    downEls.forEach(function (o) { put(o.r, span(o.a, o.b, 1)); });
    lifeEls.forEach(function (o) {
      var x = X(o.t);
      var vis = x >= G - 2 && x <= G + W + 2;
      [o.line, o.txt].forEach(function (e) { if (e) { if (vis) e.removeAttribute("visibility"); else e.setAttribute("visibility", "hidden"); } });
      o.line.setAttribute("x1", x); o.line.setAttribute("x2", x);
      if (o.txt) {  // in the gap after the death if it fits there, else before it (over its segment's label)
        var tw = o.txt.textContent.length * 6.6, inGap = X(o.upto) - x > tw + 8;
        o.txt.setAttribute("x", inGap ? x + 4 : x - 4); o.txt.setAttribute("text-anchor", inGap ? "start" : "end");
        if (!inGap) o.seg.t.setAttribute("visibility", "hidden");
      }
    });
    bandEls.forEach(function (o) {
      var s = span(o.sp.start, o.sp.end, 1); put(o.r, s);
      if (s && shown(s) > o.sp.state.length * 6.8 + 8) { o.t.removeAttribute("visibility"); o.t.setAttribute("x", Math.max(s[0], G) + 3); }
      else o.t.setAttribute("visibility", "hidden");
    });
    // events closer than a diamond's width share one label: the first one's text, "(+N)" the others
    markEls.forEach(function (o, i) {
      var x = X(o.t);
      o.label.setAttribute("visibility", "hidden");
      if (x < G - 5 || x > G + W + 5) { o.p.setAttribute("visibility", "hidden"); return; }
      o.p.removeAttribute("visibility");
      o.p.setAttribute("d", "M" + x + "," + (o.y - 6) + "l5,6l-5,6l-5,-6z");
      var prev = markEls[i - 1];
      if (prev && prev.y === o.y && x - X(prev.t) < 14) return;
      var j = i + 1;
      while (j < markEls.length && markEls[j].y === o.y && X(markEls[j].t) - X(markEls[j - 1].t) < 14) j++;
      var last = X(markEls[j - 1].t), next = j < markEls.length && markEls[j].y === o.y ? X(markEls[j].t) : G + W;
      var more = j - i - 1, text = o.text + (more ? " (+" + more + ")" : "");
      var n = Math.floor((Math.min(next, G + W) - last - 14) / 5.7);
      if (n >= 6) {
        o.label.removeAttribute("visibility"); o.label.setAttribute("x", last + 7);
        o.label.textContent = text.length > n ? text.slice(0, n - 1) + "…" : text;
      }
    });
    faultEls.forEach(function (o) {
      var s = span(o.f.start, o.f.end, 3); put(o.r, s);
      o.cores.forEach(function (c) { put(c, s); });
      if (s) {  // from the window's start, moved left to stay on screen
        var lw = o.lab.textContent.length * 7;
        o.lab.removeAttribute("visibility"); o.lab.setAttribute("x", Math.max(G + 2, Math.min(Math.max(s[0], G + 2), G + W - lw)));
      }
      else o.lab.setAttribute("visibility", "hidden");
      if (o.heal) {
        var hx = X(o.f.heal);
        var vis = hx >= G && hx <= G + W;
        [o.heal, o.healLab].forEach(function (e) { if (vis) e.removeAttribute("visibility"); else e.setAttribute("visibility", "hidden"); });
        o.heal.setAttribute("x1", hx); o.heal.setAttribute("x2", hx); o.healLab.setAttribute("x", hx + 3);
      }
    });
    var parts = [], hparts = [];
    calls.forEach(function (c, i) {
      var s = span(c.start, c.end, MINW);
      put(callEls[i], s);
      if (s && c.caller && (showAll || !BULK[c.name]) && c.caller !== c.lane) arrowPath(c, s[0], parts, hparts);
    });
    arrows.setAttribute("d", parts.join("")); heads.setAttribute("d", hparts.join(""));
    var taken = {};  // each row's labels, left to right: where the last one ends
    labels.forEach(function (o) {
      var s = span(o.c.start, o.c.end, MINW), tw = o.t.textContent.length * 6.6 + 6;
      var key = o.c.lane + "/" + o.c.row, free = taken[key] === undefined ? G : taken[key], x = null, cls = "clabel out";
      if (s && shown(s) > tw && Math.max(s[0], G) >= free) { x = Math.max(s[0], G) + 3; cls = "clabel"; }
      else if (s && (o.c.next === null ? G + W : X(o.c.next)) - (s[0] + s[1]) > tw + 4 && s[0] + s[1] + tw < G + W &&
               s[0] + s[1] >= free) x = s[0] + s[1] + 3;
      else if (s && s[0] - Math.max(o.c.prev === null ? G : X(o.c.prev), G, free) > tw + 4) x = s[0] - tw + 1;
      if (x === null) { o.t.setAttribute("visibility", "hidden"); return; }
      o.t.removeAttribute("visibility"); o.t.setAttribute("x", x); o.t.setAttribute("class", cls);
      taken[key] = Math.max(x + tw, s[0] + s[1]);
    });
    drawSelected();
    document.getElementById("view").textContent = "view " + v0.toFixed(4) + " s – " + v1.toFixed(4) + " s (" + fmtDur(v1 - v0) + ")";
  }
  function drawSelected() {
    if (selected === null) { selArrow.setAttribute("d", ""); selHead.setAttribute("d", ""); return; }
    var c = calls[selected], s = span(c.start, c.end, MINW), parts = [], hparts = [];
    if (s && c.caller && c.caller !== c.lane) arrowPath(c, s[0], parts, hparts);
    selArrow.setAttribute("d", parts.join("")); selHead.setAttribute("d", hparts.join(""));
  }

  // -- details --
  function callText(c) {
    var lines = [];
    lines.push(c.name + (c.kind !== "unary" ? "  (" + c.kind + ")" : ""));
    lines.push("result " + c.result + "  [" + {ok: "success", error: "documented error", transport: "transport error"}[c.cls] + "]");
    lines.push("served by " + laneName(c.lane, c.inc) + (c.caller ? " · called by " + laneName(c.caller, c.caller_inc) : "") + (c.who && !c.caller ? " · " + c.who : ""));
    if (c.cause !== null && c.cause !== undefined) lines.push("caused by " + calls[c.cause].name + " (served by " + laneName(calls[c.cause].lane, calls[c.cause].inc) + ")");
    if (c.lpid !== null && c.lpid !== undefined) lines.push("lpid " + c.lpid + (c.state ? " · state " + c.state : ""));
    else if (c.state) lines.push("state " + c.state);
    lines.push((c.start_known ? "start " + fmtT(c.start) + " · " : "start not recorded · ") + "end " + fmtT(c.end) + (c.start_known ? " · duration " + fmtDur(c.end - c.start) : ""));
    var a = c.args || {};
    Object.keys(a).forEach(function (k) { lines.push(k + ": " + (typeof a[k] === "object" ? JSON.stringify(a[k]) : a[k])); });
    lines.push("source " + c.source + " · call #" + c.id);
    return lines.join("\n");
  }
  var tip = document.getElementById("tip"), det = document.getElementById("details");
  function showTip(text, ev) {
    tip.textContent = text; tip.style.display = "block";
    var x = ev.clientX + 14, yy = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth - 8) x = ev.clientX - tip.offsetWidth - 10;
    if (yy + tip.offsetHeight > window.innerHeight - 8) yy = ev.clientY - tip.offsetHeight - 10;
    tip.style.left = x + "px"; tip.style.top = yy + "px";
  }
  function showDetails(title, text) {
    det.textContent = "";
    var close = document.createElement("span"); close.className = "close"; close.textContent = "×";
    close.onclick = function () { det.style.display = "none"; select(null); };
    var h = document.createElement("h3"); h.textContent = title;
    det.appendChild(close); det.appendChild(h); det.appendChild(document.createTextNode(text));
    det.style.display = "block";
  }
  function select(id) {
    if (selected !== null) callEls[selected].classList.remove("sel");
    selected = id;
    if (id !== null) {
      callEls[id].classList.add("sel");
      showDetails(calls[id].name + " · " + laneName(calls[id].lane, calls[id].inc), callText(calls[id]));
    }
    drawSelected();
  }
  svg.addEventListener("mousemove", function (ev) {
    if (drag) return;
    var t = ev.target, id = t.getAttribute && t.getAttribute("data-call-id");
    if (id !== null && id !== undefined && id !== "") showTip(callText(calls[+id]), ev);
    else if (t.getAttribute && t.getAttribute("data-tip")) showTip(t.getAttribute("data-tip"), ev);
    else tip.style.display = "none";
  });
  svg.addEventListener("mouseleave", function () { tip.style.display = "none"; });

  // -- verdicts --
  var vbox = document.getElementById("verdicts");
  D.verdicts.forEach(function (v) {
    var chip = document.createElement("span");
    chip.className = "verdict " + (v.held ? "held" : "failed");
    chip.setAttribute("data-invariant", v.name);
    var linked = [];
    v.violations.forEach(function (x) { linked = linked.concat(x.calls); });
    chip.textContent = (v.held ? "✓ " : "✗ ") + v.name + (v.held ? "" : " (" + v.violations.length + ")");
    chip.title = v.what;
    if (!v.held) {
      chip.setAttribute("data-calls", linked.join(" "));
      chip.onclick = function () { toggleVerdict(v, chip, linked); };
      linked.forEach(function (id) { callEls[id].classList.add("hl"); });
    }
    vbox.appendChild(chip);
  });
  function toggleVerdict(v, chip, linked) {
    document.querySelectorAll(".verdict.active").forEach(function (c) { c.classList.remove("active"); });
    if (activeVerdict === v) { activeVerdict = null; svg.classList.remove("hlmode"); det.style.display = "none"; return; }
    activeVerdict = v; chip.classList.add("active"); svg.classList.add("hlmode");
    var text = v.what + "\n\n" + v.violations.map(function (x) {
      return "• " + x.detail + "\n  " + (x.calls.length ? x.calls.length + " calls named: " + x.calls.slice(0, 12).map(function (id) { return calls[id].name + " #" + id; }).join(", ") + (x.calls.length > 12 ? ", …" : "") : "names no call");
    }).join("\n");
    showDetails("✗ " + v.name, text);
    if (linked.length) {
      var a = Math.min.apply(null, linked.map(function (id) { return calls[id].start; }));
      var b = Math.max.apply(null, linked.map(function (id) { return calls[id].end; }));
      var m = Math.max((b - a) * 0.1, (full[1] - full[0]) * 0.01, 1e-4);
      setView(Math.max(a - m, full[0]), Math.min(b + m, full[1]));
    }
  }

  // -- zoom and pan --
  function setView(a, b) {
    var minSpan = 1e-6, maxSpan = (full[1] - full[0]) * 4;
    if (b - a < minSpan) { var mid = (a + b) / 2; a = mid - minSpan / 2; b = mid + minSpan / 2; }
    if (b - a > maxSpan) { a = full[0]; b = full[1]; }
    v0 = a; v1 = b; redraw();
  }
  function zoom(f, at) {
    if (at === undefined) at = (v0 + v1) / 2;
    setView(at - (at - v0) * f, at + (v1 - at) * f);
  }
  function pan(frac) { var d = (v1 - v0) * frac; setView(v0 + d, v1 + d); }
  function tAt(clientX) { var r = svg.getBoundingClientRect(); return v0 + (clientX - r.left - G) / W * (v1 - v0); }
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    if (ev.shiftKey || Math.abs(ev.deltaX) > Math.abs(ev.deltaY)) { pan((ev.deltaX || ev.deltaY) / 800); return; }
    zoom(Math.exp(ev.deltaY * 0.0016), tAt(ev.clientX));
  }, {passive: false});
  var drag = null;
  svg.addEventListener("mousedown", function (ev) {
    if (ev.button !== 0) return;
    drag = {x: ev.clientX, v0: v0, v1: v1, moved: false};
    svg.classList.add("dragging");
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return;
    var dx = ev.clientX - drag.x;
    if (Math.abs(dx) > 3) drag.moved = true;
    if (drag.moved) { var d = -dx / W * (drag.v1 - drag.v0); v0 = drag.v0 + d; v1 = drag.v1 + d; redraw(); }
  });
  window.addEventListener("mouseup", function (ev) {
    if (!drag) return;
    var was = drag; drag = null; svg.classList.remove("dragging");
    if (was.moved) return;
    var id = ev.target.getAttribute && ev.target.getAttribute("data-call-id");
    select(id !== null && id !== undefined && id !== "" ? +id : null);
    if (id === null || id === undefined || id === "") det.style.display = "none";
  });
  function button(id, fn) { var b = document.getElementById(id); if (b) b.onclick = fn; }
  button("zin", function () { zoom(0.5); });
  button("zout", function () { zoom(2); });
  button("fit", function () { setView(full[0], full[1]); });
  button("left", function () { pan(-0.33); });
  button("right", function () { pan(0.33); });
  button("tofault", function () {
    if (!D.faults.length) return;
    var f = D.faults[0], m = Math.max((f.end - f.start) * 0.1, (full[1] - full[0]) * 0.01, 1e-4);
    setView(Math.max(f.start - m, full[0]), Math.min(f.end + m, full[1]));
  });
  document.getElementById("allarrows").onchange = function (ev) { showAll = ev.target.checked; redraw(); };
  window.addEventListener("keydown", function (ev) {
    if (ev.key === "+" || ev.key === "=") zoom(0.5);
    else if (ev.key === "-") zoom(2);
    else if (ev.key === "0") setView(full[0], full[1]);
    else if (ev.key === "ArrowLeft") pan(-0.2);
    else if (ev.key === "ArrowRight") pan(0.2);
    else if (ev.key === "Escape") { select(null); det.style.display = "none"; }
  });
  window.addEventListener("resize", redraw);

  // an initial view from the address: #view=A,B (seconds), #call=ID
  var hash = decodeURIComponent(location.hash.slice(1));
  var mv = /view=(-?[\d.]+),(-?[\d.]+)/.exec(hash), mc = /call=(\d+)/.exec(hash);
  if (mv) { v0 = +mv[1]; v1 = +mv[2]; }
  redraw();
  if (mc && calls[+mc[1]]) select(+mc[1]);
  document.getElementById("count").textContent = calls.length + " calls drawn";
  document.body.setAttribute("data-calls-drawn", document.querySelectorAll("rect.call").length);
  document.body.setAttribute("data-ready", "1");
}
})();
"""
