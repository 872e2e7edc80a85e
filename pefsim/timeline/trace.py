"""The same run as Chrome trace-event JSON (``{"traceEvents": [...]}``), which Perfetto
(ui.perfetto.dev, "Open trace file") and chrome://tracing open: one process per service
incarnation (the HV after a restart is a new process), one thread (track) per lpid, every call an
``X`` (complete) event with a flow arrow from the call that caused it (trace context), the VM / SVM states as slices on their guest's process, the guests' own
events and the faults as instant events. Times are microseconds from the timeline's time 0.

Format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU"""
from __future__ import annotations

from pefsim.timeline.model import Model

US = 1e6


def _us(t: float) -> float:
    return round(t * US, 3)


def render_trace(model: Model) -> dict:
    events: list[dict] = []
    pids: dict[tuple[str, int], int] = {}

    def meta(what: str, pid: int, tid: int | None = None, **args) -> None:
        ev = {"name": what, "ph": "M", "pid": pid, "args": args}
        if tid is not None:
            ev["tid"] = tid
        events.append(ev)

    order = 0
    for lane in model.lanes:
        for seg in lane.segments:
            order += 1
            pid = pids[(lane.id, seg.inc)] = order
            name = lane.label if len(lane.segments) == 1 else \
                f"{lane.id.upper()} #{seg.inc}" + ("" if seg.start_why == "run start" else f" ({seg.start_why})")
            if lane.kind == "guest":
                name = f"guest {lane.label}"
            meta("process_name", pid, name=name)
            meta("process_sort_index", pid, sort_index=order)
            if seg.start_why != "run start":
                events.append({"name": seg.start_why, "ph": "i", "s": "p", "ts": _us(seg.start), "pid": pid, "tid": 0})
            if seg.end_why != "run end":
                events.append({"name": seg.end_why, "ph": "i", "s": "p", "ts": _us(seg.end), "pid": pid, "tid": 0})
    threads: set[tuple[int, int]] = set()

    def thread(pid: int, tid: int, name: str) -> None:
        if (pid, tid) not in threads:
            threads.add((pid, tid))
            meta("thread_name", pid, tid, name=name)
            meta("thread_sort_index", pid, tid, sort_index=tid)

    lpid_names = {}
    for lane in model.lanes:
        for row in lane.rows:
            if row.lpid is not None and row.label and "·" in row.label:
                lpid_names[row.lpid] = row.label
    for c in model.calls:
        pid = pids.get((c.lane, c.inc)) or pids[(c.lane, 1)]
        tid = 0 if c.lpid is None else int(c.lpid)
        thread(pid, tid, "no lpid" if c.lpid is None else lpid_names.get(c.lpid, f"lpid {c.lpid}"))
        args = {"lpid": c.lpid, "result": c.result, "class": c.cls, "caller": c.caller, "caller_inc": c.caller_inc, "who": c.who,
                "state": c.state, "kind": c.kind, "source": c.source, "call_id": c.id, **c.args}
        events.append({"name": c.name, "cat": c.cls, "ph": "X", "ts": _us(c.start), "dur": _us(max(0.0, c.end - c.start)),
                       "pid": pid, "tid": tid, "args": {k: v for k, v in args.items() if v is not None}})
        if c.cause is not None:  # a flow arrow from the call that caused it (its traceparent's parent span)
            cause = model.calls[c.cause]
            cpid = pids.get((cause.lane, cause.inc)) or pids[(cause.lane, 1)]
            flow = {"name": "caused", "cat": "trace", "id": c.id}
            events.append({**flow, "ph": "s", "ts": _us(max(cause.start, min(c.start, cause.end))), "pid": cpid,
                           "tid": 0 if cause.lpid is None else int(cause.lpid)})
            events.append({**flow, "ph": "f", "bp": "e", "ts": _us(c.start), "pid": pid, "tid": tid})
    for lane in model.lanes:
        pid = pids[(lane.id, lane.segments[0].inc)]
        for i, band in enumerate(lane.bands):
            tid = 10_000 + i
            thread(pid, tid, f"{band.label} lpid {band.lpid}")
            for span in band.spans:
                events.append({"name": span["state"], "cat": "state", "ph": "X", "ts": _us(span["start"]),
                               "dur": _us(max(0.0, span["end"] - span["start"])), "pid": pid, "tid": tid,
                               "args": {"lpid": band.lpid}})
        if lane.marks:
            thread(pid, 9_999, "events")
        for mark in lane.marks:
            events.append({"name": mark.text, "cat": "event", "ph": "i", "s": "t", "ts": _us(mark.t), "pid": pid,
                           "tid": 9_999})
    if model.faults:
        order += 1
        fpid = order
        meta("process_name", fpid, name="faults")
        meta("process_sort_index", fpid, sort_index=-1)
        thread(fpid, 0, "fault windows")
        for f in model.faults:
            args = {"label": f.label, "lanes": f.lanes, "heal": f.heal, "note": f.note}
            events.append({"name": f"{f.kind}: {f.label}", "cat": "fault", "ph": "i", "s": "g", "ts": _us(f.start),
                           "pid": fpid, "tid": 0, "args": args})
            events.append({"name": f"{f.kind}", "cat": "fault", "ph": "X", "ts": _us(f.start),
                           "dur": _us(max(0.0, f.end - f.start)), "pid": fpid, "tid": 0, "args": args})
            if f.heal is not None:
                events.append({"name": f"heal: {f.kind}", "cat": "fault", "ph": "i", "s": "g", "ts": _us(f.heal),
                               "pid": fpid, "tid": 0})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"title": model.title, "source": model.source, "t0_unix_s": model.t0,
                          "verdicts": {v.name: v.held for v in model.verdicts}}}
