"""The distributions' exact collector command lines, with vmcap in makedumpfile's place.

Fedora/RHEL kdump-utils (dracut/99kdumpbase/kdump.sh) runs, for a disk target,
``$CORE_COLLECTOR /proc/vmcore DIR/vmcore-incomplete`` and renames the file to
``vmcore`` on exit 0; for ssh, ``$CORE_COLLECTOR -F /proc/vmcore | ssh host
"dd bs=512 of=DIR/vmcore-incomplete"``, kept as ``vmcore.flat``. Debian's
kdump-tools 1.8.1 (kdump-config) runs ``makedumpfile $MAKEDUMP_ARGS /proc/vmcore
| compress > dump-incomplete`` with -F added, then ``makedumpfile --dump-dmesg``.
Here the real dump stands in for /proc/vmcore, ssh is left out of the pipe
(dd writes locally), and the results are read by crash, drgn and makedumpfile
(after -R where they need it) and by vmcap directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmcap.fileio.mmapio import FileSource
from vmcap.source.layout import read_layout

from conftest import env_without_debug, have

try:
    import drgn
except ImportError:  # pragma: no cover - drgn is in the test extra
    drgn = None

PAGE = 4096
REAL_RELEASE = "6.1.0-56-amd64"
RHEL_COLLECTOR = "makedumpfile -l --message-level 7 -d 31"


@pytest.fixture(scope="module")
def collector_bin(tmp_path_factory) -> Path:
    """A PATH directory where `makedumpfile` and `vmcap-makedumpfile` are vmcap.

    What the README's dpkg-divert gives Debian: `makedumpfile` is a symlink to
    the installed console script (the real kdump-config run is in
    test_capture_kernel.py).
    """
    where = tmp_path_factory.mktemp("bin")
    script = shutil.which("vmcap-makedumpfile")
    if script is None:  # not installed as a console script: the same entry point
        script = where / "vmcap-makedumpfile"
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m vmcap makedumpfile \"$@\"\n")
        script.chmod(0o755)
    else:
        (where / "vmcap-makedumpfile").symlink_to(script)
    (where / "makedumpfile").symlink_to(script)
    return where


def sh(command: str, collector_bin: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = env_without_debug()
    env["PATH"] = f"{collector_bin}:{env['PATH']}"
    # /bin/sh: neither script sets pipefail (kdump-utils does only under bash).
    return subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def vmcap(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug(), timeout=600)


@pytest.fixture(scope="module")
def sample_pages(real_vmcore):
    """{paddr: source page} across every PT_LOAD of the real dump."""
    source = FileSource(real_vmcore)
    try:
        layout = read_layout(source)
        pages = {}
        for seg in layout.segments:
            first = -(-seg.paddr // PAGE) * PAGE
            last = (seg.paddr + seg.filesz) // PAGE * PAGE - PAGE
            for at in (first, first + (last - first) // 2 // PAGE * PAGE, last):
                pages[at] = source.pread(seg.offset + at - seg.paddr, PAGE)
    finally:
        source.close()
    return pages


def check_readers(kdump_file: Path, sample_pages, tmp_path: Path) -> None:
    """crash, drgn and makedumpfile read the rebuilt kdump file; so does vmcap."""
    if have("crash"):
        crash = subprocess.run(["crash", "--osrelease", str(kdump_file)], capture_output=True,
                               text=True, timeout=120)
        assert crash.stdout.split() == [REAL_RELEASE], crash.stdout + crash.stderr
    if drgn is not None:
        prog = drgn.Program()
        prog.set_core_dump(str(kdump_file))
        read = 0
        for paddr, expected in sample_pages.items():
            try:
                got = prog.read(paddr, PAGE, True)
            except drgn.FaultError:
                continue  # a page -d 31 excluded
            assert got == expected, f"drgn: page {paddr:#x} differs"
            read += 1
        assert read >= len(sample_pages) // 2
    log = tmp_path / f"{kdump_file.name}.mdf-dmesg"
    if have("makedumpfile"):
        result = subprocess.run(["makedumpfile", "--dump-dmesg", str(kdump_file), str(log)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert log.read_text() == vmcap("dmesg", kdump_file).stdout
    assert vmcap("verify", kdump_file).returncode == 0


@pytest.mark.slow
def test_rhel_disk_target(real_vmcore, collector_bin, sample_pages, tmp_path):
    dump_dir = tmp_path / "127.0.0.1-2026-11-30-04:00:00"
    dump_dir.mkdir()
    # kdump.sh: the collector, then sync and rename only on exit 0.
    result = sh(f"{RHEL_COLLECTOR} {real_vmcore} {dump_dir}/vmcore-incomplete > console.log "
                f"2>&1 && mv {dump_dir}/vmcore-incomplete {dump_dir}/vmcore", collector_bin,
                tmp_path)
    assert result.returncode == 0, (tmp_path / "console.log").read_text()
    assert sorted(os.listdir(dump_dir)) == ["vmcore"]
    console = (tmp_path / "console.log").read_text()
    assert "Copying data" in console and "Completed" in console
    assert (dump_dir / "vmcore").stat().st_mode & 0o777 == 0o600
    report = vmcap("inspect", "--json", dump_dir / "vmcore")
    assert '"compression": "lzo"' in report.stdout and '"dump_level": 31' in report.stdout
    check_readers(dump_dir / "vmcore", sample_pages, tmp_path)


@pytest.mark.slow
def test_rhel_ssh_target_flattened_stream(real_vmcore, collector_bin, sample_pages, tmp_path):
    flat = tmp_path / "vmcore-incomplete"
    # kdump.sh strips -F, then adds it back for ssh targets, and --num-threads=N
    # only when neither -F nor -E is there.
    result = sh(f"{RHEL_COLLECTOR} -F {real_vmcore} | dd bs=512 of={flat} 2>/dev/null",
                collector_bin, tmp_path)
    assert result.returncode == 0, result.stderr
    flat = flat.rename(tmp_path / "vmcore.flat")
    # vmcap reads the stream in place ...
    assert '"container": "kdump-flat"' in vmcap("inspect", "--json", flat).stdout
    assert vmcap("dmesg", flat).stdout == vmcap("dmesg", real_vmcore).stdout
    # ... and makedumpfile -R and vmcap's -R rebuild the same file.
    theirs, ours = tmp_path / "vmcore.mdf", tmp_path / "vmcore.vmcap"
    if have("makedumpfile"):
        with open(flat, "rb") as stream:
            rebuilt = subprocess.run(["makedumpfile", "-R", str(theirs)], stdin=stream,
                                     capture_output=True, text=True, timeout=300)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    result = sh(f"makedumpfile -R {ours} < {flat}", collector_bin, tmp_path)
    assert result.returncode == 0, result.stderr
    if theirs.exists():
        assert theirs.read_bytes() == ours.read_bytes()
    check_readers(ours, sample_pages, tmp_path)


@pytest.mark.slow
def test_rhel_extra_arguments_are_taken(real_vmcore, collector_bin, tmp_path):
    """kdumpctl checks the collector with --check-params; kdump.sh adds --num-threads=N."""
    result = sh(f"{RHEL_COLLECTOR} --check-params {real_vmcore} {tmp_path}/x", collector_bin,
                tmp_path)
    assert result.returncode == 0 and not (tmp_path / "x").exists(), result.stderr
    result = sh(f"vmcap-{RHEL_COLLECTOR} --num-threads=2 {real_vmcore} {tmp_path}/vmcore",
                collector_bin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert vmcap("verify", "--source", real_vmcore, tmp_path / "vmcore").returncode == 0


@pytest.mark.slow
def test_debian_kdump_tools_pipeline(real_vmcore, collector_bin, sample_pages, tmp_path):
    stamp = "202611300400"
    stamp_dir = tmp_path / stamp
    stamp_dir.mkdir()
    # kdump-config savecore with MAKEDUMP_ARGS="-c -d 31" (it adds -F) and
    # KDUMP_COMPRESSION=gzip, then the log.
    makedump_args = "-c -d 31 -F"
    result = sh(f"makedumpfile {makedump_args} {real_vmcore} | gzip > {stamp_dir}/dump-incomplete"
                f" && mv {stamp_dir}/dump-incomplete {stamp_dir}/dump.{stamp}.gz"
                f" && makedumpfile --dump-dmesg {real_vmcore} {stamp_dir}/dmesg.{stamp}",
                collector_bin, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(stamp_dir)) == [f"dmesg.{stamp}", f"dump.{stamp}.gz"]
    assert (stamp_dir / f"dmesg.{stamp}").read_text() == vmcap("dmesg", real_vmcore).stdout
    flat = tmp_path / "dump.flat"
    subprocess.run(f"gunzip -c {stamp_dir}/dump.{stamp}.gz > {flat}", shell=True, check=True)
    assert vmcap("dmesg", flat).stdout == vmcap("dmesg", real_vmcore).stdout
    assert vmcap("verify", flat).returncode == 0
    rebuilt = tmp_path / "vmcore"
    result = sh(f"makedumpfile -R {rebuilt} < {flat}", collector_bin, tmp_path)
    assert result.returncode == 0, result.stderr
    check_readers(rebuilt, sample_pages, tmp_path)


def test_the_collector_exit_status_is_lost_behind_compress_without_pipefail(
        collector_bin, tmp_path):
    """What kdump-config's pipeline does with a failing collector (documented)."""
    result = sh(f"makedumpfile -F -c -d 31 {tmp_path}/missing | gzip > {tmp_path}/dump",
                collector_bin, tmp_path)
    assert result.returncode == 0  # gzip's status
    assert "vmcap: error" in result.stderr
    # The stream is empty: vmcap wrote nothing to it before failing.
    assert subprocess.run(f"gunzip -c {tmp_path}/dump | wc -c", shell=True, capture_output=True,
                          text=True).stdout.strip() == "0"
