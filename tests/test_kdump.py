"""kdump-compressed writer and reader: round trips, layout checks, and crash / drgn as oracles."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcap.errors import BadSource, CorruptOutput
from vmcap.formats.kdump import (
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    KdumpHeaderInfo,
    KdumpReader,
    KdumpWriter,
    is_kdump,
)
from vmcap.kernel.arch import EM_386, EM_AARCH64, EM_PPC64, EM_S390, EM_X86_64, make_platform

PAGE = 4096
RELEASE = "6.1.0-vmcap-test"
CRASH_TIME = 1_700_000_000
PHYS_BASE = 0x1000000
NT_PRSTATUS = 1
PRSTATUS_BYTES_X86_64 = 336  # sizeof(struct elf_prstatus) on x86_64

# What drgn (through libkdumpfile) needs before it reads a kdump: OSRELEASE,
# PAGESIZE, SYMBOL(swapper_pg_dir), and on x86_64 a way to tell 4- from
# 5-level paging (NUMBER(pgtable_l5_enabled), as 4.17+ kernels write it).
VMCOREINFO = (
    f"OSRELEASE={RELEASE}\n"
    f"PAGESIZE={PAGE}\n"
    "SYMBOL(swapper_pg_dir)=ffffffff82a0c000\n"
    f"NUMBER(phys_base)={PHYS_BASE}\n"
    "NUMBER(pgtable_l5_enabled)=0\n"
    "KERNELOFFSET=0\n"
    f"CRASHTIME={CRASH_TIME}\n"
).encode()


def elf_note(name: bytes, note_type: int, desc: bytes, byte_order: str = "little") -> bytes:
    name_z = name + b"\0"
    fmt = "<III" if byte_order == "little" else ">III"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack(fmt, len(name_z), len(desc), note_type) + pad(name_z) + pad(desc)


def notes_like_proc_vmcore(nr_cpus: int = 1) -> bytes:
    """Merged PT_NOTE bytes as /proc/vmcore has them: per-CPU NT_PRSTATUS, then VMCOREINFO."""
    prstatus = b"".join(elf_note(b"CORE", NT_PRSTATUS, bytes(PRSTATUS_BYTES_X86_64)) for _ in range(nr_cpus))
    return prstatus + elf_note(b"VMCOREINFO", 0, VMCOREINFO)


def x86_64_info(nr_cpus: int = 1, **overrides) -> KdumpHeaderInfo:
    fields = dict(machine="x86_64", elf_class=64, byte_order="little", page_size=PAGE, release=RELEASE,
                  nr_cpus=nr_cpus, vmcoreinfo=VMCOREINFO, notes=notes_like_proc_vmcore(nr_cpus),
                  crash_time=CRASH_TIME)
    fields.update(overrides)
    return KdumpHeaderInfo(**fields)


def text_page(rng: np.random.Generator, page_size: int = PAGE) -> np.ndarray:
    words = [b"task_struct ", b"0xffff888012345678 ", b"mutex_lock ", b"\n", b"page ", b"irq "]
    text = b"".join(words[i] for i in rng.integers(0, len(words), size=page_size // 4))
    return np.frombuffer(text[:page_size], dtype=np.uint8)


def mixed_pages(count: int, seed: int = 0, page_size: int = PAGE) -> np.ndarray:
    """Every 4th page zero, every 4th random (incompressible), the rest text."""
    rng = np.random.default_rng(seed)
    pages = np.zeros((count, page_size), dtype=np.uint8)
    for i in range(count):
        if i % 4 == 1:
            pages[i] = rng.integers(0, 256, size=page_size, dtype=np.uint8)
        elif i % 4 in (2, 3):
            pages[i] = text_page(rng, page_size)
    return pages


def write_kdump(path: Path, info: KdumpHeaderInfo, calls, **writer_options):
    """calls: (first pfn, pages array) in order; returns the writer's stats."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = KdumpWriter(fd, info, **writer_options)
        for pfn, pages in calls:
            writer.write_pages(pfn, memoryview(np.ascontiguousarray(pages)).cast("B"))
        return writer.close()
    finally:
        os.close(fd)


