"""Start-up of a capture (issue 11): what a run loads and starts before its first page."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmcap.entry import quiet_blas_threads


def test_blas_threads_default_to_one_and_the_user_keeps_a_choice():
    environ: dict[str, str] = {}
    quiet_blas_threads(environ)
    assert environ == {"OPENBLAS_NUM_THREADS": "1"}
    environ = {"OPENBLAS_NUM_THREADS": "4"}
    quiet_blas_threads(environ)
    assert environ == {"OPENBLAS_NUM_THREADS": "4"}


# The threads alive when a save ends: numpy's OpenBLAS would add one per extra CPU.
THREADS_AT_EXIT = """
import atexit, os, sys
atexit.register(lambda: print(len(os.listdir("/proc/self/task")), file=sys.__stdout__, flush=True))
from vmcap.entry import run
run(sys.argv[1:])
"""


def _openblas_spawns_threads() -> bool:
    code = "import numpy, os; print(len(os.listdir('/proc/self/task')))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return out.returncode == 0 and int(out.stdout) > 1


def test_a_save_starts_no_blas_threads(make_vmcore, tmp_path):
    if not _openblas_spawns_threads():
        pytest.skip("this numpy starts no BLAS threads here (one CPU, or no OpenBLAS)")
    src, _ = make_vmcore()
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", THREADS_AT_EXIT, "save", "-q", "--format", "kdump",
                          "--threads", "1", src, str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]
