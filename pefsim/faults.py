"""Fault hooks: failpoints (a `kill -9` or a stop at an exact place) and mutants (deliberate bugs).

Failpoints. ``--failpoint NAME[:N][@VM][=stop]`` on a service (or ``PEFSIM_FAILPOINTS=...,...``
in its environment) makes the process SIGKILL itself the N-th time (default: the first) it reaches
the named point (counting only for the VM named VM, if given), so the chaos harness can kill a
service between two exact steps of a protocol and check what the restarted service makes of it.
With ``=stop`` the process SIGSTOPs itself there instead: a breakpoint at which the harness
injects another fault (a partition, a pause, a UV crash) and then lets it go on with SIGCONT, so
that fault lands inside a window however short it is. With ``=lose`` (only at points right after
an answer arrived, LOSABLE) the process drops that answer as if the network had lost it and goes
on running: the caller takes the same path as for a transport failure. Unarmed points cost a
dictionary lookup.

In one process (services/local.py) a failpoint armed with ``=crash`` (``arm``) calls the crash
hook it was armed with (which cancels every task of the service, as a kill would) and raises
Crash where it is reached, so nothing after the point runs.

Mutants. ``PEFSIM_MUTANTS=name,...`` turns on deliberate bugs, each breaking one invariant the
chaos checkers test, so tests can show every checker catches a broken build. No mutant is on
unless named.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Callable

log = logging.getLogger("pefsim.faults")

POINTS = {
    "hv.esm.page_in": "the HV got UV_PAGE_IN's answer for an ESM page-in, before recording it",
    "hv.esm.init_done": "the HV recorded H_SVM_INIT_DONE, before answering it",
    "hv.abort.page_out": "the HV got a page back with UV_PAGE_OUT during an abort, before writing it",
    "hv.abort.before_terminate": "the abort paged everything out, before UV_SVM_TERMINATE",
    "hv.abort.before_resume": "UV_SVM_TERMINATE done, before the guest is resumed",
    "hv.secure.page_out": "the HV got UV_PAGE_OUT's answer for a secure page-out (H_SVM_PAGE_OUT, "
                          "a host touch), before writing the ciphertext",
    "hv.disk.before_rename": "the HV wrote and fsync'd a VM's new vm.json as a temporary, before renaming it "
                             "over the old one",
    "uv.esm.before_abort": "the UV decided to abort, before H_SVM_INIT_ABORT",
    "guest.before_esm": "the guest loaded its image, before its `sc 2` UV_ESM (with =stop: "
                        "`pefsim bench` starts many guests' ESMs and aborts at once)",
}

LOSABLE = {"hv.secure.page_out"}  # points whose caller treats reach() == True as a lost answer

MUTANTS = {
    "uv-abort-pageout-no-data": "UV_PAGE_OUT in SVM_ABORT answers U_SUCCESS without the page (the "
                                "open-source UV): the aborted guest's memory is garbage (invariant 1)",
    "uv-pageout-plaintext": "UV_PAGE_OUT after INIT_DONE hands the HV the plaintext (invariant 2)",
    "uv-terminate-keeps-pages": "UV_SVM_TERMINATE forgets the SVM but never frees its pages (invariant 3)",
    "hv-double-resume": "the HV resumes an aborted guest twice, the second time with a new token "
                        "(invariant 4)",
    "hv-abort-hangs": "the HV never finishes H_SVM_INIT_ABORT (invariant 5)",
    "uv-terminate-bad-rc": "UV_SVM_TERMINATE answers U_P2, not a result it can give (invariant 6)",
    "uv-hcalls-one-at-a-time": "the UV makes one hcall at a time for all its SVMs (a UV-wide lock around the "
                               "HV port): an HV silent for one SVM stalls every other SVM's ESM (held-svm-bounded)",
    "hv-create-vm-ignores-request-id": "CreateVm makes a new VM for a repeat with the same request id: a "
                                       "lost answer asked again leaves an orphan VM (no-orphan-vms)",
    "hv-init-done-unguarded": "H_SVM_INIT_DONE acts on the state checked before it took the VM's lock (the "
                              "check-then-act race issue 13 fixed): it can sweep a VM destroyed or made normal "
                              "meanwhile (invariant 3)",
    "uv-frees-at-abort": "the alternative argued on the list: the UV gives up an aborting SVM's pages when "
                         "it calls H_SVM_INIT_ABORT, not at UV_SVM_TERMINATE (invariant 1)",
    "uv-frees-on-page-out": "the UV frees each page of an aborting SVM once it handed it to the HV: an HV "
                            "that lost the page (killed, answer lost) cannot have it again (invariant 1)",
}

_counts: dict[str, int] = {}
_armed: dict[str, tuple[int, str, str]] = {}  # point -> (hit number, VM name or "", an ACTIONS key)
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "lose": None, "crash": None}
_crash_hooks: dict[str, Callable[[str], None]] = {}  # point -> what =crash calls (arm)


class Crash(BaseException):
    """Raised where a failpoint armed with ``=crash`` is reached: the in-process service crashed
    there (a BaseException, so no ``except Exception`` of the service's code catches it)."""
_mutants: set[str] = set()


def add_argument(ap) -> None:
    """A service's --failpoint option."""
    ap.add_argument("--failpoint", action="append", default=[], metavar="NAME[:N][@VM][=stop|=lose]",
                    help=f"SIGKILL (or stop) this process the N-th time it reaches NAME ({', '.join(POINTS)})")


def configure(failpoints: list[str] | None = None) -> None:
    """Arm failpoints from the command line and PEFSIM_FAILPOINTS; read PEFSIM_MUTANTS."""
    specs = list(failpoints or []) + [s for s in os.environ.get("PEFSIM_FAILPOINTS", "").split(",") if s]
    for spec in specs:
        _arm(spec)
    for name in filter(None, os.environ.get("PEFSIM_MUTANTS", "").split(",")):
        if name not in MUTANTS:
            raise SystemExit(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}")
        _mutants.add(name)
        log.warning("MUTANT ON: %s: %s", name, MUTANTS[name])


def _parse(spec: str) -> tuple[str, str, str, str]:
    """A failpoint spec NAME[:N][@VM][=ACTION] as (name, N, VM, ACTION), each "" when absent."""
    spec, _, action = spec.partition("=")
    spec, _, who = spec.partition("@")
    name, _, nth = spec.partition(":")
    return name, nth, who, action


def _arm(spec: str, in_process: bool = False) -> str:
    """Arm one failpoint spec NAME[:N][@VM][=ACTION]; returns its name. SystemExit on a bad one."""
    name, nth, who, action = _parse(spec)
    if name not in POINTS:
        raise SystemExit(f"unknown failpoint {name!r}; known: {', '.join(POINTS)}")
    if (action or "kill") not in ACTIONS:
        raise SystemExit(f"failpoint {name}: unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if action == "crash" and not in_process:
        raise SystemExit(f"failpoint {name}: =crash is for services run in one process (services/local.py)")
    if action == "lose" and name not in LOSABLE:
        raise SystemExit(f"failpoint {name}: no answer to lose there; =lose works at {', '.join(sorted(LOSABLE))}")
    nth = nth or "1"
    if not (nth.isascii() and nth.isdecimal()) or int(nth) < 1:
        raise SystemExit(f"failpoint {name}: the hit number must be a positive integer, not {nth!r}")
    _armed[name] = (int(nth), who, action or "kill")
    log.warning("failpoint armed: %s at hit %d%s (%s)", name, _armed[name][0], f" of {who}" if who else "",
                "the answer will be dropped" if action == "lose" else "the service will crash there"
                if action == "crash" else f"the process will {ACTIONS[_armed[name][2]].name} itself")
    return name


def arm(spec: str, on_crash: Callable[[str], None] | None = None) -> None:
    """Arm a failpoint in this process (tests, services/local.py); with ``=crash``, ``on_crash``
    is called with the point's name where it is reached, then Crash is raised there."""
    name = _arm(spec, in_process=True)
    _counts.pop(name, None)
    if on_crash is not None:
        _crash_hooks[name] = on_crash


def disarm(spec: str) -> None:
    """Disarm a failpoint, named or by the spec it was armed with (NAME[:N][@VM][=ACTION])."""
    name = _parse(spec)[0]
    _armed.pop(name, None)
    _counts.pop(name, None)
    _crash_hooks.pop(name, None)


def reach(name: str, who: str = "") -> bool:
    """Mark a failpoint (reached on behalf of VM ``who``); SIGKILL (or SIGSTOP) this process if
    it is armed for this hit. True if the answer just received must be dropped (``=lose``)."""
    if name not in _armed:
        return False
    nth, only, action = _armed[name]
    if only and only != who:
        return False
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != nth:
        return False
    log.warning("failpoint %s hit %d: %s", name, _counts[name],
                {"kill": "killing this process", "stop": "stopping until SIGCONT", "crash": "crashing the service",
                 "lose": "dropping the answer as if lost in transport"}[action])
    if action == "lose":
        return True
    if action == "crash":
        hook = _crash_hooks.get(name)
        if hook is not None:
            hook(name)
        raise Crash(name)
    if action == "kill":
        logging.shutdown()
    os.kill(os.getpid(), ACTIONS[action])
    return False


def operate(spec: str, clear: bool, service: str) -> str:
    """An operator's SetFailpoint on a running ``service`` ("uv", "hv"): arm ``spec`` (or, with
    ``clear``, disarm it), counting hits from now. Returns "" or why the spec is refused: an
    unknown point, one of another service, a bad hit number or action, or ``=crash`` (one process
    only)."""
    name = _parse(spec)[0]
    if not name.startswith(f"{service}."):
        mine = ", ".join(p for p in POINTS if p.startswith(f"{service}."))
        return f"{name!r} is not a failpoint of the {service.upper()}; its failpoints: {mine}"
    if clear:
        if name not in _armed:
            return f"{name} is not armed"
        disarm(spec)
        log.warning("failpoint disarmed by the operator: %s", name)
        return ""
    try:
        _arm(spec)
    except SystemExit as exc:  # _arm's one-line refusal, as a command line would print it
        return str(exc)
    _counts.pop(name, None)
    return ""


def armed_specs() -> list[str]:
    """Every armed failpoint as NAME:N[@VM]=ACTION (SetFailpoint's answer)."""
    return [f"{name}:{nth}{f'@{who}' if who else ''}={action}" for name, (nth, who, action) in sorted(_armed.items())]


def set_failpoint_call(service: str):
    """The SetFailpoint handler of a service's call table ("uv" or "hv")."""
    from pefsim.abi import Errno
    from pefsim.v1 import common_pb2

    async def set_failpoint(_svc, req, _caller):
        error = operate(req.spec, req.clear, service)
        return common_pb2.SetFailpointResponse(errno=Errno.EINVAL if error else Errno.OK, error=error,
                                               armed=armed_specs())
    return set_failpoint


def armed(name: str) -> bool:
    """Whether a failpoint is armed: code that moves pages in runs then takes them one by one,
    so the failpoint's hit count is still a page count."""
    return name in _armed


@contextlib.contextmanager
def mutants(names) -> None:
    """Turn on the named mutants for the block (in one process: the simulator, tests)."""
    unknown = set(names) - set(MUTANTS)
    if unknown:
        raise ValueError(f"unknown mutants {sorted(unknown)}; known: {', '.join(MUTANTS)}")
    before = set(_mutants)
    _mutants.update(names)
    try:
        yield
    finally:
        _mutants.clear()
        _mutants.update(before)


def mutant(name: str) -> bool:
    assert name in MUTANTS, name
    return name in _mutants