def descriptor_table(path: Path) -> np.ndarray:
    """The page_desc table, located from the header fields alone (not through KdumpReader)."""
    raw = path.read_bytes()
    block_size, sub_hdr_size, bitmap_blocks = struct.unpack_from("<iiI", raw, 428)
    bitmap = np.frombuffer(raw, dtype=np.uint8, count=bitmap_blocks * block_size // 2,
                           offset=(1 + sub_hdr_size) * block_size + bitmap_blocks * block_size // 2)
    dumped = int(np.unpackbits(bitmap).sum())
    dtype = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])
    return np.frombuffer(raw, dtype=dtype, count=dumped,
                         offset=(1 + sub_hdr_size + bitmap_blocks) * block_size)


# Three runs with holes between them, written in calls of 1, 3, 1500 and 700
# pages: single pages are staged, 1500 crosses a 1024-page batch boundary.
def gapped_calls(pages: np.ndarray):
    return [(3, pages[0:1]), (10, pages[1:4]), (100, pages[4:1504]), (1604, pages[1504:2204])]


GAPPED_PFNS = [3, 10, 11, 12] + list(range(100, 1600)) + list(range(1604, 2304))
GAPPED_MAX_MAPNR = 2400


@pytest.mark.parametrize("compress", ["zstd", "zlib", "none"])
def test_round_trip_with_gaps(tmp_path, compress):
    pages = mixed_pages(len(GAPPED_PFNS))
    path = tmp_path / f"gaps.{compress}.kdump"
    stats = write_kdump(path, x86_64_info(), gapped_calls(pages), max_mapnr=GAPPED_MAX_MAPNR,
                        compress=compress, threads=2)
    assert stats.pages_present == stats.pages_dumped == len(GAPPED_PFNS)
    assert stats.file_bytes == path.stat().st_size

    with KdumpReader(path) as reader:
        h = reader.header
        assert (h.header_version, h.machine, h.release, h.page_size) == (6, "x86_64", RELEASE, PAGE)
        assert (h.max_mapnr, h.nr_cpus, h.compression, h.dump_level) == (GAPPED_MAX_MAPNR, 1, compress, 0)
        assert (h.crash_time, h.phys_base, h.elf_class, h.byte_order) == (CRASH_TIME, PHYS_BASE, 64, "little")
        assert reader.vmcoreinfo == VMCOREINFO
        assert reader.notes == notes_like_proc_vmcore()
        assert reader.page_counts() == (len(GAPPED_PFNS), len(GAPPED_PFNS))
        assert list(reader.iter_dumped_runs()) == [(3, 1), (10, 3), (100, 1500), (1604, 700)]
        expected = dict(zip(GAPPED_PFNS, pages))
        for pfn in range(GAPPED_MAX_MAPNR):
            if pfn in expected:
                assert reader.read_page(pfn) == expected[pfn].tobytes(), pfn
            else:
                assert not reader.is_dumped(pfn) and reader.read_page(pfn) is None


@pytest.mark.parametrize("page_size", [64 << 10, 1 << 20])
def test_big_pages_every_page_reaches_the_file(tmp_path, page_size):
    """With big pages a staging batch holds fewer pages than a chunk below DIRECT_MIN_PAGES
    (1 MiB a thread: 16 pages of 64 KiB, one of 1 MiB): every page of such a chunk is still
    staged and stored, none dropped (ppc64's 64 KiB pages lost 4 of 36 before)."""
    pages = mixed_pages(1 + 36 + 70 + 5, page_size=page_size)
    calls = [(0, pages[0:1]), (1, pages[1:37]), (40, pages[37:107]), (200, pages[107:112])]
    pfns = [0] + list(range(1, 37)) + list(range(40, 110)) + list(range(200, 205))
    path = tmp_path / "big.kdump"
    stats = write_kdump(path, x86_64_info(page_size=page_size), calls, max_mapnr=256,
                        compress="zstd", threads=1)
    assert stats.pages_present == stats.pages_dumped == len(pfns)
    with KdumpReader(path) as reader:
        for pfn, page in zip(pfns, pages):
            assert reader.read_page(pfn) == page.tobytes(), pfn


