"""The timeline's model of one run: what the renderers draw, built from what a run already keeps.

Inputs (nothing here talks to a service):
  * a chaos run directory (pefsim/chaos/store.py): ``record.json``, ``verdicts.json`` and one
    ``<svc>.history.jsonl`` per service;
  * a failing simulator seed's JSON file (pefsim/sim/campaign.py): ``plan``, ``violations``,
    ``record`` and ``history`` in one object.

A history line (pefsim/history.py, pefsim/calltable.py) is written when a call ends: ``t`` is its end
(wall clock; the simulator's virtual wall clock starts at ``EPOCH``) and ``dur_s`` its length. Kinds:
  unary      ``rc``/``rc_name``/``dur_s``: a bar ``t - dur_s .. t``
  stream     ``stream: "start"``: written as the stream starts; the bar runs to its last batch
  batch      ``batches``, ``pages``, ``results``: one batch of a bulk call, the bar from the stream's
             previous line (a bidi stream has no start line: the batch is drawn where it ended)
  denied / refused / error   a refusal (documented), an admission refusal or a handler's crash
  ``dir: "out"``  the HV's own record of a ucall it made: matched to the UV's line of the same call
             (added to that call's details); one that no UV line answers (the UV unreachable, reset)
             is drawn on the UV's lane as a transport error, seen from the caller's side only.

The histories do not record process incarnations: a killed HV's successor appends to the same file.
The lanes' segments come from the fault record (``record["fault"]``: injected, t_inject, t_heal,
detail) and the plan: a kill at ``t_inject``, the restart at ``t_heal`` or at the first line of the
new process before it (the harness sees the restart only once the new process answers its health
check; the new HV starts recovering before that).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

EPOCH = 1_700_000_000.0  # the simulator's virtual wall clock's zero (pefsim.sim.loop.EPOCH_NS)
SUCCESS = frozenset({"OK", "H_SUCCESS", "U_SUCCESS"})
# calls made over and over (memory checks, vCPU state, status polls): no arrow unless asked, and a
# verdict that names only a guest links its other calls
BULK = frozenset({"HostReadPage", "VcpuStore", "SvmLoad", "UvStatus", "HvStatus", "VmSession"})
# what a successful call leaves its VM / SVM in (the next line that names the lpid says so too,
# but maybe much later)
AFTER = {("hv", "H_SVM_INIT_START"): "VM_TRANSIENT", ("hv", "H_SVM_INIT_DONE"): "VM_SECURE",
         ("hv", "DestroyVm"): "destroyed", ("uv", "UV_ESM"): "SVM_SECURE", ("uv", "UV_SVM_TERMINATE"): "terminated"}
MAX_SUBROWS = 3  # overlapping calls of one lpid on one lane: stacked this deep, then drawn over


class NotARun(ValueError):
    """The path is no chaos run, campaign or simulator failure."""


@dataclass
class Call:
    id: int
    lane: str  # the serving service's lane ("uv", "hv", "guest:<name>")
    inc: int  # its incarnation (1, 2, ... : a new one after each restart)
    row: int  # the lane's row (rows: one per lpid, overlapping calls stacked)
    start: float  # seconds from the model's t0
    end: float
    name: str  # the call (the RPC / ABI name)
    cls: str  # "ok" | "error" (a documented result other than success) | "transport"
    result: str  # the result's name ("H_SUCCESS", "U_SUCCESS×1024", "UNAVAILABLE", ...)
    kind: str  # unary | stream | batch | denied | refused | failed | caller-only
    lpid: int | None = None
    caller: str | None = None  # the caller's lane
    caller_inc: int | None = None
    who: str | None = None  # the caller's name as the service recorded it
    state: str | None = None  # the state the call's check saw
    args: dict = field(default_factory=dict)  # what else the line says (pages, results, gpa, ...)
    source: str = ""  # "<svc>.history.jsonl:<line>"
    start_known: bool = True  # False: the line gives only the end (a bidi stream's batch)
    cause: int | None = None  # the call whose span is this one's parent (the traceparent it came with)


@dataclass
class Segment:
    inc: int
    start: float
    end: float
    start_why: str  # "run start" | "restarted" | "reset" ...
    end_why: str  # "run end" | "killed" | ...


@dataclass
class Band:
    label: str  # "VM (HV)" | "SVM (UV)"
    lpid: int
    spans: list[dict]  # {"start", "end", "state"}


@dataclass
class Mark:
    t: float
    text: str


@dataclass
class Row:
    label: str
    lpid: int | None


@dataclass
class Lane:
    id: str
    kind: str  # guest | vm | hv | uv | proxy | client
    label: str
    segments: list[Segment] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    note: str = ""


@dataclass
class Fault:
    kind: str
    label: str
    start: float
    end: float  # the fault's effect over (a killed process serves again, a cut healed)
    heal: float | None  # when the harness healed it (its record)
    lanes: list[str]
    note: str = ""


@dataclass
class Verdict:
    name: str
    held: bool
    what: str
    violations: list[dict]  # {"detail", "calls": [call ids it names]}


@dataclass
class Model:
    kind: str  # "chaos" | "sim"
    title: str
    source: str
    t0: float  # Unix seconds (the simulator's: virtual) of time 0
    duration: float
    lanes: list[Lane]
    calls: list[Call]
    faults: list[Fault]
    verdicts: list[Verdict]
    info: dict  # plan, fault detail, recovery, outcomes, replay
    stats: dict  # history lines read, by kind

    def as_json(self) -> dict:
        return asdict(self)

    def lane(self, lane_id: str) -> Lane:
        return next(lane for lane in self.lanes if lane.id == lane_id)

    @property
    def failed(self) -> bool:
        return any(not v.held for v in self.verdicts)


# -- loading ---------------------------------------------------------------------------------------


def load(path: Path | str) -> Model:
    """The model of a chaos run directory, a local stack's run directory (its stack.json: every
    call so far, the guests commands like `pefsim guest add` attached too) or a simulator
    failure's JSON file."""
    path = Path(path)
    if path.is_dir() and (path / "stack.json").is_file():  # a local stack's run directory (pefsim up)
        return from_stack([path, *sorted(path.glob("attached-*"))], title=f"the stack in {path}")
    if path.is_dir():
        return from_chaos_run(path)
    if path.is_file():
        return from_sim_failure(path)
    raise FileNotFoundError(2, "no such file or directory", str(path))


