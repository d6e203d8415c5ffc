"""ppc64 kernel virtual addresses (vmcap/kernel/ppc64.py): synthetic page tables and real dumps.

The real dumps (tests/data/ppc64-{radix,hash}.*, see tests/arch/regen-ppc64-s390x.sh) are
Debian 6.1 ppc64el guests under QEMU pseries (POWER9, radix MMU, and disable_radix for hash),
whose ELF headers QEMU 7.2 wrote big-endian over little-endian memory. ppc64-powernv (bare-metal
radix, 1 GiB, not committed) is tested where the script has made it.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from vmcap.errors import BadSource, Unsupported
from vmcap.kernel.arch import make_translator
from vmcap.kernel.ppc64 import (
    ENTRY_LEAF,
    ENTRY_PRESENT,
    PAGE_OFFSET,
    Ppc64Translator,
    ppc64_kernel_byte_order,
    ppc64_levels,
)

from conftest import have

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

PAGE = 65536
ROOT = 0x100000  # swapper_pg_dir's paddr in the synthetic memory
PRB = 0x200000


class FakeMemory(SparseMemory):
    """Sparse physical memory: what the translator reads, nothing else (unwritten bytes are 0)."""

    def __init__(self, size: int = 64 << 20):
        super().__init__(size)


def vmcoreinfo(**extra) -> dict[str, str]:
    info = {"PAGESIZE": str(PAGE), "SYMBOL(_stext)": f"{PAGE_OFFSET:x}",
            "SYMBOL(swapper_pg_dir)": f"{PAGE_OFFSET + ROOT:x}", "SYMBOL(prb)": f"{PAGE_OFFSET + PRB:x}"}
    info.update(extra)
    return info


def build_radix(memory: FakeMemory, mappings, *, radix: bool = True):
    """Page tables under ROOT for mappings [(vaddr, paddr, level)] where level names the leaf."""
    levels = ppc64_levels("radix" if radix else "hash", PAGE)
    next_table = [0x400000]
    tables: dict[tuple, int] = {(): ROOT}

    def table_for(path):
        if path not in tables:
            tables[path] = next_table[0]
            next_table[0] += PAGE
        return tables[path]

    for vaddr, paddr, leaf_level in mappings:
        path: tuple = ()
        for depth, level in enumerate(levels):
            index = (vaddr >> level.shift) & (level.entries - 1)
            slot = table_for(path) + index * 8
            if level.name == leaf_level:
                memory.u64(slot, ENTRY_PRESENT | ENTRY_LEAF | paddr | 0x10E, "big")
                break
            child = table_for(path + (index,))
            nls = levels[depth + 1].entries.bit_length() - 1 if radix else 0
            memory.u64(slot, ENTRY_PRESENT | child | nls, "big")
            path += (index,)
    memory.u64(PRB, PAGE_OFFSET + PRB + 0x100, "little")


VMALLOC = 0xC008_0000_1234_0000


@pytest.mark.parametrize("radix", [True, False], ids=["radix", "hash"])
def test_walk_reaches_a_64k_page_through_four_levels_of_big_endian_entries(radix):
    memory = FakeMemory()
    build_radix(memory, [(VMALLOC, 0x0777_0000, "PTE")], radix=radix)
    t = Ppc64Translator(memory.read_physical, vmcoreinfo(**{"NUMBER(RADIX_MMU)": str(int(radix))}))
    assert t.mmu == ("radix" if radix else "hash")
    assert t.to_physical(VMALLOC + 0x1234) == 0x0777_1234
    assert t.translate(VMALLOC + 0x1234)[1] == PAGE - 0x1234


def test_mmu_told_by_next_level_size_bits_when_vmcoreinfo_does_not_say():
    for radix in (True, False):
        memory = FakeMemory()
        build_radix(memory, [(VMALLOC, 0x0777_0000, "PTE")], radix=radix)
        t = Ppc64Translator(memory.read_physical, vmcoreinfo())
        assert t.mmu == ("radix" if radix else "hash")
        assert t.to_physical(VMALLOC) == 0x0777_0000


@pytest.mark.parametrize("leaf, size", [("PMD", 2 << 20), ("PUD", 1 << 30)])
def test_huge_leaf_above_the_last_level_maps_its_whole_span(leaf, size):
    memory = FakeMemory(size=8 << 30)
    vaddr = 0xC008_0000_0000_0000 + 3 * size
    build_radix(memory, [(vaddr, 2 * size, leaf)])
    t = Ppc64Translator(memory.read_physical, vmcoreinfo(**{"NUMBER(RADIX_MMU)": "1"}))
    assert t.translate(vaddr + 0x12345) == (2 * size + 0x12345, size - 0x12345)
    # read_virtual reads a whole huge page in one physical read
    memory.reads.clear()
    t.read_virtual(vaddr, size // 2)
    assert memory.reads == [(2 * size, size // 2)]


@pytest.mark.parametrize("cut", ["PGD", "PUD", "PMD", "PTE"])
def test_entry_not_present_at_any_level_is_bad_source_naming_it(cut):
    memory = FakeMemory()
    build_radix(memory, [(VMALLOC, 0x0777_0000, "PTE")])
    t = Ppc64Translator(memory.read_physical, vmcoreinfo(**{"NUMBER(RADIX_MMU)": "1"}))
    # clear the entry at level `cut` on the way to VMALLOC
    table = ROOT
    for level in t.levels:
        slot = table + ((VMALLOC >> level.shift) & (level.entries - 1)) * 8
        entry = int.from_bytes(memory.read_physical(slot, 8), "big")
        if level.name == cut:
            memory.u64(slot, entry & ~ENTRY_PRESENT, "big")
            break
        table = entry & 0x00FF_FFFF_FFFF_FF00
    t._tables.clear()
    with pytest.raises(BadSource, match=rf"vaddr {VMALLOC:#x} not mapped: {cut} entry"):
        t.to_physical(VMALLOC)


def test_linear_map_needs_no_tables_and_other_addresses_are_refused():
    memory = FakeMemory()
    build_radix(memory, [])
    t = Ppc64Translator(memory.read_physical, vmcoreinfo())
    assert t.to_physical(PAGE_OFFSET + 0x1234_5678) == 0x1234_5678
    with pytest.raises(BadSource, match="not a ppc64 kernel address"):
        t.to_physical(0x1000)
    with pytest.raises(BadSource, match="PGD entry 0x0"):
        t.to_physical(VMALLOC)


def _vmemmap_info(memory: FakeMemory, blocks, *, shift=24, looped=False) -> dict[str, str]:
    """vmemmap_list of blocks [(virt, phys)] at 0x300000, mmu_psize_defs[psize].shift = shift."""
    node_at = [0x300000 + 24 * i for i in range(len(blocks))]
    for i, (virt, phys) in enumerate(blocks):
        nxt = PAGE_OFFSET + node_at[i + 1] if i + 1 < len(blocks) else (PAGE_OFFSET + node_at[0] if looped else 0)
        memory.write(node_at[i], struct.pack("<QQQ", nxt, phys, virt))
    memory.u64(0x310000, PAGE_OFFSET + node_at[0], "little")  # vmemmap_list
    memory.write(0x310010, struct.pack("<i", 2))  # mmu_vmemmap_psize
    memory.write(0x320000 + 2 * 96, struct.pack("<i", shift))  # mmu_psize_defs[2].shift
    return vmcoreinfo(**{
        "SYMBOL(vmemmap_list)": f"{PAGE_OFFSET + 0x310000:x}",
        "SYMBOL(mmu_vmemmap_psize)": f"{PAGE_OFFSET + 0x310010:x}",
        "SYMBOL(mmu_psize_defs)": f"{PAGE_OFFSET + 0x320000:x}", "SIZE(vmemmap_backing)": "24",
        "OFFSET(vmemmap_backing.list)": "0", "OFFSET(vmemmap_backing.phys)": "8",
        "OFFSET(vmemmap_backing.virt_addr)": "16", "SIZE(mmu_psize_def)": "96", "OFFSET(mmu_psize_def.shift)": "0"})


@pytest.mark.parametrize("looped", [False, True], ids=["ends", "loops"])
def test_vmemmap_list_translates_struct_pages_as_makedumpfile_does(looped):
    memory = FakeMemory()
    build_radix(memory, [])
    v0 = 0xC00C_0000_0000_0000
    info = _vmemmap_info(memory, [(v0 + (1 << 24), 0x0300_0000), (v0, 0x0200_0000)], looped=looped)
    t = Ppc64Translator(memory.read_physical, info)
    assert t.translate(v0 + 0x40) == (0x0200_0040, (1 << 24) - 0x40)
    assert t.to_physical(v0 + (1 << 24) + 8) == 0x0300_0008
    with pytest.raises(BadSource, match="no vmemmap_list block"):
        t.to_physical(v0 + (2 << 24))


def test_vmemmap_page_shift_out_of_range_is_bad_source():
    memory = FakeMemory()
    build_radix(memory, [])
    info = _vmemmap_info(memory, [(0xC00C_0000_0000_0000, 0x0200_0000)], shift=63)
    t = Ppc64Translator(memory.read_physical, info)
    assert t.to_physical(PAGE_OFFSET + 0x1000) == 0x1000  # the linear map needs no vmemmap_list
    with pytest.raises(BadSource, match="vmemmap page shift 63"):
        t.to_physical(0xC00C_0000_0000_0000)
    info["OFFSET(vmemmap_backing.virt_addr)"] = "20"
    with pytest.raises(BadSource, match=r"OFFSET\(vmemmap_backing.virt_addr\)=20 does not fit"):
        Ppc64Translator(memory.read_physical, info).to_physical(0xC00C_0000_0000_0000)


def test_kernel_byte_order_is_read_from_a_pointer_variable():
    memory = FakeMemory()
    info = vmcoreinfo()
    memory.u64(PRB, PAGE_OFFSET + 0x1000, "little")
    assert ppc64_kernel_byte_order(memory.read_physical, info, "big") == "little"
    memory.u64(PRB, PAGE_OFFSET + 0x1000, "big")
    assert ppc64_kernel_byte_order(memory.read_physical, info, "little") == "big"
    memory.u64(PRB, 0, "big")  # nothing to tell by: the header's order stays
    assert ppc64_kernel_byte_order(memory.read_physical, info, "big") == "big"
    # 0xc0000000000004c0 reads as a linear address both ways (0xc0040000000000c0 big-endian):
    # prb == printk_rb_static decides
    memory.u64(PRB, PAGE_OFFSET + 0x4C0, "little")
    assert ppc64_kernel_byte_order(memory.read_physical, info, "big") == "big"
    info["SYMBOL(printk_rb_static)"] = f"{PAGE_OFFSET + 0x4C0:x}"
    assert ppc64_kernel_byte_order(memory.read_physical, info, "big") == "little"


def test_missing_or_misplaced_keys_are_clear_errors():
    memory = FakeMemory()
    build_radix(memory, [])
    info = vmcoreinfo()
    del info["SYMBOL(swapper_pg_dir)"]
    with pytest.raises(Unsupported, match=r"EM_PPC64 kernel virtual addresses: .*SYMBOL\(swapper_pg_dir\)"):
        make_translator(memory.read_physical, info, "EM_PPC64")
    with pytest.raises(BadSource, match="not in the ppc64 linear map"):
        Ppc64Translator(memory.read_physical, vmcoreinfo(**{"SYMBOL(swapper_pg_dir)": "ffff800010000000"}))
    with pytest.raises(BadSource, match="not a ppc64 page size"):
        Ppc64Translator(memory.read_physical, vmcoreinfo(PAGESIZE="16384"))
    short = FakeMemory(size=ROOT + 8)  # the root table runs past the dump: only walks fail
    t = Ppc64Translator(short.read_physical, vmcoreinfo())
    assert t.to_physical(PAGE_OFFSET + 8) == 8
    with pytest.raises(BadSource, match="is not in the dump"):
        t.to_physical(VMALLOC)
    with pytest.raises(BadSource, match="NUMBER\\(vmalloc_start\\)"):
        Ppc64Translator(memory.read_physical, vmcoreinfo(**{"NUMBER(vmalloc_start)": "4096"}))


# --- the real dumps --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ppc64-radix", "ppc64-hash", "ppc64-powernv"])
def dump(request, tmp_path_factory):
    return real_dump(request.param, tmp_path_factory)


def test_real_dmesg_is_byte_identical_to_makedumpfile(dump):
    done = run_vmcap("dmesg", "--vmcoreinfo", dump.vmcoreinfo, dump.elf)
    assert done.stdout == dump.dmesg
    assert b"VMCAPLAB-MARKER" in done.stdout


def test_real_mmu_and_byte_orders(dump):
    from vmcap.kernel.vmcoreinfo import read_vmcoreinfo_file
    from vmcap.source.dump import open_dump

    with open_dump(str(dump.elf), vmcoreinfo=read_vmcoreinfo_file(str(dump.vmcoreinfo))) as opened:
        t = make_translator(opened.physical.read, opened.vmcoreinfo, opened.platform)
        assert (t.mmu, t.byte_order) == ("hash" if dump.name == "ppc64-hash" else "radix", "little")
        blocks, block_size = t.vmemmap_blocks
        assert blocks and block_size in (1 << 16, 1 << 21, 1 << 24)
        if t.mmu == "radix":
            # The radix tables map the linear map and vmemmap too: the walk agrees with
            # the linear rule and with vmemmap_list, pages apart.
            for virt, phys in blocks:
                for offset in (0, block_size // 3 & ~7, block_size - 8):
                    assert t.walk_page_tables(virt + offset)[0] == phys + offset
            for paddr in (0, 0x123_4560, 0x0FFF_FFF8):
                assert t.walk_page_tables(PAGE_OFFSET + paddr)[0] == paddr
    report = run_vmcap("inspect", "--json", "--vmcoreinfo", dump.vmcoreinfo, dump.elf).stdout
    import json

    described = json.loads(report)
    # QEMU 7.2 writes pseries headers big-endian; powernv ones little-endian
    header = "little" if dump.name == "ppc64-powernv" else "big"
    assert (described["byte_order"], described["kernel_byte_order"], described["arch"]) == (header, "little", "ppc64le")


@pytest.mark.parametrize("level", [2, 4, 8, 16])
def test_real_single_levels_keep_what_makedumpfile_keeps(dump, tmp_path, level):
    check_single_level(dump, tmp_path, level)


def test_real_d31_keeps_exactly_the_pages_makedumpfile_keeps(dump, tmp_path):
    out = tmp_path / "d31.kdump"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "--format", "kdump", "-d", "31", dump.elf, out)
    assert kept_ranges(str(out)) == dump.d31_ranges
    # the output follows the kernel (little-endian ppc64le), not QEMU's big-endian headers
    from vmcap.formats.kdump import KdumpReader

    reader = KdumpReader(str(out))
    try:
        assert (reader.header.byte_order, reader.header.machine) == ("little", "ppc64le")
    finally:
        reader.close()
    assert run_vmcap("verify", out).returncode == 0
    assert run_vmcap("dmesg", out).stdout == dump.dmesg


@pytest.mark.skipif(not have("zstd"), reason="zstd CLI")
def test_real_zelf_output_reads_back(dump, tmp_path):
    out = tmp_path / "d31.zelf"
    run_vmcap("save", "-q", "--vmcoreinfo", dump.vmcoreinfo, "-d", "31", dump.elf, out)
    assert run_vmcap("verify", "--vmcoreinfo", dump.vmcoreinfo, out).returncode == 0
    assert run_vmcap("dmesg", out).stdout == dump.dmesg


def test_real_kdump_output_is_read_by_drgn(dump, tmp_path):
    prog, name, info = drgn_on_output(dump, tmp_path, "kdump")
    import drgn

    assert prog.platform.arch == drgn.Architecture.PPC64
    assert prog.platform.flags & drgn.PlatformFlags.IS_LITTLE_ENDIAN
    release = prog.read(name + 2 * 65, 65).rstrip(b"\0").decode()
    assert release == info["OSRELEASE"]


def test_cli_reports_a_damaged_ppc64_dump_in_one_line(make_vmcore, tmp_path):
    """A ppc64 dump whose prb pointer is 0: exit 3 and one line, no traceback."""
    from vmcap.kernel.arch import EM_PPC64
    from vmcap.sample import RamRange

    from conftest import spec

    info = {"OSRELEASE": "6.1.0-test", "PAGESIZE": "65536", "SYMBOL(_stext)": f"{PAGE_OFFSET:x}",
            "SYMBOL(swapper_pg_dir)": f"{PAGE_OFFSET + 0x10000:x}", "SYMBOL(prb)": f"{PAGE_OFFSET + 0x20000:x}",
            "SIZE(printk_ringbuffer)": "80", "SIZE(prb_desc)": "24", "SIZE(printk_info)": "88",
            "OFFSET(printk_ringbuffer.desc_ring)": "0", "OFFSET(printk_ringbuffer.text_data_ring)": "48",
            "OFFSET(prb_desc_ring.count_bits)": "0", "OFFSET(prb_desc_ring.descs)": "8",
            "OFFSET(prb_desc_ring.infos)": "16", "OFFSET(prb_desc_ring.head_id)": "24",
            "OFFSET(prb_desc_ring.tail_id)": "32", "OFFSET(prb_data_ring.size_bits)": "0",
            "OFFSET(prb_data_ring.data)": "8", "OFFSET(prb_desc.state_var)": "0",
            "OFFSET(prb_desc.text_blk_lpos)": "8", "OFFSET(prb_data_blk_lpos.begin)": "0",
            "OFFSET(prb_data_blk_lpos.next)": "8", "OFFSET(printk_info.seq)": "0",
            "OFFSET(printk_info.ts_nsec)": "8", "OFFSET(printk_info.text_len)": "16",
            "OFFSET(printk_info.caller_id)": "20", "OFFSET(printk_info.dev_info)": "24",
            "OFFSET(atomic_long_t.counter)": "0", "OFFSET(printk_info.facility)": "18",
            "OFFSET(printk_info.flags)": "19", "OFFSET(printk_info.level)": "19"}
    path, _ = make_vmcore(spec([RamRange(0, 1 << 20)], page_size=PAGE, machine=EM_PPC64, content="zero",
                               vmcoreinfo=info))
    done = run_vmcap("dmesg", path, check=False)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 3, done.stderr
    assert len(lines) == 1 and lines[0].startswith("vmcap: error:"), lines
    assert "0x0 is not a ppc64 kernel address" in lines[0], lines
    del info["SYMBOL(swapper_pg_dir)"]
    path, _ = make_vmcore(spec([RamRange(0, 1 << 20)], page_size=PAGE, machine=EM_PPC64, content="zero",
                               vmcoreinfo=info))
    done = run_vmcap("dmesg", path, check=False)
    assert done.returncode == 8
    assert done.stderr.decode().splitlines() == [
        "vmcap: error: EM_PPC64 kernel virtual addresses: VMCOREINFO lacks SYMBOL(swapper_pg_dir)"]


def test_real_log_levels(dump):
    """The marker line /init wrote to /dev/kmsg with <5>: level 5, facility 1 (little-endian bit-fields)."""
    from vmcap.kernel.vmcoreinfo import read_vmcoreinfo_file
    from vmcap.source.dump import kernel_log, open_dump

    with open_dump(str(dump.elf), vmcoreinfo=read_vmcoreinfo_file(str(dump.vmcoreinfo))) as source:
        records = kernel_log(source)
    assert [(r.level, r.facility) for r in records if b"VMCAPLAB-MARKER" in r.text] == [(5, 1)]


def test_real_makedumpfile_reads_vmcaps_elf_output_without_the_vmcoreinfo_file(dump, tmp_path):
    check_foreign_makedumpfile_reads_elf_output(dump, tmp_path, "ppc64el")


def test_real_kernel_without_max_physmem_bits_gets_the_same_pages(dump, tmp_path):
    check_without_max_physmem_bits(dump, tmp_path)


def test_note_headers_are_turned_around_descriptors_kept():
    from vmcap.formats.elf import build_note, iter_note_spans, reencode_note_headers

    notes = build_note(b"CORE", 1, b"\x01\x02\x03", "big") + build_note(b"VMCOREINFO", 0, b"OSRELEASE=x\n", "big")
    turned = reencode_note_headers(notes, "big", "little")
    assert len(turned) == len(notes)
    spans = [(s.name, s.type, turned[s.desc_offset:s.desc_offset + s.desc_size])
             for s in iter_note_spans(turned, "little")]
    assert spans == [("CORE", 1, b"\x01\x02\x03"), ("VMCOREINFO", 0, b"OSRELEASE=x\n")]
