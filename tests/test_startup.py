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


# The modules a run loaded, printed when it exits.
MODULES_AT_EXIT = """
import atexit, sys
atexit.register(lambda: print(" ".join(sorted(sys.modules)), file=sys.__stdout__, flush=True))
from vmcap.entry import run
run(sys.argv[1:])
"""

# What a kdump capture of an x86_64 dump does not need: the zelf and ELF writers and the
# thread pool, the other architectures' page-table walkers, click, the readers of files
# compressed whole (gzip) and the ELF view of dumps.
NOT_FOR_A_KDUMP_CAPTURE = ("vmcap.formats.seekable", "vmcap.formats.elfwriter", "concurrent.futures",
                           "vmcap.kernel.ppc64", "vmcap.kernel.riscv64", "vmcap.kernel.s390x", "click",
                           "vmcap.source.stream", "vmcap.source.elfview", "gzip")


def _modules_of_run(*argv) -> set[str]:
    out = subprocess.run([sys.executable, "-c", MODULES_AT_EXIT, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_kdump_capture_loads_only_what_it_uses(make_vmcore, tmp_path):
    src, _ = make_vmcore()
    loaded = _modules_of_run("makedumpfile", "-l", "--message-level", "0", "-d", "31", src,
                             str(tmp_path / "out"))
    assert "vmcap.formats.kdump" in loaded
    assert loaded.isdisjoint(NOT_FOR_A_KDUMP_CAPTURE), loaded & set(NOT_FOR_A_KDUMP_CAPTURE)


@pytest.mark.slow
def test_real_d31_capture_loads_only_what_it_uses(real_vmcore, tmp_path):
    """The real x86_64 dump at -d 31: struct pages are classified, through the x86_64 walker only."""
    loaded = _modules_of_run("makedumpfile", "-z", "--message-level", "0", "-d", "31", real_vmcore,
                             str(tmp_path / "out"))
    assert "vmcap.kernel.pageclass" in loaded and "vmcap.kernel.translate" in loaded
    assert loaded.isdisjoint(NOT_FOR_A_KDUMP_CAPTURE), loaded & set(NOT_FOR_A_KDUMP_CAPTURE)


def test_a_zelf_save_on_one_thread_starts_no_pool(make_vmcore, tmp_path):
    src, _ = make_vmcore()
    loaded = _modules_of_run("save", "-q", "--threads", "1", src, str(tmp_path / "out"))
    assert "vmcap.formats.seekable" in loaded
    assert "concurrent.futures" not in loaded


def test_the_default_window_is_1_mib_a_thread(make_vmcore, tmp_path):
    """A mapped window's pages are resident: one thread maps 1 MiB at a time (peak RSS),
    more threads up to 4 MiB (a kdump batch is 1 MiB a thread, filled without a copy)."""
    from click.testing import CliRunner

    from vmcap.commands import main as cli
    from vmcap.fileio.mmapio import FileSource, RecordingSource
    from vmcap.sample import RamRange
    from vmcap.save import SaveOptions, save

    from conftest import spec

    src, _ = make_vmcore(spec(ranges=(RamRange(0x100000, 12 << 20),), content="mixed"))
    for threads, window in ((1, 1 << 20), (3, 3 << 20), (8, 4 << 20)):
        recorder = RecordingSource(FileSource(src))
        save(src, str(tmp_path / f"out{threads}"), SaveOptions(output_format="kdump", threads=threads),
             source=recorder)
        assert max(c.length for c in recorder.calls if c.kind == "map") == window, threads
    assert SaveOptions().window_bytes is None
    assert "[default: 1M a thread, 4M at most]" in " ".join(CliRunner().invoke(cli, ["save", "--help"]).output.split())
