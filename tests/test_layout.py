"""Reading the source's headers: right values, exact reads only, clear errors."""

from __future__ import annotations

import os
import struct

import pytest

from vmcap.errors import BadSource
from vmcap.fileio.mmapio import FileSource, RecordingSource
from vmcap.sample import RamRange
from vmcap.source.layout import read_layout

from conftest import spec


def layout_of(path, **kwargs):
    with FileSource(path) as source:
        return read_layout(source, **kwargs)


@pytest.mark.parametrize("elf_class,byte_order,machine,page_size", [
    (64, "little", 62, 4096),      # x86_64
    (32, "big", 20, 4096),         # ppc (32-bit big endian)
    (64, "big", 22, 4096),         # s390x
    (64, "little", 183, 65536),    # aarch64 with 64 KiB pages
    (32, "little", 3, 4096),       # i386
])
def test_segments_notes_and_vmcoreinfo_match_what_was_written(
        make_vmcore, elf_class, byte_order, machine, page_size):
    ranges = [RamRange(0x10000 + 0x100, 3 * page_size), RamRange(0x100000, 2 * page_size + 8)]
    path, info = make_vmcore(spec(ranges, elf_class=elf_class, byte_order=byte_order,
                                  machine=machine, page_size=page_size, cpus=3))
    layout = layout_of(path)
    assert layout.elf_class == elf_class and layout.byte_order == byte_order
    assert layout.e_machine == machine
    assert layout.page_size == page_size and layout.page_size_origin == "vmcoreinfo"
    assert layout.cpus == 3
    assert layout.osrelease == "6.1.0-vmcap-sample"
    assert [(s.paddr, s.offset, s.filesz, s.memsz) for s in layout.segments] == \
        [(s.paddr, s.offset, s.filesz, s.memsz) for s in info.segments]


def test_page_size_falls_back_to_architecture_then_option(make_vmcore):
    path, _ = make_vmcore(spec(machine=21, elf_class=64, byte_order="big", vmcoreinfo={}))
    layout = layout_of(path)
    assert (layout.page_size, layout.page_size_origin) == (65536, "architecture default")
    assert layout.osrelease is None
    layout = layout_of(path, page_size=16384)
    assert (layout.page_size, layout.page_size_origin) == (16384, "option")


def test_header_parsing_reads_only_headers_and_notes(make_vmcore):
    """In /proc/vmcore the bytes after the notes may be MMIO: never read ahead."""
    path, info = make_vmcore(spec(phoff=192))
    source = RecordingSource(FileSource(path))
    layout = read_layout(source)
    ehdr_end = 64
    phdr_start, phdr_end = 192, 192 + 56 * (1 + len(info.segments))
    allowed = [(0, ehdr_end), (phdr_start, phdr_end),
               (info.notes_offset, info.notes_offset + info.notes_size)]
    assert source.calls, "expected some reads"
    for call in source.calls:
        assert call.kind == "pread"
        assert any(lo <= call.offset and call.offset + call.length <= hi
                   for lo, hi in allowed), call
    assert len(layout.segments) == len(info.segments)


# ------------------------------------------------------------------ bad input

