"""Real readers (drgn, crash, makedumpfile) as oracles for vmcap's outputs.

Three kinds of proof:

1. The real QEMU dump saved in every vmcap format and dump level reads back
   the same through drgn, crash and makedumpfile as the source does.
2. makedumpfile and vmcap, run on the same source, store the same non-zero
   pages (timings and sizes are printed: run with -s).
3. A synthetic dump with fractional pages: vmcap keeps every RAM byte of
   them, makedumpfile 1.7.2 loses some (a characterisation of 1.7.2).

No reader understands a compressed ELF, so zelf outputs are decompressed with
the zstd CLI first. Outputs of the real dump are made once per session.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmcap.fileio.mmapio import FileSource
from vmcap.formats.kdump import KdumpReader
from vmcap.plan.copyplan import find_fractional_pages
from vmcap.sample import POISON, default_vmcoreinfo, expected_bytes
from vmcap.save import SaveOptions, save
from vmcap.source.layout import read_layout

from conftest import FRACTIONAL_RANGES, have, spec

try:
    import drgn
except ImportError:  # the tests that need it skip
    drgn = None

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
REAL_RELEASE = "6.1.0-56-amd64"
TOOL_SECONDS = 120
REPO = Path(__file__).resolve().parents[1]

# vmcap output formats, by the name tests use, as SaveOptions arguments.
FORMATS = {
    "zelf": dict(output_format="zelf"),
    "elf": dict(output_format="elf"),
    "kdump-zstd": dict(output_format="kdump", compress="zstd"),
    "kdump-zlib": dict(output_format="kdump", compress="zlib"),
}
DUMP_LEVELS = (0, 1)

needs_drgn = pytest.mark.skipif(drgn is None, reason="drgn is not installed")
needs_crash = pytest.mark.skipif(not have("crash"), reason="crash is not installed")
needs_makedumpfile = pytest.mark.skipif(not have("makedumpfile"),
                                        reason="makedumpfile is not installed")


# --------------------------------------------------------------------------
# Helpers


def run_tool(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=TOOL_SECONDS, **kwargs)


def makedumpfile_features() -> tuple[str, set[str]]:
    """(version, compressions the binary was built with) from `makedumpfile -v`."""
    text = run_tool(["makedumpfile", "-v"]).stdout
    match = re.search(r"version (\S+)", text)
    enabled = set(re.findall(r"^(\w+)\s+enabled", text, re.M))
    return (match.group(1) if match else "unknown"), enabled


def save_readable(src, directory: Path, fmt: str, dump_level: int) -> Path:
    """Save src with vmcap; return a file external readers open (zelf decompressed)."""
    if fmt == "zelf" and not have("zstd"):
        pytest.skip("zelf outputs are decompressed with the zstd CLI, which is not installed")
    out = directory / f"vmcap-{fmt}-d{dump_level}"
    save(str(src), str(out), SaveOptions(**FORMATS[fmt], dump_level=dump_level, threads=2,
                                         force=True))
    if fmt != "zelf":
        return out
    plain = directory / f"vmcap-{fmt}-d{dump_level}.elf"
    subprocess.run(["zstd", "-d", "-q", "-f", str(out), "-o", str(plain)], check=True)
    out.unlink()
    return plain


def open_drgn(path) -> "drgn.Program":
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    return prog


def drgn_read(prog, paddr: int, length: int) -> bytes | None:
    """Physical bytes through drgn, or None where drgn faults (hole or excluded page)."""
    try:
        return prog.read(paddr, length, True)
    except drgn.FaultError:
        return None


def dump_dmesg(path, out: Path) -> subprocess.CompletedProcess:
    return run_tool(["makedumpfile", "--dump-dmesg", path, out])


def nonzero_stored_pfns(path) -> set[int]:
    """Dumped pfns whose stored content is not all zero (zlib/zstd pages, decoded)."""
    with KdumpReader(path) as reader:
        return {pfn for first, count in reader.iter_dumped_runs()
                for pfn in range(first, first + count) if reader.read_page(pfn) != ZERO_PAGE}


def nonzero_stored_pfns_by_descriptor(path) -> set[int]:
    """Like nonzero_stored_pfns, for page compressions vmcap cannot decode (lzo).

    makedumpfile -d 1 gives every zero page the descriptor of one stored zero
    page (pd_zero, raw, at the start of the page data) and every other page a
    descriptor of its own, so the pages sharing a descriptor are the zero pages.
    """
    import numpy as np

    dtype = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])
    with KdumpReader(path) as reader:
        header = reader.header
        pfns = np.array([pfn for first, count in reader.iter_dumped_runs()
                         for pfn in range(first, first + count)], dtype=np.int64)
    table_at = (1 + header.sub_header_blocks + header.bitmap_blocks) * header.page_size
    descriptors = np.fromfile(path, dtype=dtype, count=len(pfns), offset=table_at)
    offsets, counts = np.unique(descriptors["offset"], return_counts=True)
    shared = offsets[counts > 1]
    assert len(shared) <= 1, f"{path}: more than one shared page descriptor: {shared}"
    if len(shared):
        zero = descriptors[descriptors["offset"] == shared[0]][0]
        assert (int(zero["size"]), int(zero["flags"])) == (PAGE, 0), "shared page is not raw"
        with open(path, "rb") as f:
            f.seek(int(shared[0]))
            assert f.read(PAGE) == ZERO_PAGE, f"{path}: the shared page is not a zero page"
    return set(pfns[~np.isin(descriptors["offset"], shared)].tolist())


# --------------------------------------------------------------------------
# 1. The real dump through drgn, crash and makedumpfile


@pytest.fixture(scope="session")
def real_output(real_vmcore, tmp_path_factory):
    """real_output(fmt, dump_level) -> readable vmcap output of the real dump, made once."""
    directory = tmp_path_factory.mktemp("real-outputs")
    made: dict[tuple[str, int], Path] = {}

    def get(fmt: str, dump_level: int) -> Path:
        if (fmt, dump_level) not in made:
            made[fmt, dump_level] = save_readable(real_vmcore, directory, fmt, dump_level)
        return made[fmt, dump_level]

    return get


def sample_paddrs(segments) -> list[int]:
    """Six pages of every segment: first, second, quarter, middle, three quarters, last."""
    paddrs = set()
    for s in segments:
        first = -(-s.paddr // PAGE) * PAGE
        last = (s.paddr + s.memsz) // PAGE * PAGE - PAGE
        span = last - first
        for at in (first, first + PAGE, first + span // 4, first + span // 2,
                   first + 3 * span // 4, last):
            paddrs.add(min(at // PAGE * PAGE, last))
    return sorted(paddrs)


@pytest.fixture(scope="session")
def real_source_pages(real_vmcore):
    """{paddr: page read by drgn from the real dump} at pages across every PT_LOAD."""
    if drgn is None:
        pytest.skip("drgn is not installed")
    source = FileSource(real_vmcore)
    try:
        segments = read_layout(source).segments
    finally:
        source.close()
    prog = open_drgn(real_vmcore)
    pages = {paddr: prog.read(paddr, PAGE, True) for paddr in sample_paddrs(segments)}
    assert len(pages) >= 20 and len(segments) == 4
    return pages


@needs_drgn
@pytest.mark.slow
@pytest.mark.parametrize("dump_level", DUMP_LEVELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_drgn_reads_real_dump_pages_from_output_as_from_source(real_output, real_source_pages,
                                                               fmt, dump_level):
    prog = open_drgn(real_output(fmt, dump_level))
    for paddr, expected in real_source_pages.items():
        got = drgn_read(prog, paddr, PAGE)
        # ELF outputs zero-fill excluded runs (p_memsz); kdump -d 1 keeps zero
        # pages readable through one shared stored page, as makedumpfile does:
        # no page of the dump may fault.
        assert got is not None, f"{fmt} -d {dump_level}: drgn faults at {paddr:#x}"
        assert got == expected, f"{fmt} -d {dump_level}: page {paddr:#x} differs"


@needs_crash
@pytest.mark.slow
@pytest.mark.parametrize("dump_level", DUMP_LEVELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_osrelease_reads_real_dump_release_from_output(real_output, fmt, dump_level):
    result = run_tool(["crash", "--osrelease", real_output(fmt, dump_level)])
    assert REAL_RELEASE in result.stdout.split(), (result.stdout, result.stderr)


@pytest.fixture(scope="session")
def reference_dmesg(real_output, tmp_path_factory) -> str:
    """makedumpfile --dump-dmesg of vmcap's plain ELF (makedumpfile refuses the source:
    its program headers are not at offset 64)."""
    if not have("makedumpfile"):
        pytest.skip("makedumpfile is not installed")
    out = tmp_path_factory.mktemp("dmesg") / "reference.txt"
    result = dump_dmesg(real_output("elf", 0), out)
    assert result.returncode == 0, result.stderr
    return out.read_text(errors="replace")


@needs_makedumpfile
@pytest.mark.slow
def test_makedumpfile_dmesg_of_real_dump_ends_in_the_sysrq_panic(reference_dmesg):
    lines = reference_dmesg.splitlines()
    assert len(lines) > 400
    assert any(line.endswith("] sysrq: Trigger a crash") for line in lines)
    assert any(line.endswith("] Kernel panic - not syncing: sysrq triggered crash")
               for line in lines)
    assert lines[-1].endswith("---[ end Kernel panic - not syncing: sysrq triggered crash ]---")
    assert REAL_RELEASE in lines[0]


# makedumpfile -d 1 keeps zero pages in the 2nd bitmap, all pointing at one
# stored zero page, and so does vmcap by default. Clearing them from the
# bitmap instead (--zero-pages exclude) makes makedumpfile's reading of the
# printk descriptor ring (24 pages at 0xffffffff954bf000) stop at its all-zero
# pfn 0x146bf: "dump_lockless_dmesg: Can't get prb.desc_ring.descs".
_DMESG_CASES = [pytest.param(fmt, level, id=f"{fmt}-{level}")
                for fmt in FORMATS for level in DUMP_LEVELS]


@needs_makedumpfile
@pytest.mark.slow
@pytest.mark.parametrize("fmt, dump_level", _DMESG_CASES)
def test_makedumpfile_dump_dmesg_of_output_matches_plain_elf(real_output, reference_dmesg,
                                                             tmp_path, fmt, dump_level):
    if fmt == "kdump-zstd" and "zstd" not in makedumpfile_features()[1]:
        pytest.skip("this makedumpfile is built without zstd: it cannot read zstd kdump pages")
    out = tmp_path / "dmesg.txt"
    result = dump_dmesg(real_output(fmt, dump_level), out)
    assert result.returncode == 0, result.stderr
    assert out.read_text(errors="replace") == reference_dmesg


@needs_makedumpfile
@pytest.mark.slow
def test_makedumpfile_dump_dmesg_reads_its_own_d1_kdump_of_real_dump(kdump_runs, reference_dmesg,
                                                                     tmp_path):
    path = kdump_runs["makedumpfile -c -d 1 (zlib)"][0]
    out = tmp_path / "dmesg.txt"
    result = dump_dmesg(path, out)
    assert result.returncode == 0, result.stderr
    assert out.read_text(errors="replace") == reference_dmesg


# --------------------------------------------------------------------------
# 2. makedumpfile and vmcap on the same source


@pytest.fixture(scope="session")
def kdump_runs(real_output, tmp_path_factory):
    """{name: (path, seconds, bytes)} of four -d 1 kdump runs on vmcap's plain ELF of the
    real dump (a source makedumpfile reads); the table is printed."""
    if not have("makedumpfile"):
        pytest.skip("makedumpfile is not installed")
    src = real_output("elf", 0)
    directory = tmp_path_factory.mktemp("kdump-runs")
    vmcap = [sys.executable, "-m", "vmcap", "save", "--format", "kdump", "-d", "1", "-q"]
    commands = {
        "makedumpfile -c -d 1 (zlib)": ["makedumpfile", "-c", "-d", "1", src, directory / "a.kdump"],
        "makedumpfile -l -d 1 (lzo)": ["makedumpfile", "-l", "-d", "1", src, directory / "b.kdump"],
        "vmcap save --format kdump -d 1 (zstd)": vmcap + [src, directory / "c.kdump"],
        "vmcap save --format kdump -d 1 --compress zlib": vmcap + ["--compress", "zlib", src,
                                                                   directory / "d.kdump"],
    }
    if "lzo" not in makedumpfile_features()[1]:
        del commands["makedumpfile -l -d 1 (lzo)"]
    runs = {}
    for name, argv in commands.items():
        started = time.monotonic()
        result = run_tool(argv, cwd=REPO)
        seconds = time.monotonic() - started
        assert result.returncode == 0, (name, result.stderr[-2000:])
        runs[name] = (argv[-1], seconds, os.path.getsize(argv[-1]))
    print(f"\n-d 1 kdump of the real dump ({os.path.getsize(src):,} byte plain ELF source, "
          f"{os.cpu_count()} cores):")
    for name, (_, seconds, size) in runs.items():
        print(f"  {name:48} {seconds:6.2f} s  {size:>12,} bytes  ({size / 1e6:.1f} MB)")
    return runs


@needs_makedumpfile
@pytest.mark.slow
def test_vmcap_and_makedumpfile_store_the_same_nonzero_pages_of_real_dump(kdump_runs):
    by_tool = {name: path for name, (path, _, _) in kdump_runs.items()}
    mdf_zlib = by_tool["makedumpfile -c -d 1 (zlib)"]
    mdf_pages = nonzero_stored_pfns(mdf_zlib)
    vmcap_pages = nonzero_stored_pfns(by_tool["vmcap save --format kdump -d 1 (zstd)"])
    assert nonzero_stored_pfns(by_tool["vmcap save --format kdump -d 1 --compress zlib"]) \
        == vmcap_pages
    if "makedumpfile -l -d 1 (lzo)" in by_tool:
        assert nonzero_stored_pfns_by_descriptor(by_tool["makedumpfile -l -d 1 (lzo)"]) \
            == nonzero_stored_pfns_by_descriptor(mdf_zlib) == mdf_pages

    # makedumpfile cuts max_mapnr to the end of the kernel's mem_map (get_mem_map),
    # so it drops the PT_LOADs above RAM (VGA VRAM at 0xfd000000, BIOS ROM at
    # 0xfffc0000); vmcap keeps every PT_LOAD. The real dump has no fractional
    # pages, so below that limit the two must agree exactly.
    with KdumpReader(mdf_zlib) as reader:
        mdf_max_mapnr = reader.max_mapnr
    assert mdf_max_mapnr == 0x20000000 // PAGE
    assert mdf_pages == {pfn for pfn in vmcap_pages if pfn < mdf_max_mapnr}
    beyond = sorted(pfn for pfn in vmcap_pages if pfn >= mdf_max_mapnr)
    assert all(0xfd000 <= pfn < 0xfe000 or 0xfffc0 <= pfn < 0x100000 for pfn in beyond)
    print(f"\nnon-zero pages stored: makedumpfile {len(mdf_pages)}, vmcap {len(vmcap_pages)} "
          f"(+{len(beyond)} of VGA VRAM / BIOS ROM above makedumpfile's max_mapnr)")

    with KdumpReader(mdf_zlib) as mdf, \
            KdumpReader(by_tool["vmcap save --format kdump -d 1 (zstd)"]) as ours:
        for pfn in sorted(mdf_pages):
            assert ours.read_page(pfn) == mdf.read_page(pfn), f"pfn {pfn:#x} differs"


@needs_makedumpfile
@pytest.mark.slow
def test_vmcap_zstd_kdump_of_real_dump_no_bigger_than_makedumpfile_zlib(kdump_runs):
    sizes = {name: size for name, (_, _, size) in kdump_runs.items()}
    assert sizes["vmcap save --format kdump -d 1 (zstd)"] <= sizes["makedumpfile -c -d 1 (zlib)"]


# --------------------------------------------------------------------------
# 3. Fractional pages: vmcap keeps them, makedumpfile 1.7.2 does not

# Each fractional page of spec() as (paddr, size) of its RAM pieces. A guard:
# the makedumpfile expectations below are written for these.
FRACTIONAL_PIECES = (
    (0x9F000, 0xC00),    # tail of RAM 0x1000-0x9fbff
    (0x300400, 0xC00),   # head of RAM starting mid-page 0x300400
    (0x400100, 0x200),   # sub-page RAM 0x400100-0x4002ff
    (0x502000, 0x800),   # page 0x502000 shared: tail of 0x500000-0x5027ff ...
    (0x502800, 0x800),   # ... and head of 0x502800-
)


# libkdumpfile (drgn's kdump reader) reads no page of an x86_64 kdump file
# before it knows the paging mode ("Cannot determine 5-level paging"); 4.17+
# kernels always write this entry, the samples' default VMCOREINFO does not.
DRGN_KDUMP_VMCOREINFO = dict(default_vmcoreinfo(spec()), **{"NUMBER(pgtable_l5_enabled)": "0"})


def fractional_pieces(path) -> list[tuple[int, int]]:
    source = FileSource(str(path))
    try:
        segments = read_layout(source).segments
    finally:
        source.close()
    return [(piece.paddr, piece.size) for page in find_fractional_pages(segments, PAGE)
            for piece in page.pieces]


def test_fractional_ranges_give_the_pieces_these_tests_expect(make_vmcore):
    path, _ = make_vmcore(spec())
    assert spec().ranges == FRACTIONAL_RANGES
    assert fractional_pieces(path) == list(FRACTIONAL_PIECES)


@needs_drgn
@pytest.mark.parametrize("fmt", FORMATS)
def test_drgn_reads_every_ram_byte_of_fractional_pages_from_vmcap_output(make_vmcore, tmp_path,
                                                                         fmt):
    sample = spec(vmcoreinfo=DRGN_KDUMP_VMCOREINFO)
    path, _ = make_vmcore(sample)
    out = save_readable(path, tmp_path, fmt, 0)
    prog = open_drgn(out)
    pieces = fractional_pieces(path)
    assert pieces
    for paddr, size in pieces:
        assert drgn_read(prog, paddr, size) == expected_bytes(sample, paddr, size), \
            f"{fmt}: RAM piece {paddr:#x}+{size:#x} of a fractional page"
    # The non-RAM rest of a fractional page is never passed off as memory:
    # kdump pages are zero there, ELF outputs have no segment there.
    ram = {(paddr, size) for paddr, size in pieces}
    for page in {paddr // PAGE * PAGE for paddr, _ in pieces}:
        for at in range(page, page + PAGE, 0x100):
            if any(p <= at < p + n for p, n in ram):
                continue
            got = drgn_read(prog, at, 0x100)
            assert got is None or got == bytes(0x100), f"{fmt}: non-RAM bytes at {at:#x}"
            assert (got is None) == (fmt in ("zelf", "elf")), f"{fmt}: {at:#x}"


# makedumpfile reads kernel data even at -d 0: check_release() reads
# init_uts_ns through the page tables (vtop4_x86_64 walks init_top_pgt) and
# get_mem_map() needs a memory model. These entries and planted structures give
# it a minimal kernel: 2 MiB pages mapping the kernel-text window
# 0xffffffff80000000 + x onto paddr x (phys_base 0), a utsname, and a FLATMEM
# mem_map pointer.
MAKEDUMPFILE_VMCOREINFO = {
    "SYMBOL(init_uts_ns)": "ffffffff80200000",
    "OFFSET(uts_namespace.name)": "0",
    "SYMBOL(init_top_pgt)": "ffffffff80101000",
    "SYMBOL(mem_map)": "ffffffff80200200",
    "SIZE(page)": "64",
    "OFFSET(page.flags)": "0",
    "OFFSET(page._refcount)": "52",
    "OFFSET(page.mapping)": "24",
}
_PTE_TABLE = 0x63  # present, writable, accessed, dirty
_PTE_LARGE = 0xE3  # ... and PSE: a 2 MiB page


def _page_table(entries: dict[int, int]) -> bytes:
    table = bytearray(PAGE)
    for index, value in entries.items():
        struct.pack_into("<Q", table, 8 * index, value)
    return bytes(table)


def plant_kernel_for_makedumpfile(path, info) -> None:
    """Write the structures MAKEDUMPFILE_VMCOREINFO points at into whole RAM pages."""
    planted = {
        0x101000: _page_table({511: 0x102000 | _PTE_TABLE}),  # PGD: pgd_index(kernel text)
        0x102000: _page_table({510: 0x103000 | _PTE_TABLE}),  # PUD
        0x103000: _page_table({i: i << 21 | _PTE_LARGE for i in range(512)}),  # PMD
        0x200000: b"".join(field.encode().ljust(65, b"\0") for field in
                           ("Linux", "vmcap", "6.1.0-vmcap-sample", "#1", "x86_64", "(none)")),
        0x200200: struct.pack("<Q", 0xFFFFEA0000000000),  # mem_map's value
    }
    fractional_pages = {paddr // PAGE for paddr, _ in FRACTIONAL_PIECES}
    fd = os.open(path, os.O_WRONLY)
    try:
        for paddr, data in planted.items():
            assert paddr // PAGE not in fractional_pages
            seg = next(s for s in info.segments if s.paddr <= paddr and
                       paddr + len(data) <= s.paddr + s.filesz)
            os.pwrite(fd, data, seg.offset + paddr - seg.paddr)
    finally:
        os.close(fd)


@pytest.fixture
def makedumpfile_source(make_vmcore):
    """(path, spec) of spec()'s fractional dump with enough kernel for makedumpfile 1.7.2."""
    if not have("makedumpfile"):
        pytest.skip("makedumpfile is not installed")
    version, _ = makedumpfile_features()
    if version != "1.7.2":
        pytest.skip(f"the characterisation is of makedumpfile 1.7.2, this is {version}")
    vmcoreinfo = dict(DRGN_KDUMP_VMCOREINFO, **MAKEDUMPFILE_VMCOREINFO)
    sample = spec(vmcoreinfo=vmcoreinfo)
    path, info = make_vmcore(sample)
    plant_kernel_for_makedumpfile(path, info)
    assert fractional_pieces(path) == list(FRACTIONAL_PIECES)
    return path, sample