def test_zero_pages_share_one_stored_copy(tmp_path):
    pages = mixed_pages(64)
    path = tmp_path / "shared-zero.kdump"
    stats = write_kdump(path, x86_64_info(), [(256, pages)], max_mapnr=512, compress="zstd")
    zero_rows = [i for i in range(64) if not pages[i].any()]
    assert stats.zero_pages_shared == len(zero_rows) == 16
    assert stats.zero_pages_excluded == 0 and stats.pages_dumped == 64

    table = descriptor_table(path)
    zero_offsets = {int(table[i]["offset"]) for i in zero_rows}
    assert len(zero_offsets) == 1  # one data copy, many descriptors
    zero_offset = zero_offsets.pop()
    assert all(int(table[i]["size"]) == PAGE and int(table[i]["flags"]) == 0 for i in zero_rows)
    assert path.read_bytes()[zero_offset:zero_offset + PAGE] == bytes(PAGE)
    with KdumpReader(path) as reader:
        assert all(reader.read_page(256 + i) == bytes(PAGE) for i in zero_rows)


def test_exclude_zero_clears_zero_pages_from_dumped_bitmap(tmp_path):
    pages = mixed_pages(64)
    path = tmp_path / "exclude-zero.kdump"
    stats = write_kdump(path, x86_64_info(), [(256, pages)], max_mapnr=512, exclude_zero=True)
    assert (stats.pages_present, stats.pages_dumped, stats.zero_pages_excluded) == (64, 48, 16)
    with KdumpReader(path) as reader:
        assert reader.header.dump_level == 1
        assert reader.page_counts() == (64, 48)
        for i in range(64):
            assert reader.is_present(256 + i)
            if pages[i].any():
                assert reader.read_page(256 + i) == pages[i].tobytes()
            else:
                assert not reader.is_dumped(256 + i) and reader.read_page(256 + i) is None
        assert reader.pread_physical(256 * PAGE, 64 * PAGE) == pages.tobytes()


@pytest.mark.parametrize("compress, flag", [("zstd", DUMP_DH_COMPRESSED_ZSTD), ("zlib", DUMP_DH_COMPRESSED_ZLIB)])
def test_incompressible_page_stored_raw(tmp_path, compress, flag):
    rng = np.random.default_rng(7)
    pages = np.stack([rng.integers(0, 256, size=PAGE, dtype=np.uint8), text_page(rng)])
    path = tmp_path / "raw.kdump"
    stats = write_kdump(path, x86_64_info(), [(0, pages)], max_mapnr=2, compress=compress, exclude_zero=True)
    assert stats.pages_stored_raw == 1
    table = descriptor_table(path)
    assert (int(table[0]["size"]), int(table[0]["flags"])) == (PAGE, 0)
    assert int(table[1]["size"]) < PAGE and int(table[1]["flags"]) == flag
    raw = path.read_bytes()
    assert raw[int(table[0]["offset"]):int(table[0]["offset"]) + PAGE] == pages[0].tobytes()
    stored = raw[int(table[1]["offset"]):int(table[1]["offset"]) + int(table[1]["size"])]
    # One independent stream per page, the form crash and libkdumpfile decode.
    page = zstandard.ZstdDecompressor().decompress(stored) if compress == "zstd" else zlib.decompress(stored)
    assert page == pages[1].tobytes()


