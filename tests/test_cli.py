"""The command line, through click's CliRunner and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from vmcap.commands import main
from vmcap.errors import SourceIOError

from conftest import env_without_debug, error_lines, spec, temp_outputs

INSPECT_KEYS = {"page_size", "elf_class", "byte_order", "machine", "cpus", "osrelease",
                "segments", "fractional_pages", "totals"}


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def run_subprocess(*args):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)],
                          capture_output=True, text=True, env=env_without_debug())


def test_inspect_json_schema(make_vmcore):
    path, info = make_vmcore(spec())
    result = run("inspect", "--json", path)
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert INSPECT_KEYS <= report.keys()
    assert report["elf_class"] == 64 and report["byte_order"] == "little"
    assert report["machine"] == "EM_X86_64" and report["cpus"] == 2
    assert set(report["totals"]) == {"memory", "mapped_bytes", "buffered_bytes",
                                     "zero_fill_bytes"}
    assert [s["paddr"] for s in report["segments"]] == [s.paddr for s in info.segments]
    assert set(report["segments"][0]) == {"index", "paddr", "vaddr", "offset", "filesz", "memsz"}
    page = report["fractional_pages"][0]
    assert {"paddr", "pieces"} <= page.keys()
    assert set(page["pieces"][0]) == {"segment", "paddr", "size", "offset"}


def test_inspect_fractional_lists_exactly_the_fractional_pages(make_vmcore):
    # Head/tail fractional segments, a sub-page segment, two RAM ranges in one page.
    path, _ = make_vmcore(spec())
    report = json.loads(run("inspect", "--json", path).output)
    assert [p["paddr"] for p in report["fractional_pages"]] == [
        0x9f000,    # 0x1000-0x9fbff ends mid-page
        0x300000,   # 0x300400-... starts mid-page
        0x400000,   # 0x400100-0x4002ff sub-page
        0x502000,   # ...-0x5027ff and 0x502800-... share a page
    ]
    shared = report["fractional_pages"][3]["pieces"]
    assert [(p["segment"], p["paddr"], p["size"]) for p in shared] == \
        [(4, 0x502000, 0x800), (5, 0x502800, 0x800)]
    text = run("inspect", "--fractional", path).output
    for paddr in ("0x9f000", "0x300000", "0x400000", "0x502000"):
        assert paddr in text
    assert "seg 4 0x502000-0x502800 (2048 B); seg 5 0x502800-0x503000 (2048 B)" in text


def test_inspect_segments_and_vmcoreinfo(make_vmcore):
    path, _ = make_vmcore(spec())
    result = run("inspect", "--segments", "--show-vmcoreinfo", path)
    assert result.exit_code == 0
    assert "0x300400" in result.output
    assert "OSRELEASE=6.1.0-vmcap-sample" in result.output


def test_save_verify_decompress(make_vmcore, tmp_path):
    path, _ = make_vmcore(spec(content="mixed"))
    out = tmp_path / "out.zelf"
    result = run("save", "--json", path, out)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("source", "output", "format", "bytes_read", "bytes_written", "ratio", "seconds",
                "mib_per_s", "mapped_bytes", "buffered_bytes", "fractional_pages",
                "mmap_fallbacks", "error_ranges"):
        assert key in summary
    assert summary["fractional_pages"] == 4
    result = run("verify", "--json", "--source", path, out)
    assert result.exit_code == 0
    assert json.loads(result.output)["status"] == "ok"
    plain = tmp_path / "plain.elf"
    assert run("decompress", out, plain).exit_code == 0
    report = json.loads(run("inspect", "--json", plain).output)
    assert len(report["segments"]) == 6
    # And the compressed output inspects the same.
    assert json.loads(run("inspect", "--json", out).output)["segments"] == report["segments"]


def test_quiet_prints_nothing(make_vmcore, tmp_path):
    path, _ = make_vmcore(spec())
    result = run_subprocess("save", "--quiet", path, tmp_path / "out")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_progress_lines_when_stderr_is_not_a_terminal(make_vmcore, tmp_path):
    """A console or the journal gets plain lines, not a bar: first and last of the phase."""
    path, _ = make_vmcore(spec())
    result = run_subprocess("save", path, tmp_path / "out")
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Copying data") and "[  0.0 %]" in lines[0]
    assert lines[-1].startswith("Copying data") and "[100.0 %]" in lines[-1]
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert "saved" in result.stdout
    none = run_subprocess("save", "--progress", "none", path, tmp_path / "out2")
    assert none.returncode == 0 and none.stderr == ""


def test_verify_detects_a_difference(make_vmcore, tmp_path):
    path, info = make_vmcore(spec())
    out = tmp_path / "out.elf"
    assert run("save", "--format", "elf", path, out).exit_code == 0
    other, _ = make_vmcore(spec(seed=1, content="mixed"))
    result = run_subprocess("verify", "--source", other, out)
    assert result.returncode == 7
    assert "differs" in result.stderr and len(error_lines(result.stderr)) == 1


@pytest.mark.parametrize("case,code,message", [
    ("not elf", 3, "not an ELF file"),
    ("missing", 3, "cannot open"),
    ("directory", 3, "is a directory"),
    ("output exists", 5, "already exists"),
    ("output dir missing", 5, "does not exist"),
    ("usage", 2, "expected [SRC...] OUT"),
])
def test_errors_are_one_line_with_documented_exit_codes(make_vmcore, tmp_path, case, code,
                                                        message):
    path, _ = make_vmcore(spec())
    out = tmp_path / "out"
    if case == "not elf":
        bad = tmp_path / "bad"
        bad.write_bytes(b"garbage" * 100)
        args = ["save", bad, out]
    elif case == "missing":
        args = ["inspect", tmp_path / "nope"]
    elif case == "directory":
        args = ["save", tmp_path, out]
    elif case == "output exists":
        out.write_bytes(b"x")
        args = ["save", path, out]
    elif case == "output dir missing":
        args = ["save", path, tmp_path / "no" / "out"]
    else:
        # Three or more paths are a --split set and OUT; none is a usage error.
        args = ["save"]
    result = run_subprocess(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if code != 2:
        assert len(error_lines(result.stderr)) == 1
        assert not temp_outputs(tmp_path)


def test_read_error_exit_code_and_on_error_zero(make_vmcore, tmp_path, monkeypatch):
    from vmcap.fileio.mmapio import FileSource, MmapRefused

    path, info = make_vmcore(spec())
    bad = info.segments[1].offset + 0x2000
    real = FileSource.pread_into

    def failing(self, buffer, offset):
        if offset <= bad < offset + len(buffer):
            raise SourceIOError(f"{self.name}: read error at file offset {offset:#x}: "
                                "Input/output error", offset=offset)
        return real(self, buffer, offset)

    def refuse(self, offset, length):
        raise MmapRefused("no")

    monkeypatch.setattr(FileSource, "pread_into", failing)
    monkeypatch.setattr(FileSource, "map", refuse)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["save", path, str(out)])
    assert result.exit_code == 4
    assert "cannot read physical address 0x102000" in result.output
    assert not out.exists() and not temp_outputs(tmp_path)
    result = CliRunner().invoke(main, ["save", "--on-error=zero", "--json", path, str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["error_ranges"] == [
        {"paddr": 0x102000, "length": 4096, "reason": "Input/output error"}]


def test_help_lists_every_command():
    result = run("--help")
    for command in ("inspect", "save", "verify", "decompress", "demo"):
        assert command in result.output


def test_demo_runs(tmp_path):
    result = run_subprocess("demo", "--dir", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert "fractional pages" in result.stdout
    assert "status" in result.stdout and "ok" in result.stdout
    assert os.path.exists(tmp_path / "demo" / "demo-vmcore.zelf")
    assert "non-RAM bytes touched    0" in result.stdout
    assert "fractional pages mapped  0" in result.stdout


def test_demo_audit_proves_the_fractional_rules(tmp_path):
    from vmcap.demo import build_and_save

    run, audit = build_and_save(str(tmp_path))
    assert audit.non_ram_bytes_touched == 0
    assert audit.fractional_pages_mapped == 0
    assert audit.fractional_pieces >= 4 and audit.pieces_read_once == audit.fractional_pieces
    assert audit.maps > 0 and run.summary.fractional_pages == 4


def test_progress_is_shown_when_stderr_is_a_terminal(make_vmcore, tmp_path):
    import pty

    from vmcap.sample import RamRange

    path, _ = make_vmcore(spec([RamRange(0x100000, 64 << 20)], content="mixed"))
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-m", "vmcap", "save", "--threads", "1", path,
                                    str(tmp_path / "out")], stdout=subprocess.PIPE,
                                   stderr=slave, env={**env_without_debug(), "COLUMNS": "100"})
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        stdout = process.communicate()[0]
    finally:
        os.close(master)
    assert process.returncode == 0
    assert b"Copying data" in seen and b"MiB/s" in seen  # bar with bytes and rate, binary units
    assert b"MB" not in seen
    assert b"Copying data" not in stdout  # progress never on stdout


@pytest.mark.parametrize("signal_number,name", [(2, "SIGINT"), (15, "SIGTERM")])
def test_interrupt_mid_copy_removes_the_partial_output(make_vmcore, tmp_path, signal_number, name):
    import signal
    import time

    from vmcap.sample import RamRange

    path, _ = make_vmcore(spec([RamRange(0x100000, 256 << 20)], content="mixed"))
    out = tmp_path / "out"
    # Slow on purpose (high level, one thread) so the signal lands mid-copy.
    process = subprocess.Popen([sys.executable, "-m", "vmcap", "save", "--level", "19",
                                "--threads", "1", "--progress", "none", path, str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env_without_debug())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = temp_outputs(tmp_path)
        if parts and (tmp_path / parts[0]).stat().st_size > 0:
            break
        time.sleep(0.02)
    assert temp_outputs(tmp_path), "save never started writing"
    process.send_signal(signal.Signals(signal_number))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (name, stderr)
    assert "interrupted" in stderr and stderr.count("\n") == 1
    assert not out.exists() and not temp_outputs(tmp_path)


def test_default_source_is_proc_vmcore(tmp_path):
    result = run_subprocess("save", tmp_path / "out")
    if os.path.exists("/proc/vmcore"):
        pytest.skip("this machine has a /proc/vmcore")
    assert result.returncode == 3
    assert "/proc/vmcore" in result.stderr and len(error_lines(result.stderr)) == 1


def test_dump_level_1_needs_no_vmcoreinfo(make_vmcore, tmp_path):
    path, _ = make_vmcore(spec(vmcoreinfo={}, content="mixed"))
    out = tmp_path / "out"
    result = run_subprocess("save", "-d", "1", "--json", path, out)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pages_excluded"]["zero"] > 0
    assert run_subprocess("verify", "--source", path, out).returncode == 0


@pytest.mark.parametrize("cpus, asked, used", [({0}, 0, 1), ({0, 1, 2}, 0, 3), ({0}, 2, 2)])
def test_threads_default_to_the_cpus_this_process_may_use(monkeypatch, make_vmcore, tmp_path, cpus, asked, used):
    """nr_cpus=1 or a taskset of one CPU means one thread (no pool), whatever os.cpu_count() says."""
    import vmcap.formats.seekable

    seen = []
    real_init = vmcap.formats.seekable.SeekableWriter.__init__

    def recording_init(self, sink, **kwargs):
        seen.append(kwargs["threads"])
        real_init(self, sink, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(vmcap.formats.seekable.SeekableWriter, "__init__", recording_init)
    src, _ = make_vmcore(spec())
    result = run("save", "-q", "--threads", asked, src, tmp_path / "out.zelf")
    assert result.exit_code == 0, result.output
    assert seen == [used]