def read_jsonl(path: Path) -> list[dict]:
    """A history file's lines (a line cut short by a kill -9 is skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def from_chaos_run(run_dir: Path) -> Model:
    run_dir = Path(run_dir)
    rec_path = run_dir / "record.json"
    if not rec_path.is_file():
        raise NotARun(f"{run_dir}: not a chaos run (no record.json)")
    record = json.loads(rec_path.read_text())
    verdicts_path = run_dir / "verdicts.json"
    verdicts = json.loads(verdicts_path.read_text()) if verdicts_path.is_file() else {}
    history = {p.name.removesuffix(".history.jsonl"): read_jsonl(p)
               for p in sorted(run_dir.glob("*.history.jsonl"))}
    campaign = run_dir.resolve().parent.name
    m = re.match(r"\d{8}-\d{6}-(.+)-(abort|esm|secure)-seed(\d+)$", campaign)
    info = {"campaign": campaign, "run": record.get("run")}
    if m:
        info.update(fault=m.group(1), during=m.group(2), seed=int(m.group(3)))
    return build("chaos", record, history, verdicts=verdicts, source=str(run_dir), info=info)


def from_stack(dirs: list[Path], guests: dict[str, dict] | None = None, title: str = "") -> Model:
    """A local stack's calls (``pefsim demo --timeline``): every ``*.history.jsonl`` its services
    wrote in ``dirs`` (the stack's, and an attached command's for its own guests), no fault and
    no verdicts; ``guests`` as a chaos record has them ({name: {"name", "report": {"outcome",
    "timeline": [{"unixNs", "what"}]}}})."""
    history = {}
    for p in sorted(p for d in dirs for p in Path(d).glob("*.history.jsonl")):
        lines = read_jsonl(p)
        if lines:
            history[str(lines[0].get("svc") or p.name.removesuffix(".history.jsonl"))] = lines
    if not history:
        raise NotARun(f"{', '.join(map(str, dirs))}: no call histories")
    return build("stack", {"guests": guests or {}}, history, verdicts={}, source=str(dirs[0]), info={"title": title})


def from_sim_failure(path: Path) -> Model:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise NotARun(f"{path}: not a simulator failure (not JSON: {exc})") from None
    if not isinstance(data, dict) or not {"record", "history"} <= set(data):
        raise NotARun(f"{path}: not a simulator failure (no record and history)")
    return from_sim(data["record"], data["history"], data.get("violations", []), source=str(path),
                    replay=data.get("replay", ""))


def from_sim(record: dict, history: dict, violations: list, source: str = "", replay: str = "") -> Model:
    """A simulated run's model: ``violations`` as campaign.py keeps them ({invariant, detail}) or as
    the checker returns them (Violation objects)."""
    from pefsim.chaos.store import every_verdict

    class _V:
        def __init__(self, v):
            self.invariant = v["invariant"] if isinstance(v, dict) else v.invariant
            self.detail = v["detail"] if isinstance(v, dict) else v.detail
    verdicts = every_verdict([_V(v) for v in violations])
    plan = record.get("plan", {})
    info = {"seed": plan.get("seed", record.get("run")), "replay": replay}
    return build("sim", record, history, verdicts=verdicts, source=source, info=info)


# -- building --------------------------------------------------------------------------------------


def _wall(t: float | None) -> float | None:
    """A record's time as the histories' clock: the simulator records loop time (from 0), its
    histories the virtual wall clock (from EPOCH)."""
    if t is None or not t:
        return None
    return t + EPOCH if t < 1e8 else t


def _name_rc(svc: str, call: str, rc: int) -> str:
    """A result's name as the serving service's call table gives it ("rc N" for a call it does
    not have: a history from another version)."""
    if rc == 0:
        return "OK"
    from pefsim.calltable import result_name
    from services.hypervisor import calltable as hv_table
    from services.ultravisor import calltable as uv_table

    table = {"uv": uv_table, "hv": hv_table}.get(svc)
    row = None if table is None else next((c for c in table.CALLS if c.name == call), None)
    return f"rc {rc}" if row is None else result_name(row, rc)


def _lane_of_svc(svc: str) -> str:
    return svc if svc in ("uv", "hv") else (f"guest:{svc.split(':', 1)[1]}" if svc.startswith("guest:") else svc)


CORE_KEYS = {"t", "svc", "call", "caller", "who", "lpid", "state", "rc", "rc_name", "dur_s", "stream", "dir"}


def _raw_calls(history: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """Every call the histories record, as dicts with absolute times (the lane and incarnation come
    later), and the count of lines by kind."""
    calls: list[dict] = []
    outs: list[dict] = []
    stats = {"lines": 0, "served": 0, "out": 0, "out_matched": 0, "caller_only": 0}
    for svc, lines in history.items():
        lane = _lane_of_svc(svc)
        streams: dict[tuple, dict] = {}  # (call, who, lpid) -> the stream's call (open)
        order = sorted(range(len(lines)), key=lambda i: lines[i].get("t", 0))
        for i in order:
            e = lines[i]
            stats["lines"] += 1
            t = float(e.get("t", 0))
            src = f"{svc}.history.jsonl:{i + 1}"
            if e.get("dir") == "out":
                stats["out"] += 1
                outs.append({**e, "_t": t, "_src": src, "_svc": svc})
                continue
            stats["served"] += 1
            c = {"lane": lane, "svc": svc, "name": e.get("call", "?"), "lpid": e.get("lpid"), "who": e.get("who"),
                 "role": e.get("caller"), "state": e.get("state"), "source": src, "start": t, "end": t,
                 "start_known": True, "args": {k: v for k, v in e.items() if k not in CORE_KEYS}}
            key = (c["name"], c["who"], c["lpid"])
            if "batches" in e:
                results = e.get("results") or {}
                c["kind"] = "batch"
                c["result"] = ", ".join(f"{k}×{n}" for k, n in results.items()) or "no pages"
                c["cls"] = "ok" if set(results) <= SUCCESS else "error"
                stream = streams.get(key)
                if stream is not None:
                    c["start"] = stream["_last"]
                    stream["_last"] = stream["end"] = t
                else:
                    c["start_known"] = False
            elif e.get("stream") == "start":
                rc = int(e.get("rc") or 0)
                c["kind"] = "stream"
                c["result"] = "streamed" if rc == 0 else _name_rc(svc, c["name"], rc)
                c["cls"] = "ok" if rc == 0 else "error"
                c["args"]["rc"] = rc
                if rc == 0:
                    c["_last"] = t
                    streams[key] = c
            elif e.get("denied"):
                c.update(kind="denied", result="PERMISSION_DENIED", cls="error")
            elif "refused" in e:
                c.update(kind="refused", result=f"refused: {e['refused']}", cls="transport")
            elif "error" in e:
                c.update(kind="failed", result="INTERNAL (the handler raised)", cls="transport")
            else:
                rc = int(e.get("rc") or 0)
                c["kind"] = "unary"
                c["result"] = e.get("rc_name") or _name_rc(svc, c["name"], rc)
                c["cls"] = "ok" if rc == 0 or c["result"] in SUCCESS else "error"
                c["start"] = t - float(e.get("dur_s") or 0.0)
                c["args"]["rc"] = rc
            calls.append(c)
    for c in calls:
        c.pop("_last", None)
    _match_outs(calls, outs, stats)
    return calls, stats


def _match_outs(calls: list[dict], outs: list[dict], stats: dict) -> None:
    """The HV's records of its ucalls: each joins the UV's line for the same call (the latest
    before it, not yet joined); one with no such line is the caller's view only."""
    served: dict[tuple, list[dict]] = {}
    for c in calls:
        if c["kind"] == "unary":
            served.setdefault((c["lane"], c["name"], c["lpid"], c["who"]), []).append(c)
    for e in sorted(outs, key=lambda e: e["_t"]):
        caller = e["_svc"]
        target = "uv" if caller == "hv" else "hv"
        pool = served.get((target, e.get("call"), e.get("lpid"), caller), [])
        match = None
        for c in reversed(pool):
            if not c.get("_joined") and e["_t"] - 10.0 <= c["end"] <= e["_t"] + 0.05:
                match = c
                break
        seen = {k: v for k, v in e.items() if k not in CORE_KEYS and not k.startswith("_")}
        if "rc" in e:
            seen["rc"] = e["rc"]
        if match is not None and "error" not in e:
            match["_joined"] = True
            match["args"][f"{caller} saw"] = seen or "the answer"
            stats["out_matched"] += 1
            continue
        stats["caller_only"] += 1
        error = e.get("error")
        rc = int(e.get("rc") or 0)
        calls.append({"lane": _lane_of_svc(target), "svc": target, "name": e.get("call", "?"), "lpid": e.get("lpid"),
                      "who": caller, "role": None, "state": None, "source": e["_src"], "start": e["_t"],
                      "end": e["_t"], "start_known": False, "kind": "caller-only",
                      "result": str(error) if error else _name_rc(target, e.get("call", ""), rc),
                      "cls": "transport" if error else ("ok" if rc == 0 else "error"),
                      "args": {f"{caller} saw": seen, "note": f"recorded by the {caller} (the caller) only: "
                                                              f"no {target} line answers it"}})
    for c in calls:
        c.pop("_joined", None)