def run_makedumpfile(args, src, out) -> None:
    result = run_tool(["makedumpfile", *args, src, out])
    if result.returncode != 0:
        pytest.skip(f"makedumpfile {' '.join(args)} refuses the synthetic dump: "
                    f"{result.stderr.strip()[-500:]}")


def read_back(prog, sample, paddr: int, size: int) -> str:
    got = drgn_read(prog, paddr, size)
    if got is None:
        return "fault"
    if got == expected_bytes(sample, paddr, size):
        return "exact"
    return "zeros" if got == bytes(size) else "wrong"


@needs_drgn
@needs_makedumpfile
def test_makedumpfile_elf_output_zero_fills_fractional_tails(makedumpfile_source, tmp_path):
    path, sample = makedumpfile_source
    out = tmp_path / "mdf.elf"
    run_makedumpfile(["-E", "-d", "0"], path, out)

    prog = open_drgn(out)
    outcome = {paddr: read_back(prog, sample, paddr, size) for paddr, size in FRACTIONAL_PIECES}
    # A segment's last partial page is left out of p_filesz (zero-filled p_memsz):
    # 0xc00 + 0x800 bytes of RAM read back as zeros. Head pieces are written.
    assert outcome == {0x9F000: "zeros", 0x300400: "exact", 0x400100: "exact",
                       0x502000: "zeros", 0x502800: "exact"}

    source = FileSource(str(out))
    try:
        segments = read_layout(source).segments
    finally:
        source.close()
    assert [(s.paddr, s.filesz, s.memsz) for s in segments] == [
        (0x1000, 0x9E000, 0x9EC00),      # tail 0x9f000-0x9fbff: memsz only
        (0x100000, 0x200000, 0x200000),
        (0x300400, 0xFC00, 0xFC00),
        (0x400100, 0xF00, 0xF00),        # sub-page RAM grown to the page end
        (0x500000, 0x2000, 0x2800),      # tail 0x502000-0x5027ff: memsz only
        (0x502800, 0x4800, 0x4800),
    ]
    # The sub-page segment is written as a "head" of PAGE - 0x100 bytes: the
    # 0xd00 non-RAM bytes after it in the source page become memory.
    assert drgn_read(prog, 0x400300, 0xD00) == POISON * 0xD00
    print("\nmakedumpfile 1.7.2 -E -d 0: RAM read back as zeros: 0x9f000-0x9fbff, "
          "0x502000-0x5027ff (5120 bytes); non-RAM 0x400300-0x400fff (3328 bytes) "
          "written as memory")


