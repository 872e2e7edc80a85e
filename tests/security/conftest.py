"""The hostile suite: prints one summary line (cases run, cases held)."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    ran = held = 0
    for status in ("passed", "failed", "error"):
        for rep in terminalreporter.getreports(status):
            if "tests/security/" in rep.nodeid and rep.when == "call":
                ran += 1
                held += status == "passed"
    if ran:
        terminalreporter.write_line(f"hostile HV / hostile guest suite: {ran} cases run, {held} held")