def test_pread_physical_spans_pages_and_holes(tmp_path):
    pages = mixed_pages(8, seed=3)
    path = tmp_path / "pread.kdump"
    write_kdump(path, x86_64_info(), [(2, pages[:4]), (8, pages[4:])], max_mapnr=16)
    memory = bytearray(16 * PAGE)
    memory[2 * PAGE:6 * PAGE] = pages[:4].tobytes()
    memory[8 * PAGE:12 * PAGE] = pages[4:].tobytes()
    with KdumpReader(path) as reader:
        for paddr, length in [(0, 16 * PAGE), (2 * PAGE + 100, 3 * PAGE), (5 * PAGE + 4000, 3 * PAGE + 200),
                              (11 * PAGE + 1, 5 * PAGE - 1), (20 * PAGE, 10)]:
            assert reader.pread_physical(paddr, length) == bytes(memory[paddr:paddr + length]).ljust(length, b"\0")


def test_pfn_written_twice_or_out_of_order_is_rejected(tmp_path):
    fd = os.open(tmp_path / "order.kdump", os.O_RDWR | os.O_CREAT)
    try:
        writer = KdumpWriter(fd, x86_64_info(), max_mapnr=100)
        writer.write_pages(10, bytes(2 * PAGE))
        for pfn, data in [(11, bytes(PAGE)), (10, bytes(PAGE)), (5, bytes(PAGE))]:
            with pytest.raises(ValueError):
                writer.write_pages(pfn, data)
        with pytest.raises(ValueError):
            writer.write_pages(99, bytes(2 * PAGE))  # past max_mapnr
        with pytest.raises(ValueError):
            writer.write_pages(50, bytes(100))  # not whole pages
        writer.write_pages(12, bytes(PAGE))
        assert writer.close().pages_present == 3
    finally:
        os.close(fd)


def test_header_is_written_last(tmp_path):
    path = tmp_path / "unfinished.kdump"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        writer = KdumpWriter(fd, x86_64_info(), max_mapnr=4096, threads=1)
        writer.write_pages(0, mixed_pages(2048).tobytes())  # whole batches reach the file
        assert path.stat().st_size > 2 * PAGE
        assert not is_kdump(path)  # a capture cut short does not look like a dump
        writer.close()
    finally:
        os.close(fd)
    assert is_kdump(path)


def test_vmcoreinfo_outside_notes_is_stored_as_a_note(tmp_path):
    path = tmp_path / "vmcoreinfo.kdump"
    info = x86_64_info(notes=elf_note(b"CORE", NT_PRSTATUS, bytes(PRSTATUS_BYTES_X86_64)))
    write_kdump(path, info, [(0, mixed_pages(4))], max_mapnr=4)
    with KdumpReader(path) as reader:
        assert reader.vmcoreinfo == VMCOREINFO
        assert reader.notes.startswith(info.notes)
        assert b"VMCOREINFO\0" in reader.notes[len(info.notes):]


