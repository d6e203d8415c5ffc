"""s390x kernel virtual addresses (vmcap/kernel/s390x.py) and a big-endian target end to end.

Synthetic DAT tables for the walker; the real dump (tests/data/s390x.*, see
tests/arch/regen-ppc64-s390x.sh) is Debian 6.1 s390x under QEMU s390-ccw-virtio (TCG).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vmcap.errors import BadSource, Unsupported
from vmcap.kernel.arch import make_translator
from vmcap.kernel.s390x import S390xTranslator

sys.path.insert(0, str(Path(__file__).resolve().parent / "arch"))
from real_dumps import (  # noqa: E402
    check_foreign_makedumpfile_reads_elf_output,
    check_single_level,
    check_without_max_physmem_bits,
    drgn_on_output,
    kept_ranges,
    real_dump,
    run_vmcap,
)
from sparse_memory import SparseMemory  # noqa: E402

ROOT = 0x100000
HIGH_MEMORY_AT = 0x1000  # the high_memory variable
IDENTITY_END = 0x1000_0000
TT = {"segment": 0x0, "region-third": 0x4, "region-second": 0x8, "region-first": 0xC}
INVALID = 0x20
LARGE = 0x400


class FakeMemory(SparseMemory):
    """Sparse big-endian physical memory (unwritten bytes are 0)."""

    def __init__(self, size: int = 1 << 40):
        super().__init__(size, byte_order="big")

    def table(self, paddr: int, kind: str, entries: int = 2048) -> None:
        """An empty region or segment table: every entry invalid, with the table's type."""
        for i in range(entries):
            self.u64(paddr + 8 * i, TT[kind] | INVALID)


INFO = {"PAGESIZE": "4096", "SYMBOL(swapper_pg_dir)": f"{ROOT:x}", "SYMBOL(high_memory)": f"{HIGH_MEMORY_AT:x}"}
VMEMMAP = 0x3_8000_0000  # above the identity map: the walk translates it
SEGMENT_TABLE = 0x200000
PAGE_TABLE = 0x300800  # page tables are 2 KiB, 256 entries


def three_levels(root_kind: str = "region-third") -> FakeMemory:
    """root (region-third, TL=3) -> segment table -> page table mapping VMEMMAP -> 0x0ABC_D000."""
    memory = FakeMemory()
    memory.u64(HIGH_MEMORY_AT, IDENTITY_END)
    memory.table(ROOT, root_kind)
    memory.table(SEGMENT_TABLE, "segment")
    memory.u64(ROOT + ((VMEMMAP >> 31) & 0x7FF) * 8, SEGMENT_TABLE | TT["region-third"] | 3)
    memory.u64(SEGMENT_TABLE + ((VMEMMAP >> 20) & 0x7FF) * 8, PAGE_TABLE)
    for i in range(256):
        memory.u64(PAGE_TABLE + 8 * i, 0x400)  # invalid
    memory.u64(PAGE_TABLE + ((VMEMMAP >> 12) & 0xFF) * 8, 0x0ABC_D000)
    return memory


def test_walk_through_region_third_segment_and_page_table():
    memory = three_levels()
    t = S390xTranslator(memory.read_physical, INFO)
    assert (t.byte_order, t.identity_end) == ("big", IDENTITY_END)
    assert t.translate(VMEMMAP + 0x123) == (0x0ABC_D123, 0x1000 - 0x123)
    assert t.to_physical(0x0123_4567) == 0x0123_4567  # the identity map needs no tables


def test_deeper_roots_walk_down_to_the_same_tables():
    memory = three_levels()
    # a region-second root above the region-third table (copied to 0x180000)
    for i in range(2048):
        memory.u64(0x180000 + 8 * i, int.from_bytes(memory.read_physical(ROOT + 8 * i, 8), "big"))
    memory.table(ROOT, "region-second", 2048)
    memory.u64(ROOT + ((VMEMMAP >> 42) & 0x7FF) * 8, 0x180000 | TT["region-second"] | 3)
    t = S390xTranslator(memory.read_physical, INFO)
    assert t.to_physical(VMEMMAP + 8) == 0x0ABC_D008
    with pytest.raises(BadSource, match="region-second entry .* is invalid"):
        t.to_physical(1 << 50)  # a region-second index with no table


