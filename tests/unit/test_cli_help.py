"""Every command explains itself: `pefsim CMD --help` has a description, shows the defaults of
its options and ends with an example (issue 17, item 4)."""
from __future__ import annotations

import contextlib
import io

import pytest

from pefsim.ops import cli


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def _commands() -> list[str]:
    top = _help()
    return sorted(line.split()[0] for line in top.split("positional arguments:")[1].split("options:")[0]
                  .splitlines()[2:] if line.startswith("    ") and not line.startswith("     "))


def test_the_top_help_lists_the_commands_and_the_exit_codes():
    top = _help()
    assert "Exit codes: 0 ok, 1" in top
    assert {"demo", "up", "chaos", "sim", "failpoint", "guest", "restart"} <= set(_commands())


@pytest.mark.parametrize("cmd", ["demo", "up", "vm", "kill", "pause", "resume", "restart", "failpoint", "guest",
                                 "down", "status", "chaos", "sim", "bench", "certs", "keys", "blob"])
def test_each_command_has_a_description_defaults_and_an_example(cmd):
    text = _help(cmd)
    usage, _, rest = text.partition("\n\n")
    assert rest.split("\n")[0].strip() and not rest.startswith(("positional", "options")), text  # a description
    assert "\nexample:\n  pefsim " + cmd in text, text


def test_defaults_are_shown_once():
    text = _help("chaos")
    assert "--seed SEED" in text and "(default: 1)" in text  # an option whose help did not say it
    assert text.count("default") == len([line for line in text.splitlines() if "default" in line])  # never twice