def _caller_lane(who: str | None, role: str | None, guests: dict[str, str]) -> str | None:
    if who in ("uv", "hv"):
        return who
    if who == "operator" or (who is None and role == "ROLE_OPERATOR"):
        return "operator"
    if who in guests:
        return guests[who]
    if who:
        return f"client:{who}"
    return None


# Times within this of each other are one instant: a Unix time as a double resolves 0.24 µs, and
# the simulator's fault record is kept in loop time, its histories on a wall clock from EPOCH.
SAME = 1e-6


def _first_after(calls: list[dict], lane: str, t: float) -> float | None:
    """The first moment after ``t`` a process of ``lane`` is seen alive: a line it wrote, or a
    call it made that another service recorded."""
    seen = [max(c["start"], t) for c in calls if c["lane"] == lane and c["end"] > t + SAME]
    seen += [c["start"] for c in calls if c.get("caller") == lane and c["start"] > t + SAME]
    return min(seen) if seen else None


def _lifecycle(kind: str, record: dict, calls: list[dict], t_begin: float, t_end: float,
               guests: dict[str, str]) -> tuple[dict[str, list[tuple]], list[Fault], list[str]]:
    """Each lane's deaths and restarts (lane -> [(t, "down"|"up", why)]), the fault windows and
    notes, from the fault record and the plan (absolute times)."""
    plan = record.get("plan", {}) or {}
    rec = record.get("fault", {}) or {}
    fault = plan.get("fault", "none")
    detail = rec.get("detail", "")
    inject, heal = _wall(rec.get("t_inject")), _wall(rec.get("t_heal"))
    events: dict[str, list[tuple]] = {}
    faults: list[Fault] = []
    notes: list[str] = []
    victim = next((lane for name, lane in guests.items() if name.endswith("victim")), None)

    def down_up(lane: str, t_down: float, t_up: float | None, why: str, up_why: str = "restarted") -> float:
        events.setdefault(lane, []).append((t_down, "down", why))
        if t_up is None:
            return t_end
        first = _first_after(calls, lane, t_down)
        if first is not None and first < t_up:
            t_up = first
        events[lane].append((t_up, "up", up_why))
        return t_up

    if not rec.get("injected") or inject is None:
        if fault not in ("none", None, ""):
            notes.append(f"{fault}: not injected ({detail or 'no fault record'})")
        if kind == "chaos" and plan.get("failpoint") and heal and "=stop" not in plan.get("failpoint", ""):
            down_up("hv", heal, heal, "stopped to disarm its failpoint", "restarted, disarmed")
        return events, faults, notes
    if kind == "chaos":
        if fault in ("kill-hv", "kill-uv"):
            svc = fault.removeprefix("kill-")
            why = "killed itself at its failpoint" if "killed itself" in detail else "kill -9"
            up = down_up(svc, inject, heal, why)
            faults.append(Fault(fault, detail or f"kill -9 {svc}", inject, up, heal, [svc],
                                note="the harness noticed the death here" if "killed itself" in detail else ""))
        elif fault == "pause-hv":
            faults.append(Fault(fault, detail or "SIGSTOP hv", inject, heal or inject, heal, ["hv"]))
        elif fault == "kill-guest":
            if victim:
                events.setdefault(victim, []).append((inject, "down", "kill -9"))
            faults.append(Fault(fault, detail or "kill -9 the victim guest", inject, heal or inject, heal,
                                [victim] if victim else []))
        else:  # net-*: through the fault proxy between HV and UV
            faults.append(Fault(fault, detail or fault, inject, heal or inject, heal, ["proxy", "hv", "uv"]))
        return events, faults, notes
    # the simulator
    for_s = float(plan.get("for_s") or 0.0)
    if fault == "kill-hv":
        up = down_up("hv", inject, inject + for_s, "crashed")
        faults.append(Fault(fault, detail.split(", then")[0], inject, up, up, ["hv"]))
        if "while recovering" in detail and heal is not None:
            again = max(up, heal - for_s)
            up2 = down_up("hv", again, heal, "crashed again while recovering")
            faults.append(Fault(fault, "HV crashed again while recovering" + detail.split("while recovering")[-1],
                                again, up2, heal, ["hv"], note="crash time derived: the restart less the downtime"))
    elif fault == "hv-gone":
        up = down_up("hv", inject, heal, "crashed")
        faults.append(Fault(fault, detail, inject, up, heal, ["hv"]))
    elif fault == "reset-uv":
        down_up("uv", inject, inject, "reset", "a new UV (machine reset)")
        faults.append(Fault(fault, detail, inject, heal or inject, heal, ["uv"]))
    elif fault == "kill-guest":
        if victim:
            events.setdefault(victim, []).append((inject, "down", "kill -9"))
        faults.append(Fault(fault, detail, inject, inject, heal, [victim] if victim else []))
    elif fault == "hang":
        faults.append(Fault(fault, detail + " (never healed)", inject, t_end, None, ["hv"]))
    else:  # partition, lose
        link = plan.get("link", "") or ""
        lanes = ["hv", victim] if "guest" in link and victim else ["hv", "uv"]
        note = "armed here: the first such answer is lost when it comes" if fault == "lose" else ""
        faults.append(Fault(fault, detail, inject, heal or inject, heal, [lane for lane in lanes if lane], note))
    return events, faults, notes