@needs_drgn
@needs_makedumpfile
def test_makedumpfile_kdump_output_drops_pages_holding_a_partial_end(makedumpfile_source,
                                                                      tmp_path):
    path, sample = makedumpfile_source
    out = tmp_path / "mdf.kdump"
    run_makedumpfile(["-c", "-d", "0"], path, out)

    prog = open_drgn(out)
    outcome = {paddr: read_back(prog, sample, paddr, size) for paddr, size in FRACTIONAL_PIECES}
    # Only the page holding a segment's partial head alone survives.
    assert outcome == {0x9F000: "fault", 0x300400: "exact", 0x400100: "fault",
                       0x502000: "fault", 0x502800: "fault"}

    with KdumpReader(out) as reader:
        # The 1st bitmap stops at floor(end / PAGE): a page holding a segment's
        # partial end is no memory at all ...
        assert not reader.is_present(0x9F) and not reader.is_present(0x400)
        # ... and exclude_nodata_pages() clears [pfn(p_paddr + p_filesz),
        # pfn(roundup(end))) from the 2nd even where another segment's head
        # shares the page: both halves of page 0x502000 are lost.
        assert reader.is_present(0x502) and not reader.is_dumped(0x502)
        # A partial head alone is dumped, zero outside the segment.
        assert reader.read_page(0x300) == bytes(0x400) + expected_bytes(sample, 0x300400, 0xC00)
    print("\nmakedumpfile 1.7.2 -c -d 0: pages lost: pfn 0x9f (0xc00 RAM bytes), pfn 0x400 "
          "(0x200), pfn 0x502 (0x800 + 0x800): 7680 bytes of RAM")