@pytest.mark.parametrize("level, size", [("segment", 1 << 20), ("region-third", 1 << 31)])
def test_large_frames(level, size):
    memory = three_levels()
    vaddr = VMEMMAP + 5 * size if level == "segment" else 7 * size
    if level == "segment":
        memory.u64(SEGMENT_TABLE + ((vaddr >> 20) & 0x7FF) * 8, 0x0650_0000 | LARGE)
        frame = 0x0650_0000
    else:
        memory.u64(ROOT + ((vaddr >> 31) & 0x7FF) * 8, 0x1_8000_0000 | LARGE | TT["region-third"])
        frame = 0x1_8000_0000
    t = S390xTranslator(memory.read_physical, INFO)
    assert t.translate(vaddr + 0x54321) == (frame + 0x54321, size - 0x54321)


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.u64(ROOT + ((VMEMMAP >> 31) & 0x7FF) * 8, TT["region-third"] | INVALID),
     r"region-third entry 0x24 at paddr .* is invalid"),
    (lambda m: m.u64(ROOT + ((VMEMMAP >> 31) & 0x7FF) * 8, SEGMENT_TABLE | TT["region-third"] | 3 | 0x40),
     "has reserved bits set"),
    (lambda m: m.u64(SEGMENT_TABLE + ((VMEMMAP >> 20) & 0x7FF) * 8, INVALID),
     r"segment entry 0x20 .* is invalid"),
    (lambda m: m.u64(ROOT + ((VMEMMAP >> 31) & 0x7FF) * 8, SEGMENT_TABLE | TT["region-second"] | 3),
     "is invalid"),  # a region-third table holding a region-second entry
    (lambda m: m.u64(PAGE_TABLE + ((VMEMMAP >> 12) & 0xFF) * 8, 0x0ABC_D000 | 0x400),
     "page table entry 0xabcd400 .* is invalid"),
    (lambda m: m.u64(PAGE_TABLE + ((VMEMMAP >> 12) & 0xFF) * 8, 0x0ABC_D000 | 0x800),
     "page table entry 0xabcd800 .* is invalid"),
    (lambda m: m.u64(ROOT + ((VMEMMAP >> 31) & 0x7FF) * 8, SEGMENT_TABLE | TT["region-third"] | 0),
     r"index 1 is beyond the segment table at paddr 0x200000 \(length 0\)"),
])
def test_bad_entries_are_bad_source_not_tracebacks(damage, message):
    memory = three_levels()
    if "beyond the segment" in message:
        vaddr = VMEMMAP + (1 << 29)  # segment index 512: past a one-page (TL=0) segment table
        memory.u64(ROOT + ((vaddr >> 31) & 0x7FF) * 8, SEGMENT_TABLE | TT["region-third"] | 0)
        message = message.replace("index 1", "index 512")
    else:
        vaddr = VMEMMAP
        damage(memory)
    with pytest.raises(BadSource, match=message):
        S390xTranslator(memory.read_physical, INFO).to_physical(vaddr)


def test_address_beyond_the_root_and_kernels_vmcap_does_not_know():
    memory = three_levels()
    with pytest.raises(BadSource, match="beyond the region-third table at the root"):
        S390xTranslator(memory.read_physical, INFO).to_physical(1 << 42)
    # 6.10+ "-vr" kernels say so in os_info (lowcore 0xe18): KASLR_OFFSET set
    memory.u64(0xE18, 0x5000)
    memory.u64(0x5000 + 32 + 5 * 20, 0x3FFF_E000_0000)
    with pytest.raises(Unsupported, match="virtual kernel image"):
        make_translator(memory.read_physical, INFO, "EM_S390")
    info = dict(INFO)
    del info["SYMBOL(high_memory)"]
    with pytest.raises(Unsupported, match=r"EM_S390 kernel virtual addresses: .*SYMBOL\(high_memory\)"):
        make_translator(three_levels().read_physical, info, "EM_S390")


# --- the real dump: a big-endian target end to end ------------------------------------------


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return real_dump("s390x", tmp_path_factory)


def test_real_dmesg_is_byte_identical_to_makedumpfile(dump):
    done = run_vmcap("dmesg", "--vmcoreinfo", dump.vmcoreinfo, dump.elf)
    assert done.stdout == dump.dmesg
    assert b"VMCAPLAB-MARKER" in done.stdout


def test_real_inspect_reads_big_endian_headers_and_notes(dump):
    described = json.loads(run_vmcap("inspect", "--json", "--vmcoreinfo", dump.vmcoreinfo, dump.elf).stdout)
    assert (described["byte_order"], described["kernel_byte_order"], described["arch"]) == ("big", "big", "s390x")
    assert described["cpus"] == 1
    assert described["osrelease"] == "6.1.0-50-s390x"


@pytest.fixture(scope="module")
def kdump_d31(dump, tmp_path_factory):
    out = tmp_path_factory.mktemp("s390x-out") / "d31.kdump"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", "kdump", "-d", "31", dump.elf, out)
    return out


def test_real_d31_keeps_exactly_the_pages_makedumpfile_keeps(dump, kdump_d31):
    assert kept_ranges(str(kdump_d31)) == dump.d31_ranges