def test_large_max_mapnr_with_few_pages_stays_small(tmp_path):
    max_mapnr = 128 << 20  # 512 GiB of 4 KiB pages
    pages = mixed_pages(64)
    calls = [(0x100, pages[:32]), (max_mapnr - 32, pages[32:])]
    tracemalloc.start()
    try:
        stats = write_kdump(tmp_path / "big.kdump", x86_64_info(), calls, max_mapnr=max_mapnr,
                            max_pages_present=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bitmaps = 2 * (max_mapnr // 8)  # 2 x 16 MiB: the format's own size, in memory and in the file
    assert peak < bitmaps + (16 << 20)
    assert stats.file_bytes < bitmaps + (1 << 20)

    # Without a bound on present pages the descriptor table is sized for
    # max_mapnr, but the unused part is never written: a hole, not disk.
    stats = write_kdump(tmp_path / "big-sparse.kdump", x86_64_info(), calls, max_mapnr=max_mapnr)
    assert stats.file_bytes > 24 * max_mapnr
    assert (tmp_path / "big-sparse.kdump").stat().st_blocks * 512 < bitmaps + (4 << 20)

    with KdumpReader(tmp_path / "big-sparse.kdump") as reader:
        assert reader.header.max_mapnr == max_mapnr
        assert list(reader.iter_dumped_runs()) == [(0x100, 32), (max_mapnr - 32, 32)]
        assert reader.read_page(max_mapnr - 1) == pages[63].tobytes()


def test_descriptor_capacity_overflow_is_rejected(tmp_path):
    fd = os.open(tmp_path / "overflow.kdump", os.O_RDWR | os.O_CREAT)
    try:
        writer = KdumpWriter(fd, x86_64_info(), max_mapnr=100, max_pages_present=2)
        writer.write_pages(0, mixed_pages(2).tobytes())
        writer.write_pages(5, mixed_pages(1).tobytes())
        with pytest.raises(ValueError, match="max_pages_present"):
            writer.close()
    finally:
        os.close(fd)


@st.composite
def page_runs(draw):
    """Increasing (pfn, page kinds) runs with gaps; kinds 0 zero, 1 random, 2 text."""
    runs, pfn = [], draw(st.integers(0, 20))
    for _ in range(draw(st.integers(0, 6))):
        kinds = draw(st.lists(st.integers(0, 2), min_size=1, max_size=40))
        runs.append((pfn, kinds))
        pfn += len(kinds) + draw(st.integers(0, 30))
    return runs, pfn + draw(st.integers(0, 20))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=page_runs(), compress=st.sampled_from(["zstd", "zlib", "none"]), exclude_zero=st.booleans())
def test_round_trip_property(tmp_path, runs, compress, exclude_zero):
    runs, max_mapnr = runs
    rng = np.random.default_rng(len(runs))
    expected: dict[int, np.ndarray] = {}
    calls = []
    for first, kinds in runs:
        pages = np.zeros((len(kinds), PAGE), dtype=np.uint8)
        for i, kind in enumerate(kinds):
            if kind == 1:
                pages[i] = rng.integers(0, 256, size=PAGE, dtype=np.uint8)
            elif kind == 2:
                pages[i] = text_page(rng)
            expected[first + i] = pages[i]
        calls.append((first, pages))
    path = tmp_path / "prop.kdump"
    stats = write_kdump(path, x86_64_info(), calls, max_mapnr=max(max_mapnr, 1), compress=compress,
                        exclude_zero=exclude_zero, threads=1)
    zero = sum(1 for page in expected.values() if not page.any())
    assert stats.pages_present == len(expected)
    assert stats.pages_dumped == len(expected) - (zero if exclude_zero else 0)
    with KdumpReader(path) as reader:
        assert reader.page_counts() == (stats.pages_present, stats.pages_dumped)
        runs_seen = [pfn for first, count in reader.iter_dumped_runs() for pfn in range(first, first + count)]
        assert runs_seen == sorted(p for p, page in expected.items() if page.any() or not exclude_zero)
        for pfn in range(max_mapnr):
            page = reader.read_page(pfn)
            if pfn in expected and (expected[pfn].any() or not exclude_zero):
                assert page == expected[pfn].tobytes()
            else:
                assert page is None


@given(bits=st.lists(st.booleans(), max_size=200), chunk_bytes=st.integers(1, 5))
def test_runs_join_across_bitmap_chunks(bits, chunk_bytes):
    from vmcap.formats.kdump import _iter_runs

    bitmap = np.packbits(np.array(bits + [False] * (-len(bits) % 8), dtype=bool), bitorder="little")
    expected, start = [], None
    for pfn, bit in enumerate(bits + [False]):
        if bit and start is None:
            start = pfn
        elif not bit and start is not None:
            expected.append((start, pfn - start))
            start = None
    assert list(_iter_runs(bitmap, chunk_bytes=chunk_bytes)) == expected


def utsname_machine(e_machine, elf_class, byte_order):
    return make_platform(elf_class=elf_class, byte_order=byte_order, e_machine=e_machine).utsname


def test_utsname_machine_names():
    assert utsname_machine(EM_X86_64, 64, "little") == "x86_64"
    assert utsname_machine(EM_386, 32, "little") == "i686"
    assert utsname_machine(EM_AARCH64, 64, "little") == "aarch64"
    assert utsname_machine(EM_PPC64, 64, "little") == "ppc64le"
    assert utsname_machine(EM_PPC64, 64, "big") == "ppc64"
    assert utsname_machine(EM_S390, 64, "big") == "s390x"


# -- damaged and foreign files ----------------------------------------------

@pytest.mark.parametrize("content", [
    b"",
    b"KDUMP",
    os.urandom(8192),
    b"\x7fELF\x02\x01\x01" + bytes(8192),
    b"DISKDUMP" + bytes(8192),
])
def test_not_a_kdump_is_bad_source(tmp_path, content):
    path = tmp_path / "foreign"
    path.write_bytes(content)
    assert not is_kdump(path)
    with pytest.raises(BadSource):
        KdumpReader(path)


@pytest.fixture
def good_kdump(tmp_path) -> Path:
    path = tmp_path / "good.kdump"
    write_kdump(path, x86_64_info(), [(0, mixed_pages(64))], max_mapnr=64, compress="zstd")
    return path


def test_truncated_before_bitmaps_end_is_corrupt(good_kdump):
    os.truncate(good_kdump, 2 * PAGE + 100)  # header, sub header, part of the 1st bitmap
    assert is_kdump(good_kdump)
    with pytest.raises(CorruptOutput, match="past end of file"):
        KdumpReader(good_kdump)


def test_truncated_descriptor_table_is_corrupt(good_kdump):
    os.truncate(good_kdump, 4 * PAGE + 10 * 24)
    with pytest.raises(CorruptOutput, match="descriptors"):
        KdumpReader(good_kdump)


def test_truncated_page_data_is_corrupt_when_read(good_kdump):
    size = good_kdump.stat().st_size
    os.truncate(good_kdump, size - 100)
    with KdumpReader(good_kdump) as reader:
        assert reader.read_page(0) == bytes(PAGE)
        with pytest.raises(CorruptOutput):
            reader.read_page(63)


def test_damaged_descriptor_and_data_are_corrupt(good_kdump):
    table = descriptor_table(good_kdump)
    table_offset = 4 * PAGE
    with open(good_kdump, "r+b") as f:
        f.seek(table_offset + 24 * 1 + 8)
        f.write(struct.pack("<I", 3000))  # raw page whose size is not one block
        f.seek(table_offset + 24 * 2)
        f.write(struct.pack("<q", 0))  # offset 0: makedumpfile's "lost to ENOSPC"
        f.seek(int(table[3]["offset"]) + 4)
        f.write(b"\xff" * 16)  # garbage inside a zstd frame
    with KdumpReader(good_kdump) as reader:
        assert reader.read_page(5) is not None
        for pfn in (1, 2, 3):
            with pytest.raises(CorruptOutput, match=f"pfn {pfn:#x}"):
                reader.read_page(pfn)


def test_dumped_bit_without_present_bit_is_corrupt(good_kdump):
    with open(good_kdump, "r+b") as f:
        f.seek(2 * PAGE)
        f.write(b"\0")  # clear pfns 0-7 from the 1st bitmap only
    with pytest.raises(CorruptOutput, match="2nd bitmap"):
        KdumpReader(good_kdump)


# -- other machines, read back by libkdumpfile through drgn --------------------

def drgn_program(path: Path):
    drgn_module = pytest.importorskip("drgn")
    program = drgn_module.Program()
    program.set_core_dump(str(path))
    return drgn_module, program


@pytest.mark.parametrize("compress", ["zstd", "zlib"])
def test_drgn_reads_the_same_bytes(tmp_path, compress):
    pages = mixed_pages(len(GAPPED_PFNS))
    path = tmp_path / f"drgn.{compress}.kdump"
    write_kdump(path, x86_64_info(nr_cpus=40), gapped_calls(pages), max_mapnr=GAPPED_MAX_MAPNR,
                compress=compress, exclude_zero=True)
    drgn_module, program = drgn_program(path)
    with KdumpReader(path) as reader:
        assert reader.header.sub_header_blocks > 1  # 40 CPUs' notes push the bitmaps along
        for index in range(0, len(GAPPED_PFNS), 37):
            pfn = GAPPED_PFNS[index]
            if pages[index].any():
                assert program.read(pfn * PAGE, PAGE, True) == pages[index].tobytes()
                assert program.read(pfn * PAGE + 123, 50, True) == reader.pread_physical(pfn * PAGE + 123, 50)
            else:
                with pytest.raises(drgn_module.FaultError):
                    program.read(pfn * PAGE, PAGE, True)


# Extra VMCOREINFO each architecture's address translation setup in
# libkdumpfile insists on, even for physical reads.
OTHER_MACHINES = {
    "i686": (32, "little", PAGE, b""),
    "arm-le": (32, "little", PAGE, b"SYMBOL(_stext)=c0008000\n"),
    "arm-be": (32, "big", PAGE, b"SYMBOL(_stext)=c0008000\n"),
    "aarch64": (64, "little", PAGE, b"NUMBER(VA_BITS)=48\nNUMBER(kimage_voffset)=0xffff800000000000\n"
                                    b"NUMBER(PHYS_OFFSET)=0x40000000\nSYMBOL(_stext)=ffff800008010000\n"),
    "ppc64": (64, "big", 65536, b""),
}


@pytest.mark.parametrize("name", sorted(OTHER_MACHINES))
def test_other_machine_layouts_read_by_drgn(tmp_path, name):
    elf_class, byte_order, page_size, extra = OTHER_MACHINES[name]
    machine = name.split("-")[0]
    vmcoreinfo = (f"OSRELEASE={RELEASE}\nPAGESIZE={page_size}\nSYMBOL(swapper_pg_dir)=c0004000\n"
                  f"NUMBER(phys_base)=4096\nKERNELOFFSET=0\n").encode() + extra
    info = KdumpHeaderInfo(machine=machine, elf_class=elf_class, byte_order=byte_order, page_size=page_size,
                           release=RELEASE, nr_cpus=2, vmcoreinfo=vmcoreinfo, notes=b"", crash_time=CRASH_TIME)
    pages = mixed_pages(12, page_size=page_size)
    path = tmp_path / f"{name}.kdump"
    write_kdump(path, info, [(100, pages)], max_mapnr=300, compress="zlib")
    with KdumpReader(path) as reader:
        h = reader.header
        assert (h.machine, h.elf_class, h.byte_order, h.page_size) == (machine, elf_class, byte_order, page_size)
        assert (h.max_mapnr, h.phys_base, h.crash_time, h.release) == (300, 4096, CRASH_TIME, RELEASE)
        assert reader.vmcoreinfo == vmcoreinfo
        assert all(reader.read_page(100 + i) == pages[i].tobytes() for i in range(12))
    _, program = drgn_program(path)
    assert all(program.read((100 + i) * page_size, page_size, True) == pages[i].tobytes() for i in range(12))


# Byte offsets of (offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note,
# max_mapnr_64) in kdump_sub_header, as crash's diskdump.c comments list them
# for i386 (64-bit fields 4-aligned), ARM (8-aligned) and LP64.
SUB_HEADER_OFFSETS = {
    ("i686", 32): (20, 28, 32, 40, 72),
    ("arm", 32): (24, 32, 40, 48, 88),
    ("x86_64", 64): (32, 40, 48, 56, 96),
}


@pytest.mark.parametrize("machine, elf_class", sorted(SUB_HEADER_OFFSETS))
def test_sub_header_offsets_match_crash_documentation(tmp_path, machine, elf_class):
    info = x86_64_info(machine=machine, elf_class=elf_class, notes=b"")
    path = tmp_path / "sub.kdump"
    write_kdump(path, info, [(0, mixed_pages(2))], max_mapnr=0x12345)
    sub = path.read_bytes()[PAGE:2 * PAGE]
    at_vmcoreinfo, at_vmcoreinfo_size, at_note, at_note_size, at_max_mapnr = SUB_HEADER_OFFSETS[machine, elf_class]
    long_format = "<Q" if elf_class == 64 else "<I"
    offset_note = struct.unpack_from("<q", sub, at_note)[0]
    size_note = struct.unpack_from(long_format, sub, at_note_size)[0]
    offset_vmcoreinfo = struct.unpack_from("<q", sub, at_vmcoreinfo)[0]
    size_vmcoreinfo = struct.unpack_from(long_format, sub, at_vmcoreinfo_size)[0]
    raw = path.read_bytes()
    assert raw[offset_note:offset_note + size_note] == elf_note(b"VMCOREINFO", 0, VMCOREINFO)
    assert raw[offset_vmcoreinfo:offset_vmcoreinfo + size_vmcoreinfo] == VMCOREINFO
    assert struct.unpack_from("<Q", sub, at_max_mapnr)[0] == 0x12345
    assert struct.unpack_from(long_format, sub, 0)[0] == PHYS_BASE


# -- crash ----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("crash") is None, reason="crash is not installed")
@pytest.mark.parametrize("compress, nr_cpus", [("zstd", 1), ("zlib", 40), ("none", 1)])
def test_crash_reports_osrelease(tmp_path, compress, nr_cpus):
    path = tmp_path / f"crash.{compress}.kdump"
    write_kdump(path, x86_64_info(nr_cpus=nr_cpus), [(0x100, mixed_pages(64))], max_mapnr=0x200,
                compress=compress, exclude_zero=compress == "zlib")
    result = subprocess.run(["crash", "--osrelease", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == RELEASE


def test_bitmaps_are_streamed_through_a_bounded_window(tmp_path):
    """A writer for 2^29 pfns (2 TiB) holds a window of each bitmap, not 2 x 64 MiB."""
    import tracemalloc

    path = tmp_path / "big.kdump"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    page = np.full(PAGE, 7, dtype=np.uint8).tobytes()
    tracemalloc.start()
    try:
        writer = KdumpWriter(fd, x86_64_info(), max_mapnr=1 << 29, max_pages_present=64)
        # One present page every 8 Mi pfns: every bitmap window is visited.
        for pfn in range(0, 1 << 29, 1 << 23):
            writer.write_pages(pfn, page)
        writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert peak < 32 << 20, peak  # the old whole bitmaps alone were 128 MiB
    with KdumpReader(str(path)) as reader:
        assert reader.page_counts() == (64, 64)
        assert reader.is_present(1 << 23) and not reader.is_present((1 << 23) + 1)


def test_streamed_bitmaps_are_exact_across_windows(tmp_path, monkeypatch):
    from vmcap.formats import kdump

    monkeypatch.setattr(kdump._StreamedBitmap, "WINDOW_BYTES", 16)  # 128 pfns a window
    rng = np.random.default_rng(5)
    present = np.sort(rng.choice(5000, size=700, replace=False))
    path = tmp_path / "windows.kdump"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = KdumpWriter(fd, x86_64_info(), max_mapnr=5000, exclude_zero=True)
        for pfn in present.tolist():
            content = bytes(PAGE) if pfn % 3 == 0 else bytes([pfn % 251 + 1]) * PAGE
            writer.write_pages(pfn, content)
        writer.close()
    finally:
        os.close(fd)
    present_set = set(present.tolist())
    with KdumpReader(str(path)) as reader:
        for pfn in range(5000):
            assert reader.is_present(pfn) == (pfn in present_set)
            assert reader.is_dumped(pfn) == (reader.is_present(pfn) and pfn % 3 != 0)