def _segments(lane_events: list[tuple], start: float, end: float) -> list[Segment]:
    segs: list[Segment] = []
    cur: Segment | None = Segment(1, start, end, "run start", "run end")
    for t, what, why in sorted(lane_events, key=lambda x: x[0]):  # stable: at one instant, in the order they happened
        if what == "down" and cur is not None:
            cur.end, cur.end_why = t, why
            segs.append(cur)
            cur = None
        elif what == "up" and cur is None:
            cur = Segment(len(segs) + 1, t, end, why, "run end")
    if cur is not None:
        segs.append(cur)
    return segs


def _inc_at(segs: list[Segment], t: float) -> int:
    """The incarnation alive at ``t`` (at a death and a restart in one instant: the one that died)."""
    for s in segs:
        if s.start - SAME <= t <= s.end + SAME:
            return s.inc
    before = [s for s in segs if s.start <= t]
    return before[-1].inc if before else segs[0].inc


def _bands(calls: list[dict], t_end: float) -> dict[tuple[str, int], list[dict]]:
    """The state of each lpid's VM (HV) and SVM (UV) over time, as the calls saw it: the state a
    call's check saw (at its start), and what a successful call leaves behind (AFTER)."""
    seen: dict[tuple[str, int], list[tuple[float, str]]] = {}
    for c in calls:
        if c["lpid"] is None or c["lane"] not in ("uv", "hv") or c["kind"] == "caller-only":
            continue
        key = (c["lane"], int(c["lpid"]))
        if c.get("state"):
            seen.setdefault(key, []).append((c["start"] if c["kind"] == "unary" else c["end"], c["state"]))
        after = AFTER.get((c["lane"], c["name"]))
        if after and c["cls"] == "ok":
            seen.setdefault(key, []).append((c["end"], after))
    out = {}
    for key, obs in seen.items():
        obs.sort(key=lambda x: x[0])
        spans: list[dict] = []
        for t, state in obs:
            if spans and spans[-1]["state"] == state:
                continue
            if spans:
                spans[-1]["end"] = t
            spans.append({"start": t, "end": t_end, "state": state})
        out[key] = spans
    return out


WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_:-]*")


def link_calls(detail: str, calls: list[Call], guest_lpids: dict[str, int]) -> list[int]:
    """The calls a violation's detail names: by call name, service, lpid or guest, state, result
    and gpa, each narrowing the set; a detail naming only a guest or an lpid links its calls but
    the bulk ones (memory checks, status polls)."""
    words = set(WORD.findall(detail))
    names = {c.name for c in calls} & words
    svc = detail.split(" ", 1)[0] if detail.split(" ", 1)[0] in ("uv", "hv") else None
    lpids = {int(n) for n in re.findall(r"lpid (\d+)", detail)}
    for guest in sorted(guest_lpids, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(guest)}(?![\w-])", detail):
            lpids.add(guest_lpids[guest])
            break
    states = {w for w in words if re.fullmatch(r"S?VM_[A-Z_]+", w)}
    results = {w for w in words if re.fullmatch(r"[HU]_[A-Z_]+", w)} - names
    gpas = {int(g, 16) for g in re.findall(r"gpa 0x([0-9a-fA-F]+)", detail)}
    if not (names or lpids or results or gpas):
        return []
    out = []
    for c in calls:
        if names and c.name not in names and c.args.get("batches") not in names:
            continue
        if svc and c.lane != svc:
            continue
        if lpids and c.lpid not in lpids:
            continue
        if states and c.state not in states and names:
            continue
        if results and not any(r in c.result for r in results):
            continue
        if gpas and c.args.get("gpa") not in gpas and (c.args.get("hv saw") or {}).get("gpa") not in gpas:
            continue
        if not names and not results and not gpas and c.name in BULK:
            continue
        out.append(c.id)
    return out