@pytest.mark.parametrize("level", [2, 4, 8, 16])
def test_real_single_levels_keep_what_makedumpfile_keeps(dump, tmp_path, level):
    check_single_level(dump, tmp_path, level)


def test_real_kdump_output_is_big_endian_verifies_and_reads_back(dump, kdump_d31):
    from vmcap.formats.elf import iter_note_spans
    from vmcap.formats.kdump import KdumpReader
    from vmcap.kernel.vmcoreinfo import read_vmcoreinfo_file
    from vmcap.source.dump import open_dump

    reader = KdumpReader(str(kdump_d31))
    try:
        assert (reader.header.byte_order, reader.header.machine) == ("big", "s390x")
        names = [span.name for span in iter_note_spans(reader.notes, "big")]
        assert "VMCOREINFO" in names and "CORE" in names
        with open_dump(str(dump.elf), vmcoreinfo=read_vmcoreinfo_file(str(dump.vmcoreinfo))) as source:
            start, end = dump.d31_ranges[-1]
            for pfn in (dump.d31_ranges[0][0], start, end - 1):
                assert reader.read_page(pfn) == source.physical.read(pfn * 4096, 4096)
    finally:
        reader.close()
    assert run_vmcap("verify", kdump_d31).returncode == 0
    assert run_vmcap("dmesg", kdump_d31).stdout == dump.dmesg


@pytest.mark.parametrize("fmt", ["elf", "zelf"])
def test_real_elf_outputs_verify_and_read_back(dump, tmp_path, fmt):
    out = tmp_path / f"d31.{fmt}"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", fmt, "-d", "31", dump.elf, out)
    assert run_vmcap("verify", out).returncode == 0
    assert run_vmcap("dmesg", out).stdout == dump.dmesg
    if fmt == "elf":
        with open(out, "rb") as f:
            assert f.read(6)[5] == 2  # EI_DATA: ELFDATA2MSB


@pytest.mark.parametrize("fmt", ["elf", "kdump"])
def test_real_outputs_are_read_by_drgn(dump, tmp_path, fmt):
    prog, name, info = drgn_on_output(dump, tmp_path, fmt)
    import drgn

    assert prog.platform.arch == drgn.Architecture.S390X
    assert prog.read(name, 65).rstrip(b"\0") == b"Linux"
    assert prog.read(name + 2 * 65, 65).rstrip(b"\0").decode() == info["OSRELEASE"]


def test_cli_on_a_big_endian_s390x_sample_without_tables(make_vmcore):
    """A big-endian s390x dump whose VMCOREINFO lacks what the walk needs: exit 8 and one line;
    saving it at -d 31 falls back (no --strict) and the output verifies."""
    from vmcap.kernel.arch import EM_S390
    from vmcap.sample import RamRange

    from conftest import spec

    info = {"OSRELEASE": "6.1.0-test", "PAGESIZE": "4096", "SYMBOL(prb)": "e63e08"}
    path, _ = make_vmcore(spec([RamRange(0, 4 << 20)], machine=EM_S390, byte_order="big", content="pattern",
                               vmcoreinfo=info))
    done = run_vmcap("dmesg", path, check=False)
    assert done.returncode == 8
    assert done.stderr.decode().splitlines() == [
        "vmcap: error: EM_S390 kernel virtual addresses: VMCOREINFO lacks SYMBOL(swapper_pg_dir)"]
    described = json.loads(run_vmcap("inspect", "--json", path).stdout)
    assert (described["byte_order"], described["kernel_byte_order"], described["arch"]) == ("big", "big", "s390x")


def test_real_log_levels_read_from_big_endian_bit_fields(dump):
    """printk_info's "u8 flags:5, level:3" is packed from the high bit on s390x: the marker line
    that /init wrote to /dev/kmsg with <5> is level 5, facility 1 (user); the panic is level 0."""
    from vmcap.kernel.vmcoreinfo import read_vmcoreinfo_file
    from vmcap.source.dump import kernel_log, open_dump

    with open_dump(str(dump.elf), vmcoreinfo=read_vmcoreinfo_file(str(dump.vmcoreinfo))) as source:
        records = kernel_log(source)
    marker = [(r.level, r.facility) for r in records if b"VMCAPLAB-MARKER" in r.text]
    panic = [(r.level, r.facility) for r in records if r.text.startswith(b"Kernel panic")]
    assert (marker, panic) == ([(5, 1)], [(0, 0)])


def test_real_makedumpfile_reads_vmcaps_elf_output_without_the_vmcoreinfo_file(dump, tmp_path):
    check_foreign_makedumpfile_reads_elf_output(dump, tmp_path, "s390x")


def test_real_kernel_without_max_physmem_bits_gets_the_same_pages(dump, tmp_path):
    check_without_max_physmem_bits(dump, tmp_path)
