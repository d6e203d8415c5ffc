"""Never lose a dump that cannot be taken again (issue 9 item 5).

A full disk, a write error or the size limit part-way through keeps what was
written as a readable dump flagged incomplete (exit 5, one line saying where
and how much); a dump level list retries at the next level; a dump level
needing kernel knowledge vmcap lacks falls back to level 1 with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from vmcap.errors import OutputError
from vmcap.formats.kdump import DUMP_DH_COMPRESSED_INCOMPLETE, KdumpReader
from vmcap.sample import RamRange, expected_bytes
from vmcap.save import SaveOptions, save
from vmcap.source.dump import open_dump

from conftest import env_without_debug, error_lines, small_tmpfs, spec, temp_outputs

try:
    import drgn
except ImportError:  # pragma: no cover
    drgn = None

FORMATS = ("zelf", "elf", "kdump", "kdump-flat")
MEMORY = 16 << 20
# Incompressible halves: 16 MiB of memory needs ~8 MiB of output.
SAMPLE = spec([RamRange(0x100000, MEMORY)], content="mixed")


def vmcap(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug(), **kwargs)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real full disk."""
    with small_tmpfs(tmp_path / "small", "3m") as mount_point:
        yield mount_point


def incomplete_report(path) -> dict:
    result = vmcap("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["incomplete"]


def assert_present_pages_read_back(path, saved_end: int) -> None:
    """Every page below where the data stops reads as the source had it."""
    with open_dump(str(path)) as dump:
        for paddr in range(0x100000, saved_end - 0x1000, 0x3000):
            assert dump.physical.read(paddr, 0x1000) == expected_bytes(SAMPLE, paddr, 0x1000), \
                hex(paddr)


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_keeps_a_flagged_incomplete_dump(make_vmcore, small_disk, fmt):
    src, _ = make_vmcore(SAMPLE)
    out = small_disk / "vmcore"
    result = vmcap("save", "--format", fmt, "--frame-size", "64K", src, out)
    assert result.returncode == 5, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert f"INCOMPLETE dump in {out}" in lines[0] and "bytes of memory" in lines[0]
    # Kept under OUT's own name, no temporary file left behind.
    assert sorted(p.name for p in small_disk.iterdir()) == ["vmcore"]
    info = incomplete_report(out)
    assert 0 < info["saved_bytes"] < info["memory_bytes"] <= MEMORY
    assert f"{info['saved_bytes']} of {info['memory_bytes']} bytes" in lines[0]
    text = vmcap("inspect", out)
    assert text.returncode == 0 and "INCOMPLETE" in text.stdout
    assert_present_pages_read_back(out, info["data_end_paddr"])
    if fmt == "kdump":
        with KdumpReader(str(out)) as reader:
            assert reader.header.status & DUMP_DH_COMPRESSED_INCOMPLETE
            present, dumped = reader.page_counts()
            # The 1st bitmap keeps all RAM; pages never written are simply not dumped.
            assert present == MEMORY // 0x1000 and 0 < dumped < present
            assert reader.read_page((info["data_end_paddr"] >> 12) + 1) is None
    # verify says what it is, in one line, and does not crash.
    checked = vmcap("verify", out)
    assert checked.returncode == 6, checked.stderr
    assert len(error_lines(checked.stderr)) == 1 and "incomplete" in checked.stderr.lower()


def test_crash_opens_an_incomplete_kdump(make_vmcore, small_disk):
    src, _ = make_vmcore(SAMPLE)
    out = small_disk / "vmcore"
    assert vmcap("save", "--format", "kdump", src, out).returncode == 5
    release = json.loads(vmcap("inspect", "--json", src).stdout)["osrelease"]
    result = subprocess.run(["crash", "--osrelease", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == release, result


@pytest.mark.skipif(drgn is None, reason="drgn is not installed")
@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_drgn_reads_the_pages_that_are_there(make_vmcore, small_disk, fmt):
    src, _ = make_vmcore(SAMPLE)
    out = small_disk / "vmcore"
    assert vmcap("save", "--format", fmt, src, out).returncode == 5
    end = incomplete_report(out)["data_end_paddr"]
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    for paddr in (0x100000, 0x100000 + (end - 0x100000) // 2, end - 0x2000):
        paddr &= ~0xFFF
        assert prog.read(paddr, 0x1000, True) == expected_bytes(SAMPLE, paddr, 0x1000)
    # Past the cut: missing, not made up.
    far = 0x100000 + MEMORY - 0x1000
    try:
        assert prog.read(far, 0x1000, True) == bytes(0x1000)
    except drgn.FaultError:
        pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_size_limit_keeps_an_incomplete_dump_at_the_limit(make_vmcore, tmp_path, fmt):
    src, _ = make_vmcore(SAMPLE)
    out = tmp_path / "vmcore"
    result = vmcap("save", "--format", fmt, "--frame-size", "64K", "--size-limit", "2M", src, out)
    assert result.returncode == 5, result.stderr
    assert "size limit" in result.stderr and "INCOMPLETE" in result.stderr
    assert out.stat().st_size <= 2 << 20 and not temp_outputs(tmp_path)
    info = incomplete_report(out)
    assert 0 < info["saved_bytes"] < info["memory_bytes"]
    assert_present_pages_read_back(out, info["data_end_paddr"])


def test_dump_level_list_retries_when_the_output_does_not_fit(make_vmcore, tmp_path):
    # Zero pages make the difference: at level 0 the plain ELF is 16 MiB long, at 1 nothing.
    src, _ = make_vmcore(spec([RamRange(0x100000, MEMORY)], content="zero"))
    out = tmp_path / "vmcore"
    result = vmcap("save", "--json", "--format", "elf", "-d", "0,1", "--size-limit", "12M",
                   src, out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dump_level"] == 1
    assert any("dump level 0 did not fit" in w for w in summary["warnings"])
    assert out.stat().st_size <= 12 << 20 and not temp_outputs(tmp_path)
    assert "incomplete" not in json.loads(vmcap("inspect", "--json", out).stdout)
    assert vmcap("verify", out, "--source", src).returncode == 0
    # Without the list, the same limit keeps a flagged incomplete dump.
    result = vmcap("save", "--format", "elf", "--size-limit", "12M", src, tmp_path / "cut")
    assert result.returncode == 5 and "INCOMPLETE" in result.stderr


def test_makedumpfile_level_list_and_size_limit(make_vmcore, tmp_path):
    zeros, _ = make_vmcore(spec([RamRange(0x100000, MEMORY)], content="zero"))
    out = tmp_path / "dumpfile"
    result = vmcap("makedumpfile", "-E", "-d", "0,1", "-L", str(12 << 20), zeros, out)
    assert result.returncode == 0, result.stderr
    assert "dump level 0 did not fit" in result.stderr
    assert out.stat().st_size <= 12 << 20
    # The last level does not fit either: the incomplete dump is kept, exit 5.
    src, _ = make_vmcore(SAMPLE)
    small = tmp_path / "small"
    result = vmcap("makedumpfile", "-z", "-d", "0,1", "-L", str(2 << 20), src, small)
    assert result.returncode == 5, result.stderr
    with KdumpReader(str(small)) as reader:
        assert reader.header.status & DUMP_DH_COMPRESSED_INCOMPLETE
        assert reader.header.dump_level == 1


@pytest.fixture
def disk_24m(tmp_path):
    with small_tmpfs(tmp_path / "disk", "24m") as mount_point:
        yield mount_point


def test_real_dump_level_list_fits_a_full_disk_at_31(real_vmcore, disk_24m):
    out = disk_24m / "vmcore"
    # Level 1 of the 528 MiB real dump does not fit 24 MiB as kdump; 31 does.
    result = vmcap("save", "--json", "--format", "kdump", "-d", "1,31", real_vmcore, out)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dump_level"] == 31
    assert sorted(p.name for p in disk_24m.iterdir()) == ["vmcore"]
    with KdumpReader(str(out)) as reader:
        assert reader.header.dump_level == 31
        assert not reader.header.status & DUMP_DH_COMPRESSED_INCOMPLETE
    assert "sysrq triggered crash" in vmcap("dmesg", out).stdout


def test_dmesg_reads_an_incomplete_real_dump(real_vmcore, tmp_path):
    out = tmp_path / "vmcore"
    with pytest.raises(OutputError, match="INCOMPLETE"):
        save(real_vmcore, str(out), SaveOptions(output_format="kdump", dump_level=31,
                                                size_limit=8 << 20))
    result = vmcap("dmesg", out)
    # The log lives low in memory here; whatever is missing must not crash dmesg.
    assert result.returncode in (0, 3), result.stderr
    assert "Traceback" not in result.stderr and len(error_lines(result.stderr)) <= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_error_mid_copy_keeps_what_was_written(make_vmcore, tmp_path, monkeypatch, fmt):
    """EIO once, part-way (a real device cannot be made to do it on demand)."""
    src, _ = make_vmcore(SAMPLE)
    out = tmp_path / "vmcore"
    module = "vmcap.formats.kdump.os.pwrite" if fmt == "kdump" else "vmcap.fileio.output.os.write"
    real = os.pwrite if fmt == "kdump" else os.write
    state = {"bytes": 0, "failed": False}

    def failing(*args):
        if not state["failed"] and state["bytes"] > 3 << 20:
            state["failed"] = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        n = real(*args)
        state["bytes"] += n
        return n

    monkeypatch.setattr(module, failing)
    with pytest.raises(OutputError, match="Input/output error.*INCOMPLETE"):
        save(src, str(out), SaveOptions(output_format=fmt, frame_bytes=64 << 10, threads=1))
    assert state["failed"] and not temp_outputs(tmp_path)
    info = incomplete_report(out)
    assert 0 < info["saved_bytes"] < info["memory_bytes"]
    assert_present_pages_read_back(out, info["data_end_paddr"])


def test_nothing_written_leaves_nothing(make_vmcore, tmp_path):
    src, _ = make_vmcore(SAMPLE)
    out = tmp_path / "vmcore"
    # 1 MiB cannot hold the first batch of kdump pages (1 MiB a thread, so 4 MiB for four
    # threads): no memory, no file.
    result = vmcap("save", "--format", "kdump", "--threads", "4", "--size-limit", "1M", src, out)
    assert result.returncode == 5 and "size limit" in result.stderr
    assert "INCOMPLETE" not in result.stderr
    assert not out.exists() and not temp_outputs(tmp_path)