def build(kind: str, record: dict, history: dict[str, list[dict]], verdicts: dict, source: str = "",
          info: dict | None = None) -> Model:
    """The model of one run from its record, its services' histories and its verdicts
    ({invariant: {held, what, violations}}, as verdicts.json)."""
    info = dict(info or {})
    raw, stats = _raw_calls(history)
    guests_rec = record.get("guests", {}) or {}
    guest_lanes: dict[str, str] = {}  # guest name -> lane id
    guest_lpids: dict[str, int] = {}
    for g in guests_rec.values():
        name = g.get("name")
        if not name:
            continue
        guest_lanes[name] = f"guest:{name}"
        lpid = (g.get("report") or {}).get("lpid")
        if lpid:
            guest_lpids[name] = int(lpid)
    for c in raw:  # a guest's VM as the HV saw it ask
        if c.get("role") == "ROLE_GUEST" and c["who"] and c["lpid"] is not None:
            guest_lanes.setdefault(c["who"], f"guest:{c['who']}")
            guest_lpids.setdefault(c["who"], int(c["lpid"]))
    for svc in history:
        if svc.startswith("guest:"):
            guest_lanes.setdefault(svc.split(":", 1)[1], _lane_of_svc(svc))
    for c in raw:
        c["caller"] = _caller_lane(c["who"], c.get("role"), guest_lanes)

    window = record.get("window") or []
    marks_abs: dict[str, list[tuple[float, str]]] = {}
    for g in guests_rec.values():
        for ev in (g.get("report") or {}).get("timeline", []) or []:
            try:
                t = int(ev.get("unixNs", 0)) / 1e9
            except (TypeError, ValueError):
                continue
            if t:
                marks_abs.setdefault(guest_lanes[g["name"]], []).append((t, ev.get("what", "")))
    times = [c["start"] for c in raw] + [c["end"] for c in raw] + [t for ms in marks_abs.values() for t, _ in ms]
    rec_f = record.get("fault", {}) or {}
    times += [t for t in (_wall(rec_f.get("t_inject")), _wall(rec_f.get("t_heal"))) if t]
    if window:
        times += [float(window[0]), float(window[1])]
    if not times:
        times = [0.0]
    t_begin = min(times)
    t_end = max(times)
    if window:
        t_begin = min(t_begin, float(window[0]))
    events, faults_abs, notes = _lifecycle(kind, record, raw, t_begin, t_end, guest_lanes)

    def rel(t: float) -> float:
        return round(t - t_begin, 6)

    # lanes, in the order a reader follows a call: guests, the HV, the proxy, the UV, the harness
    lanes: dict[str, Lane] = {}
    outcome = {g.get("name"): g.get("outcome") or (g.get("report") or {}).get("outcome") for g in guests_rec.values()}
    for name, lane_id in guest_lanes.items():
        lpid = guest_lpids.get(name)
        label = name + (f" · lpid {lpid}" if lpid else "") + (f" · {outcome[name]}" if outcome.get(name) else "")
        lanes[lane_id] = Lane(lane_id, "guest", label)
    bands = _bands(raw, t_end)
    owner = {lpid: guest_lanes[name] for name, lpid in guest_lpids.items()}
    for _, lpid in sorted(bands):
        if lpid not in owner:
            owner[lpid] = f"vm:{lpid}"
            lanes.setdefault(f"vm:{lpid}", Lane(f"vm:{lpid}", "vm", f"lpid {lpid} (no guest of the run)"))
    fail_point = (record.get("plan") or {}).get("failpoint", "")
    lanes["hv"] = Lane("hv", "hv", "HV", note=f"armed: {fail_point}" if fail_point else "")
    if kind == "chaos" and str((record.get("plan") or {}).get("fault", "")).startswith("net-"):
        lanes["proxy"] = Lane("proxy", "proxy", "fault proxy (HV↔UV)")
    lanes["uv"] = Lane("uv", "uv", "UV")
    if any(c["caller"] == "operator" for c in raw):
        lanes["operator"] = Lane("operator", "client", "operator (the harness)")
    for c in raw:
        if c["caller"] and c["caller"] not in lanes:
            lanes[c["caller"]] = Lane(c["caller"], "client", c["caller"].split(":", 1)[-1])
        if c["lane"] not in lanes:
            lanes[c["lane"]] = Lane(c["lane"], "client", c["lane"])
    abs_segments: dict[str, list[Segment]] = {}  # the incarnations on the histories' clock (calls are placed on it)
    for lane in lanes.values():
        start = t_begin
        if lane.kind == "guest":  # a guest's process: from its first sign of life
            seen = [t for t, _ in marks_abs.get(lane.id, [])] + [c["start"] for c in raw if c["caller"] == lane.id]
            start = min(seen) if seen else t_begin
        lane.segments = _segments(events.get(lane.id, []), start, t_end)
        abs_segments[lane.id] = [Segment(s.inc, s.start, s.end, "", "") for s in lane.segments]
        if lane.id == "hv" and len(lane.segments) > 1:
            lane.label = f"HV ({len(lane.segments)} incarnations)"
        for s in lane.segments:
            s.start, s.end = rel(s.start), rel(s.end)
        lane.marks = [Mark(rel(t), text) for t, text in sorted(marks_abs.get(lane.id, []))]
    for (svc, lpid), spans in sorted(bands.items()):
        label = "VM state (HV)" if svc == "hv" else "SVM state (UV)"
        lanes[owner[lpid]].bands.append(Band(label, lpid, [{"start": rel(s["start"]), "end": rel(s["end"]),
                                                           "state": s["state"]} for s in spans]))

    # calls: incarnations, rows
    calls: list[Call] = []
    raw.sort(key=lambda c: (c["start"], c["end"], c["source"]))
    for c in raw:
        lane = lanes[c["lane"]]
        inc = _inc_at(abs_segments[lane.id], c["end"])
        caller_inc = _inc_at(abs_segments[c["caller"]], c["start"]) if c["caller"] in abs_segments else None
        calls.append(Call(id=len(calls), lane=c["lane"], inc=inc, row=0, start=rel(c["start"]), end=rel(c["end"]),
                          name=c["name"], cls=c["cls"], result=c["result"], kind=c["kind"], lpid=c["lpid"],
                          caller=c["caller"], caller_inc=caller_inc, who=c["who"], state=c["state"],
                          args=c["args"], source=c["source"], start_known=c["start_known"]))
    _link_causes(calls)
    lpid_names = {lpid: name for name, lpid in guest_lpids.items()}
    for lane in lanes.values():  # a row per lpid, the calls made over and over apart from the others
        mine = [c for c in calls if c.lane == lane.id]
        groups = sorted({(c.lpid, c.name in BULK) for c in mine}, key=lambda g: (g[0] is not None, g[0] or 0, g[1]))
        for lpid, bulk in groups:
            ends: list[float] = []  # each sub-row's last end
            base = len(lane.rows)
            group = [c for c in mine if c.lpid == lpid and (c.name in BULK) == bulk]
            for c in group:
                sub = next((i for i, e in enumerate(ends) if c.start >= e), None)
                if sub is None:
                    if len(ends) < MAX_SUBROWS:
                        ends.append(c.end)
                        sub = len(ends) - 1
                    else:
                        sub = min(range(len(ends)), key=lambda i: ends[i])
                ends[sub] = max(ends[sub], c.end)
                c.row = base + sub
            label = "no lpid" if lpid is None else f"lpid {lpid}" + (f" · {lpid_names[lpid]}" if lpid in lpid_names
                                                                       else "")
            if bulk:
                names = sorted({c.name for c in group}, key=lambda n: -sum(c.name == n for c in group))
                label = f"{'' if lpid is None else f'lpid {lpid}: '}{', '.join(names[:2])}{', …' if len(names) > 2 else ''}"
            for i in range(len(ends)):
                lane.rows.append(Row(label if i == 0 else "", lpid))

    faults = [Fault(f.kind, f.label, rel(f.start), rel(f.end), None if f.heal is None else rel(f.heal),
                    [lane for lane in f.lanes if lane in lanes], f.note) for f in faults_abs]
    out_verdicts = []
    for name, v in (verdicts or {}).items():
        out_verdicts.append(Verdict(name, bool(v.get("held")), v.get("what", ""),
                                    [{"detail": d, "calls": link_calls(d, calls, guest_lpids)}
                                     for d in v.get("violations", [])]))
    plan = record.get("plan", {}) or {}
    info.update(plan=plan, fault_detail=rec_f.get("detail", ""), injected=bool(rec_f.get("injected")),
                recovery_s=record.get("recovery_s"), outcomes=outcome, notes=notes,
                t0_iso=_iso(t_begin, kind))
    what = f"{plan.get('fault', '?')} during {plan.get('during', '?')}"
    if kind == "chaos":
        title = f"chaos run {record.get('run', '?')} · {what}"
    elif kind == "stack":
        title = info.get("title") or "a local stack's calls"
    else:
        title = f"sim seed {info.get('seed', '?')} · {what}"
    stats["calls"] = len(calls)
    return Model(kind=kind, title=title, source=source, t0=t_begin, duration=rel(t_end), lanes=list(lanes.values()),
                 calls=calls, faults=faults, verdicts=out_verdicts, info=info, stats=stats)


def _link_causes(calls: list[Call]) -> None:
    """Each call's cause: the call served under the span its traceparent names as parent
    (pefsim/tracing.py; the histories' ``span`` / ``parent``), so an abort's page-outs,
    UV_SVM_TERMINATE and resume point at the H_SVM_INIT_ABORT the HV was serving, even across a
    restart. A span's first served line stands for it (a stream's later batch lines share it)."""
    by_span: dict[str, int] = {}
    for c in calls:
        if c.args.get("span") and c.kind != "caller-only":
            by_span.setdefault(c.args["span"], c.id)
    for c in calls:
        parent = c.args.get("parent") or ""
        cause = by_span.get(parent)
        if cause is not None and cause != c.id:
            c.cause = cause
        elif parent:  # e.g. the H_SVM_INIT_ABORT of an HV killed before it answered: its recovery goes on in it
            c.args["caused by"] = f"span {parent}, a call that left no line (its server died before answering)"


def _iso(t: float, kind: str) -> str:
    import datetime

    stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return stamp + (" (virtual)" if kind == "sim" else "")

