"""VMCOREINFO from a file (--vmcoreinfo FILE, makedumpfile -i) for dumps without the note."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from vmcap.fileio.mmapio import FileSource
from vmcap.formats.elf import iter_note_spans
from vmcap.source.dump import kernel_log, open_dump
from vmcap.source.layout import read_layout

from conftest import env_without_debug, have


def vmcap(*args):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug(), timeout=300)


@pytest.fixture(scope="module")
def noteless(real_vmcore, tmp_path_factory):
    """(copy of the real dump whose VMCOREINFO note is renamed away, the VMCOREINFO file)."""
    where = tmp_path_factory.mktemp("noteless")
    source = FileSource(real_vmcore)
    try:
        layout = read_layout(source)
    finally:
        source.close()
    text_file = where / "vmcoreinfo.txt"
    text_file.write_bytes(layout.vmcoreinfo_raw)
    copy = where / "vmcore"
    shutil.copyfile(real_vmcore, copy)
    # Rename the note ("VMCOREINFO" -> "VMCOREINFX"), as if the kernel had not
    # written one (QEMU's ppc64 and s390x dumps have none).
    note_offset = next(seg_offset for seg_offset in _pt_note_offsets(real_vmcore))
    spans = [s for s in iter_note_spans(layout.note_bytes, layout.byte_order)
             if s.name == "VMCOREINFO"]
    name_at = note_offset + spans[0].offset + 12
    with open(copy, "r+b") as f:
        f.seek(name_at)
        assert f.read(10) == b"VMCOREINFO"
        f.seek(name_at + 9)
        f.write(b"X")
    return copy, text_file


def _pt_note_offsets(path):
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(phnum):
        p_type, _, p_offset = struct.unpack_from("<IIQ", head, phoff + i * phentsize)
        if p_type == 4:
            yield p_offset


def test_a_dump_without_the_note_needs_the_file(noteless):
    copy, text_file = noteless
    assert vmcap("dmesg", copy).returncode == 8
    report = json.loads(vmcap("inspect", "--json", copy).stdout)
    assert report["osrelease"] is None and report["page_size_origin"] == "architecture default"
    report = json.loads(vmcap("inspect", "--json", "--vmcoreinfo", text_file, copy).stdout)
    assert report["osrelease"] == "6.1.0-56-amd64" and report["page_size_origin"] == "vmcoreinfo"


def test_dmesg_with_the_file_equals_the_dump_with_its_note(noteless, real_vmcore):
    copy, text_file = noteless
    with open_dump(real_vmcore) as dump:
        expected = kernel_log(dump)
    result = vmcap("dmesg", "--vmcoreinfo", text_file, copy)
    assert result.returncode == 0, result.stderr
    original = vmcap("dmesg", real_vmcore)
    assert result.stdout == original.stdout and len(expected) > 400


def test_save_with_the_file_filters_and_the_output_carries_it(noteless, real_vmcore, tmp_path):
    copy, text_file = noteless
    out = tmp_path / "out.kdump"
    result = vmcap("save", "--json", "--format", "kdump", "-d", "31", "--vmcoreinfo", text_file,
                   copy, out)
    assert result.returncode == 0, result.stderr
    with_file = json.loads(result.stdout)["pages_excluded"]
    reference = json.loads(vmcap("save", "--json", "--format", "kdump", "-d", "31", real_vmcore,
                                 tmp_path / "ref.kdump").stdout)["pages_excluded"]
    assert with_file == reference
    # The output holds the VMCOREINFO: readers need no file any more.
    assert vmcap("dmesg", out).stdout == vmcap("dmesg", real_vmcore).stdout
    report = json.loads(vmcap("inspect", "--json", out).stdout)
    assert report["osrelease"] == "6.1.0-56-amd64"
    # verify --source classifies the note-less source with the VMCOREINFO the dump carries.
    checked = vmcap("verify", "--json", "--source", copy, out)
    assert checked.returncode == 0, checked.stderr
    if have("crash"):
        crash = subprocess.run(["crash", "--osrelease", str(out)], capture_output=True,
                               text=True, timeout=120)
        assert crash.stdout.strip() == "6.1.0-56-amd64"


def test_zelf_output_carries_the_file_in_its_notes(noteless, tmp_path):
    copy, text_file = noteless
    out = tmp_path / "out.zelf"
    assert vmcap("save", "--quiet", "-d", "1", "--vmcoreinfo", text_file, copy,
                 out).returncode == 0
    report = json.loads(vmcap("inspect", "--json", out).stdout)
    assert report["osrelease"] == "6.1.0-56-amd64"
    assert [n["name"] for n in report["notes"]].count("VMCOREINFO") == 1


def test_makedumpfile_front_end_takes_i(noteless, real_vmcore, tmp_path):
    copy, text_file = noteless
    log = tmp_path / "dmesg.txt"
    result = vmcap("makedumpfile", "--dump-dmesg", "-i", text_file, copy, log)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == vmcap("dmesg", real_vmcore).stdout
    out = tmp_path / "out.lzo"
    result = vmcap("makedumpfile", "-l", "-d", "31", "--message-level", "4", "-i", text_file,
                   copy, out)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("content,message", [
    (b"", "not a VMCOREINFO file"),
    (b"\x7fELF\x02\x01\x01" + bytes(100), "not a VMCOREINFO file"),
    (b"hello world\n", "not a VMCOREINFO file"),
])
def test_a_file_that_is_not_vmcoreinfo_is_a_bad_source(make_vmcore, tmp_path, content, message):
    src, _ = make_vmcore()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    for args in (["inspect"], ["dmesg"], ["save", "-d", "1"]):
        extra = [tmp_path / "out"] if args[0] == "save" else []
        result = vmcap(*args, "--vmcoreinfo", bad, src, *extra)
        assert result.returncode == 3, result.stderr
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_file_cannot_be_the_output(make_vmcore, tmp_path):
    src, _ = make_vmcore()
    info = tmp_path / "info"
    info.write_bytes(b"OSRELEASE=6.1.0\nPAGESIZE=4096\n")
    result = vmcap("save", "--force", "--vmcoreinfo", info, src, info)
    assert result.returncode == 5 and "same file" in result.stderr
    assert info.read_bytes() == b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