def _write(tmp_path, data: bytes, name="bad"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _patched(path, tmp_path, offset, fmt, value):
    data = bytearray(open(path, "rb").read())
    struct.pack_into(fmt, data, offset, value)
    return _write(tmp_path, bytes(data), "patched")


def _phdr_offset(index: int) -> int:
    """File offset of PT_LOAD number `index` in a default (ELF64, phoff 64) sample."""
    return 64 + 56 * (1 + index)


@pytest.mark.parametrize("case,message", [
    ("empty", "not an ELF file"),
    ("text", "not an ELF file"),
    ("truncated header", "truncated ELF header"),
    ("exec", "not a core file"),
    ("phdrs beyond eof", "extends beyond end of file"),
    ("segment beyond eof", "beyond end of file"),
    ("filesz > memsz", "larger than p_memsz"),
    ("absurd phnum", "program header"),
    ("bad phentsize", "e_phentsize"),
    ("bad class", "ELF class"),
    ("no phdrs", "no program headers"),
])
def test_bad_sources_give_one_clear_error(make_vmcore, tmp_path, case, message):
    path, info = make_vmcore(spec())
    if case == "empty":
        path = _write(tmp_path, b"")
    elif case == "text":
        path = _write(tmp_path, b"this is not a vmcore\n" * 10)
    elif case == "truncated header":
        path = _write(tmp_path, open(path, "rb").read()[:40])
    elif case == "exec":
        path = _patched(path, tmp_path, 16, "<H", 2)
    elif case == "phdrs beyond eof":
        path = _write(tmp_path, open(path, "rb").read()[:64 + 56 * 2])
    elif case == "segment beyond eof":
        path = _write(tmp_path, open(path, "rb").read()[:info.segments[-1].offset + 10])
    elif case == "filesz > memsz":
        path = _patched(path, tmp_path, _phdr_offset(0) + 32, "<Q", 1 << 40)  # p_filesz
    elif case == "absurd phnum":
        path = _patched(path, tmp_path, 56, "<H", 0xfffe)
    elif case == "bad phentsize":
        path = _patched(path, tmp_path, 54, "<H", 40)
    elif case == "bad class":
        path = _patched(path, tmp_path, 4, "<B", 7)
    elif case == "no phdrs":
        path = _patched(path, tmp_path, 56, "<H", 0)
    with pytest.raises(BadSource) as error:
        layout_of(path)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_directory_and_missing_path(tmp_path):
    with pytest.raises(BadSource, match="is a directory"):
        FileSource(str(tmp_path))
    with pytest.raises(BadSource, match="cannot open"):
        FileSource(str(tmp_path / "nope"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_path(make_vmcore):
    path, _ = make_vmcore(spec())
    os.chmod(path, 0)
    with pytest.raises(BadSource, match="Permission denied"):
        FileSource(path)


def test_real_dump_layout(real_vmcore):
    layout = layout_of(real_vmcore)
    assert layout.e_phoff == 192
    assert (layout.arch, layout.elf_class, layout.byte_order) == ("x86_64", 64, "little")
    assert layout.cpus == 2 and layout.osrelease == "6.1.0-56-amd64"
    assert layout.page_size == 4096
    assert [(s.paddr, s.memsz) for s in layout.segments] == [
        (0x0, 0xa0000), (0xc0000, 0x20000000 - 0xc0000), (0xfd000000, 0x1000000),
        (0xfffc0000, 0x40000)]
    assert "SYMBOL(prb)" in layout.vmcoreinfo


@pytest.mark.parametrize("e_machine,name,arch", [
    (62, "EM_X86_64", "x86_64"), (183, "EM_AARCH64", "aarch64"), (22, "EM_S390", "s390x"),
    (243, "EM_RISCV", "riscv64"), (4, "EM_68K", "68k"), (0x1234, "4660", "4660"),
])
def test_machine_names_as_readelf_spells_them(make_vmcore, tmp_path, e_machine, name, arch):
    path, _ = make_vmcore(spec())
    layout = layout_of(_patched(path, tmp_path, 18, "<H", e_machine))
    assert (layout.e_machine, layout.machine, layout.arch) == (e_machine, name, arch)


def test_exec_file_names_its_type(make_vmcore, tmp_path):
    path, _ = make_vmcore(spec())
    with pytest.raises(BadSource, match=r"e_type is ET_EXEC, a vmcore is ET_CORE"):
        layout_of(_patched(path, tmp_path, 16, "<H", 2))


def test_makedumpfile_front_end_imports_no_click():
    """kdump scripts run `vmcap-makedumpfile` in the capture kernel: it goes through cli.py
    alone, without click (1.5 MiB, 11 ms) or rich."""
    import subprocess
    import sys
    code = ("import sys; sys.argv = ['vmcap-makedumpfile', '-v']\n"
            "from vmcap.entry import run_as_makedumpfile as run\n"
            "try:\n    run()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('click', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_capture_path_imports_no_pyelftools_or_openssl():
    """The ELF structures are vmcap's own (formats/elf.py): pyelftools cost 3 MiB and 17 ms of
    start-up in every capture, and is only a test oracle now; temporary names come from
    os.urandom, not secrets, whose hmac/hashlib load OpenSSL (3.4 MiB resident)."""
    import subprocess
    import sys
    code = ("import sys, vmcap.entry, vmcap.commands, vmcap.save, vmcap.kdumpsave, vmcap.verify, "
            "vmcap.kernel.dmesg, vmcap.makedumpfile_cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('elftools', 'hashlib', '_hashlib', '_ssl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