# --------------------------------------------------------------------------
# 4. gdb opens the ELF outputs as a core file


@pytest.mark.skipif(not have("gdb"), reason="gdb is not installed")
@pytest.mark.slow
@pytest.mark.parametrize("dump_level", DUMP_LEVELS)
@pytest.mark.parametrize("fmt", ["zelf", "elf"])
def test_gdb_reads_real_dump_memory_from_elf_outputs(real_vmcore, real_output, tmp_path, fmt,
                                                     dump_level):
    core = real_output(fmt, dump_level)
    source = FileSource(real_vmcore)
    try:
        segments = read_layout(source).segments
        # QEMU's paging-off dump maps vaddr == paddr, which is what gdb reads by.
        assert all(s.vaddr == s.paddr for s in segments)
        paddrs = sample_paddrs(segments)
        expected = {}
        for paddr in paddrs:
            seg = next(s for s in segments if s.paddr <= paddr < s.end)
            expected[paddr] = source.pread(seg.offset + paddr - seg.paddr, PAGE)
    finally:
        source.close()
    commands = []
    for paddr in paddrs:
        commands += ["-ex", f"dump binary memory {tmp_path}/{paddr:x}.bin {paddr:#x} "
                            f"{paddr + PAGE:#x}"]
    result = subprocess.run(["gdb", "-batch", "-nx", *commands, "-c", str(core)],
                            capture_output=True, text=True, timeout=TOOL_SECONDS)
    assert "file type elf64-x86-64" in subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "info files", "-c", str(core)],
        capture_output=True, text=True, timeout=TOOL_SECONDS).stdout
    for paddr, page in expected.items():
        dumped = tmp_path / f"{paddr:x}.bin"
        assert dumped.exists(), (paddr, result.stderr[-500:])
        assert dumped.read_bytes() == page, f"{fmt} -d {dump_level}: {paddr:#x} differs in gdb"
