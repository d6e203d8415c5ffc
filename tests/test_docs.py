"""README.md, man/vmcap.1 and --help stay true for every command and flag."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmcap.cli import EXIT_CODES
from vmcap.commands import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAN = (ROOT / "man" / "vmcap.1").read_text()
# roff writes "-" as "\-"
MAN_TEXT = MAN.replace("\\-", "-")


def commands_and_flags():
    for name, command in main.commands.items():
        flags = []
        for param in command.params:
            flags.extend(opt for opt in param.opts if opt.startswith("--"))
        yield name, flags


@pytest.mark.parametrize("name,flags", list(commands_and_flags()))
def test_every_flag_is_documented_everywhere(name, flags):
    assert f"vmcap {name}" in README
    assert f".B vmcap {name}" in MAN  # in the SYNOPSIS
    assert f".B {name}\n" in MAN  # under COMMANDS
    help_text = CliRunner().invoke(main, [name, "--help"]).output
    for flag in flags:
        if flag == "--help":
            continue
        assert flag in help_text, (name, flag)
        assert re.search(re.escape(flag) + r"\b", README), f"README lacks {name} {flag}"
        assert re.search(re.escape(flag) + r"\b", MAN_TEXT), f"man page lacks {name} {flag}"


def test_exit_codes_are_documented():
    for code in sorted(set(EXIT_CODES.values())) + [0, 1, 2, 130]:
        assert f"| {code} |" in README
        assert f".B {code}\n" in MAN


@pytest.mark.skipif(not shutil.which("man"), reason="man not installed")
def test_man_page_renders_without_warnings():
    result = subprocess.run(["man", "--warnings", "-l", str(ROOT / "man" / "vmcap.1")],
                            capture_output=True, text=True, env={"MANWIDTH": "80",
                                                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    assert "EXIT STATUS" in result.stdout
    assert [line for line in result.stderr.splitlines() if "warning" in line] == []
