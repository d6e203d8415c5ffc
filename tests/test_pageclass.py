"""Dump levels 2/4/8/16: struct page classification as makedumpfile does it.

Synthetic struct-page arrays (laid out by a VMCOREINFO made up here, with
the real 6.1 offsets) check each rule on its own; the real 6.1 dump checks
the whole path against makedumpfile 1.7.2, count for count and pfn for pfn.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcap.errors import BadSource, Unsupported
from vmcap.fileio.mmapio import FileSource
from vmcap.kernel.pageclass import (
    CACHE,
    FREE,
    KEPT,
    USER,
    MemMapRun,
    accept_claims,
    classify_mem_map,
    classify_pages,
    kernel_version,
    mem_map_runs,
    mem_usage,
    page_claims,
    page_rules,
    struct_page_dtype,
)
from vmcap.source.dump import ElfMemory
from vmcap.source.layout import read_layout

PAGE = 4096
STRUCT_PAGE = 64
VMEMMAP = 0xFFFF_EA00_0000_0000
DIRECT_MAP = 0xFFFF_8880_0000_0000
ADDRESS_SPACE = DIRECT_MAP + 0x1234_5000  # a struct address_space *
ANON_VMA = DIRECT_MAP + 0x2345_6000      # a struct anon_vma *
KMEM_CACHE = DIRECT_MAP + 0x3456_7000    # a struct kmem_cache *
NO_PAGE_TYPE = 0xFFFF_FFFF               # _mapcount == -1

# The keys and values Debian's 6.1.0-56-amd64 writes (see the real dump).
INFO_6_1 = {
    "OSRELEASE": "6.1.0-56-amd64",
    "PAGESIZE": "4096",
    "SIZE(page)": "64",
    "OFFSET(page.flags)": "0",
    "OFFSET(page._refcount)": "52",
    "OFFSET(page.mapping)": "24",
    "OFFSET(page.lru)": "8",
    "OFFSET(page._mapcount)": "48",
    "OFFSET(page.private)": "40",
    "OFFSET(page.compound_dtor)": "16",
    "OFFSET(page.compound_order)": "17",
    "OFFSET(page.compound_head)": "8",
    "LENGTH(zone.free_area)": "11",
    "NUMBER(PG_lru)": "4",
    "NUMBER(PG_private)": "13",
    "NUMBER(PG_swapcache)": "10",
    "NUMBER(PG_swapbacked)": "19",
    "NUMBER(PG_slab)": "9",
    "NUMBER(PG_hwpoison)": "23",
    "NUMBER(PG_head_mask)": "65536",
    "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129",
    "NUMBER(HUGETLB_PAGE_DTOR)": "2",
    "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)": "-257",
}
PG_LRU, PG_PRIVATE, PG_SWAPCACHE, PG_SWAPBACKED, PG_SLAB, PG_HWPOISON = 4, 13, 10, 19, 9, 23
PG_HEAD = 1 << 16
BUDDY, OFFLINE = -129 & 0xFFFF_FFFF, -257 & 0xFFFF_FFFF
COMPOUND_PAGE_DTOR, HUGETLB_PAGE_DTOR = 1, 2


def changed_info(*removed: str, **added: str) -> dict[str, str]:
    """INFO_6_1 without the removed keys; added keys are spelled NUMBER_PG_hugetlb -> NUMBER(PG_hugetlb)."""
    info = {key: value for key, value in INFO_6_1.items() if key not in removed}
    for spelled, value in added.items():
        kind, name = spelled.split("_", 1)
        info[f"{kind}({name})"] = value
    return info


# The kernel's side: every struct page field a 6.1 kernel writes that the rules read.
KERNEL_PAGE = np.dtype({
    "names": ["flags", "compound_head", "compound_dtor", "compound_order", "mapping", "private", "mapcount"],
    "formats": ["<u8", "<u8", "u1", "u1", "<u8", "<u8", "<u4"],
    "offsets": [0, 8, 16, 17, 24, 40, 48],
    "itemsize": STRUCT_PAGE,
})


class MemMap:
    """struct pages for pfns [0, count) as a 6.1 kernel would leave them, plus a fake vmemmap."""

    def __init__(self, count: int):
        self.pages = np.zeros(count, dtype=KERNEL_PAGE)
        self.pages["mapcount"] = NO_PAGE_TYPE
        self.reads: list[tuple[int, int]] = []

    def free_block(self, pfn: int, order: int) -> None:
        # __free_one_page: the first page carries the buddy type and the order.
        self.pages[pfn]["mapcount"] = BUDDY
        self.pages[pfn]["private"] = order

    def compound(self, head: int, order: int, dtor: int = COMPOUND_PAGE_DTOR) -> None:
        self.pages[head]["flags"] |= PG_HEAD
        self.pages[head + 1]["compound_dtor"] = dtor
        self.pages[head + 1]["compound_order"] = order
        self.pages["compound_head"][head + 1:head + (1 << order)] = (VMEMMAP + head * STRUCT_PAGE) | 1

    def cache(self, pfn: int, *extra_flag_bits: int) -> None:
        self.pages[pfn]["flags"] |= sum(1 << bit for bit in (PG_LRU, *extra_flag_bits))
        self.pages[pfn]["mapping"] = ADDRESS_SPACE

    def anon(self, pfn: int) -> None:
        self.pages[pfn]["flags"] |= 1 << PG_LRU | 1 << PG_SWAPBACKED
        self.pages[pfn]["mapping"] = ANON_VMA | 1

    def slab(self, pfn: int) -> None:
        self.pages[pfn]["flags"] |= 1 << PG_SLAB
        self.pages[pfn]["mapping"] = KMEM_CACHE  # struct slab.slab_cache overlays mapping

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        self.reads.append((vaddr, size))
        start = vaddr - VMEMMAP
        raw = self.pages.tobytes()
        if start < 0 or start + size > len(raw):
            raise BadSource(f"vaddr {vaddr:#x} not mapped")
        return raw[start:start + size]

    def classify(self, dump_level: int, info: dict[str, str] = INFO_6_1, **kwargs):
        rules = page_rules(info, dump_level)
        runs = (MemMapRun(0, len(self.pages), VMEMMAP),)
        kwargs.setdefault("max_pfn", len(self.pages))
        return classify_mem_map(self.read_virtual, runs, rules, **kwargs)


def excluded_pfns(result) -> list[int]:
    return np.flatnonzero(result.excluded.to_array()).tolist()


def counts(result) -> dict[str, int]:
    return {name: n for name, n in result.counts.classes.items() if n}


def counts_and_total(result) -> dict[str, int]:
    """The classes and the pages looked at, as makedumpfile's report lists them."""
    return {**result.counts.classes, "total_pages": result.counts.total_pages}


# --- free pages ---------------------------------------------------------------


def test_buddy_block_of_order_3_excludes_8_pfns_as_free():
    mem = MemMap(1024)
    mem.free_block(16, 3)
    result = mem.classify(16)
    assert excluded_pfns(result) == list(range(16, 24))
    assert counts(result) == {"free": 8}
    assert result.counts.total_pages == 1024


def test_free_pages_are_kept_without_bit_16():
    mem = MemMap(1024)
    mem.free_block(16, 3)
    assert counts(mem.classify(15)) == {}


def test_buddy_order_beyond_free_area_keeps_the_page():
    # makedumpfile: "Invalid free page order" warning, page kept.
    mem = MemMap(1024)
    mem.free_block(0, 11)
    mem.cache(0)  # nor is it tested as anything else
    assert counts(mem.classify(31)) == {}


def test_slab_page_with_buddy_page_type_is_not_free():
    mem = MemMap(512)
    mem.free_block(4, 0)
    mem.slab(4)
    assert counts(mem.classify(31)) == {}


def test_pages_inside_an_excluded_block_are_not_looked_at():
    # A stale buddy mark and an LRU flag inside a free order-4 block: the walk
    # jumps over the block, so they count as part of it, once.
    mem = MemMap(512)
    mem.free_block(32, 4)
    mem.free_block(40, 2)
    mem.cache(33)
    result = mem.classify(31)
    assert excluded_pfns(result) == list(range(32, 48))
    assert counts(result) == {"free": 16}


# --- cache, user, slab -------------------------------------------------------------


def test_slab_pages_are_kept_at_every_level():
    mem = MemMap(512)
    for pfn in range(8):
        mem.slab(pfn)
    mem.free_block(8, 0)
    mem.slab(8)  # a slab page whose page type word looks like a buddy's
    for level in (2, 4, 8, 16, 31):
        assert counts(mem.classify(level)) == {}, level


def test_slab_page_type_6_10_is_not_anonymous():
    # 6.10+: slab is a page type; a slab page's mapping word can have bit 0 set.
    info = changed_info("NUMBER(PG_slab)", NUMBER_PAGE_SLAB_MAPCOUNT_VALUE=str(~0x1000))
    mem = MemMap(512)
    mem.pages[0]["mapcount"] = ~0x1000 & 0xFFFF_FFFF
    mem.pages[0]["mapping"] = KMEM_CACHE | 1
    mem.anon(1)
    assert excluded_pfns(mem.classify(8, info)) == [1]


def test_anon_pages_are_excluded_only_with_bit_8():
    mem = MemMap(512)
    mem.anon(5)
    for level in (2, 4, 6, 16, 22):
        assert counts(mem.classify(level)) == {}, level
    result = mem.classify(8)
    assert excluded_pfns(result) == [5]
    assert counts(result) == {"user": 1}


def test_cache_page_with_private_is_excluded_only_with_bit_4():
    mem = MemMap(512)
    mem.cache(1)
    mem.cache(2, PG_PRIVATE)
    assert counts(mem.classify(2)) == {"cache": 1}
    assert excluded_pfns(mem.classify(2)) == [1]
    # -d 4 takes all page cache; the non-private page still counts as "cache".
    assert counts(mem.classify(4)) == {"cache": 1, "cache_private": 1}
    assert counts(mem.classify(6)) == {"cache": 1, "cache_private": 1}
    assert counts(mem.classify(8 | 16)) == {}


def test_swap_cache_is_cache_only_when_swap_backed():
    # PG_swapcache is PG_owner_priv_1 on pages that are not swap-backed.
    mem = MemMap(512)
    mem.pages[1]["flags"] = 1 << PG_SWAPCACHE | 1 << PG_SWAPBACKED
    mem.pages[2]["flags"] = 1 << PG_SWAPCACHE
    assert excluded_pfns(mem.classify(2)) == [1]
    # Kernels before 4.10 had no PG_swapbacked: then swap cache alone is enough.
    assert excluded_pfns(mem.classify(2, changed_info("NUMBER(PG_swapbacked)"))) == [1, 2]


def test_hwpoison_and_offline_pages_are_excluded_at_every_level():
    mem = MemMap(512)
    mem.pages[3]["flags"] = 1 << PG_HWPOISON
    mem.pages[4]["mapcount"] = OFFLINE
    for level in (0, 1, 2, 16, 31):
        assert counts(mem.classify(level)) == {"hwpoison": 1, "offline": 1}, level


def test_levels_without_page_bits_need_no_walk_when_hwpoison_is_unknown():
    result = classify_pages(lambda paddr, size: pytest.fail("read"), {"OSRELEASE": "6.1.0"},
                            "EM_X86_64", 1, max_pfn=4096)
    assert result.excluded.count() == 0 and result.counts.total_pages == 0


# --- compound pages ---------------------------------------------------------------------


def test_hugetlb_page_is_user_data_and_excluded_whole_with_bit_8():
    mem = MemMap(2048)
    mem.compound(512, 9, HUGETLB_PAGE_DTOR)
    mem.pages[512]["mapping"] = ADDRESS_SPACE  # hugetlbfs file page: not anonymous
    result = mem.classify(8)
    assert excluded_pfns(result) == list(range(512, 1024))
    assert counts(result) == {"user": 512}
    assert counts(mem.classify(2 | 4 | 16)) == {}


def test_compound_cache_or_anon_page_goes_whole_and_kept_compound_keeps_its_tails():
    mem = MemMap(1024)
    mem.compound(0, 2)
    mem.anon(0)        # an anonymous order-2 folio
    mem.compound(4, 2)
    mem.cache(4)       # a page-cache order-2 folio
    mem.compound(8, 3)  # kernel memory: head kept, so its tails are kept too
    mem.anon(9)         # (a tail's own fields are never looked at)
    result = mem.classify(31)
    assert excluded_pfns(result) == list(range(8))
    assert counts(result) == {"user": 4, "cache": 4}


def test_compound_head_in_last_slot_of_a_512_page_batch_gets_order_0():
    # makedumpfile only reads the next struct page within its 512-page batch.
    mem = MemMap(1024)
    mem.pages[511]["flags"] |= PG_HEAD
    mem.pages[512]["compound_order"] = 1
    mem.anon(511)
    assert excluded_pfns(mem.classify(8)) == [511]


def test_compound_order_not_aligned_with_the_head_is_ignored():
    mem = MemMap(1024)
    mem.compound(2, 2, HUGETLB_PAGE_DTOR)
    mem.pages[3]["compound_order"] = 3  # pfn 2 is not 8-aligned
    result = mem.classify(8)
    assert excluded_pfns(result) == [2]  # still hugetlb by its destructor, as in makedumpfile


def test_gigantic_page_crosses_chunks_and_is_counted_once():
    mem = MemMap(4096)
    mem.compound(1024, 10, HUGETLB_PAGE_DTOR)
    mem.free_block(2048, 0)
    result = mem.classify(31, chunk_pages=512)
    assert excluded_pfns(result) == list(range(1024, 2049))
    assert counts(result) == {"user": 1024, "free": 1}
    assert all(size == 512 * STRUCT_PAGE for _, size in mem.reads)


def test_range_past_max_pfn_is_cut_there():
    mem = MemMap(1024)
    mem.free_block(512, 9)
    result = mem.classify(16, max_pfn=700)
    assert excluded_pfns(result) == list(range(512, 700))
    assert result.counts.classes["free"] == 188


def test_hugetlb_as_6_9_page_type_and_order_in_flags_1():
    info = changed_info("OFFSET(page.compound_dtor)", "OFFSET(page.compound_order)", "NUMBER(HUGETLB_PAGE_DTOR)",
                        NUMBER_PAGE_HUGETLB_MAPCOUNT_VALUE=str(~0x800))
    mem = MemMap(1024)
    mem.pages[512]["flags"] = PG_HEAD
    mem.pages[512]["mapcount"] = ~0x800 & 0xFFFF_FFFF
    mem.pages[513]["flags"] = 1 << 8 | 8  # folio._flags_1: some flag, order 8 in the low byte
    mem.pages["compound_head"][513:768] = (VMEMMAP + 512 * STRUCT_PAGE) | 1
    assert counts(mem.classify(8, info)) == {"user": 256}


def test_hugetlb_as_6_6_pg_hugetlb_in_flags_1():
    info = changed_info("OFFSET(page.compound_dtor)", "OFFSET(page.compound_order)", "NUMBER(HUGETLB_PAGE_DTOR)",
                        NUMBER_PG_hugetlb="8")  # = PG_active, just above the order byte
    mem = MemMap(1024)
    mem.pages[0]["flags"] = PG_HEAD
    mem.pages[1]["flags"] = 1 << 8 | 9
    mem.pages[512]["flags"] = PG_HEAD   # an order-2 compound page that is not hugetlb
    mem.pages[513]["flags"] = 2
    assert counts(mem.classify(8, info)) == {"user": 512}


def test_hugetlb_as_6_3_folio_dtor_and_order():
    info = changed_info("OFFSET(page.compound_dtor)", "OFFSET(page.compound_order)")
    info.update({"OFFSET(folio._folio_dtor)": str(64 + 16), "OFFSET(folio._folio_order)": str(64 + 17)})
    mem = MemMap(1024)
    mem.compound(0, 9, HUGETLB_PAGE_DTOR)
    assert counts(mem.classify(8, info)) == {"user": 512}


def test_compound_order_and_dtor_are_two_bytes_before_4_16():
    # 4.4-4.15: unsigned short compound_dtor, compound_order at 16 and 18.
    info = dict(INFO_6_1, OSRELEASE="4.15.0-20-generic", **{"OFFSET(page.compound_order)": "18"})
    rules = page_rules(info, 8)
    assert (rules.compound.order_bytes, rules.compound.dtor_bytes) == (2, 2)
    pages = np.zeros(1024, dtype=struct_page_dtype(rules))
    pages["mapcount"] = NO_PAGE_TYPE
    pages[512]["flags"] = PG_HEAD
    pages[513]["tail_order"] = 9
    pages[513]["tail_dtor"] = HUGETLB_PAGE_DTOR
    claims = page_claims(pages, 0, rules)
    assert (claims.page_class[512], claims.order[512]) == (USER, 9)
    assert page_rules(INFO_6_1, 8).compound.order_bytes == 1
    with pytest.raises(Unsupported, match="before 4.4"):
        page_rules(dict(INFO_6_1, OSRELEASE="3.10.0-1160.el7.x86_64"), 8)


def test_6_12_page_type_values_compare_as_32_bits_whatever_their_printed_sign():
    # PGTY_buddy << 24 = 0xf0000000 may print as %ld either way.
    for printed in ("-268435456", "4026531840"):
        mem = MemMap(512)
        mem.pages[8]["mapcount"] = 0xF000_0000
        mem.pages[8]["private"] = 2
        info = dict(INFO_6_1, **{"NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": printed})
        assert excluded_pfns(mem.classify(16, info)) == [8, 9, 10, 11]


def test_compound_info_is_the_7_1_name_of_compound_head():
    info = changed_info("OFFSET(page.compound_head)")
    info["OFFSET(page.compound_info)"] = "8"
    assert page_rules(info, 31).compound_head_offset == 8
    mem = MemMap(512)
    mem.compound(0, 2)
    mem.anon(1)  # a tail, recognised through compound_info: never looked at
    assert counts(mem.classify(8, info)) == {}


# --- the walk's skipping rule on its own ----------------------------------------------------


def test_accept_claims_drops_claims_inside_accepted_ranges():
    starts = np.array([0, 2, 8, 9, 12])
    spans = np.array([8, 1, 1, 4, 1])  # 9..12 is not aligned, but nothing extends past an accepted range
    assert accept_claims(starts, spans, 0).tolist() == [True, False, True, True, False]
    assert accept_claims(starts, spans, 10).tolist() == [False, False, False, False, True]


def test_accept_claims_follows_the_walk_when_ranges_do_not_nest():
    # 0..4 accepted; 3..11 (misaligned) is inside it and never made, so 6 is reached.
    starts = np.array([0, 3, 6])
    spans = np.array([4, 8, 1])
    assert accept_claims(starts, spans, 0).tolist() == [True, False, True]


def test_ram_pfn_ranges_limit_which_struct_pages_are_looked_at():
    mem = MemMap(2048)
    mem.anon(100)
    mem.anon(600)
    mem.anon(1500)
    result = mem.classify(8, ram_pfn_ranges=[(0, 512), (1024, 2048)])
    assert excluded_pfns(result) == [100, 1500]
    assert result.counts.total_pages == 1536
    # a chunk with no RAM is not even read
    mem.reads.clear()
    mem.classify(8, chunk_pages=512, ram_pfn_ranges=[(0, 512)])
    assert mem.reads == [(VMEMMAP, 512 * STRUCT_PAGE)]


def test_page_claims_give_class_and_order_per_page():
    mem = MemMap(512)
    mem.free_block(8, 3)
    mem.cache(1)
    mem.anon(2)
    rules = page_rules(INFO_6_1, 31)
    pages = np.frombuffer(mem.pages.tobytes(), dtype=struct_page_dtype(rules))
    claims = page_claims(pages, 0, rules)
    assert claims.page_class[:10].tolist() == [KEPT, CACHE, USER, KEPT, KEPT, KEPT, KEPT, KEPT, FREE, KEPT]
    assert claims.order[8] == 3 and claims.order[1] == 0


# --- missing keys, other architectures ---------------------------------------------------------


@pytest.mark.parametrize("level, missing, named", [
    (16, "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", r"NUMBER\(PAGE_BUDDY_MAPCOUNT_VALUE\)"),
    (16, "OFFSET(page.private)", r"OFFSET\(page\.private\)"),
    (2, "NUMBER(PG_lru)", r"NUMBER\(PG_lru\)"),
    (8, "OFFSET(page.compound_order)", r"OFFSET\(page\.compound_order\)"),
    (8, "NUMBER(PG_slab)", r"PG_slab"),
    (2, "OFFSET(page.compound_head)", r"OFFSET\(page\.compound_head\)"),
    (31, "SIZE(page)", r"SIZE\(page\)"),
])
def test_missing_vmcoreinfo_key_is_unsupported_naming_it(level, missing, named):
    with pytest.raises(Unsupported, match=named):
        page_rules(changed_info(missing), level)


def test_keys_only_other_levels_need_may_be_missing():
    page_rules(changed_info("NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"), 2 | 4 | 8)
    page_rules(changed_info("NUMBER(PG_lru)", "OFFSET(page.compound_order)", "OFFSET(page.mapping)"), 16)


def test_other_architectures_are_unsupported_naming_them():
    info = dict(INFO_6_1, **{"SYMBOL(init_top_pgt)": "ffffffff82000000", "NUMBER(phys_base)": "0"})
    with pytest.raises(Unsupported, match="EM_PPC64"):
        classify_pages(lambda paddr, size: b"", info, "EM_PPC64", 31, max_pfn=1024)


def test_kernel_version_from_osrelease():
    assert kernel_version("6.1.0-56-amd64") == (6, 1, 0)
    assert kernel_version("4.16-rc1") == (4, 16, 0)
    assert kernel_version(None) is None


# --- mem_section -------------------------------------------------------------------------------


class KernelMemory:
    """Sparse kernel virtual memory for the mem_section tree."""

    def __init__(self):
        self.regions: dict[int, bytes] = {}

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        for start, data in self.regions.items():
            if start <= vaddr and vaddr + size <= start + len(data):
                return data[vaddr - start:vaddr - start + size]
        raise BadSource(f"vaddr {vaddr:#x} not mapped")


SECTION_PAGES = 1 << (27 - 12)
SPARSE_INFO = {
    "PAGESIZE": "4096", "SIZE(page)": "64", "SIZE(mem_section)": "32",
    "OFFSET(mem_section.section_mem_map)": "0", "NUMBER(SECTION_SIZE_BITS)": "27",
    "NUMBER(MAX_PHYSMEM_BITS)": "46", "LENGTH(mem_section)": str((1 << 19) // 128),
}
ROOTS = DIRECT_MAP + 0x10_0000
SECTIONS = DIRECT_MAP + 0x20_0000
SECTION_PRESENT_ONLINE_EARLY = 0b1101


def sparse_tree(present: list[int], mem_map_of=lambda nr: VMEMMAP + nr * SECTION_PAGES * STRUCT_PAGE):
    memory = KernelMemory()
    sections = bytearray(4096)
    for nr in present:
        coded = (mem_map_of(nr) - nr * SECTION_PAGES * STRUCT_PAGE) | SECTION_PRESENT_ONLINE_EARLY
        struct.pack_into("<Q", sections, nr * 32, coded & 0xFFFF_FFFF_FFFF_FFFF)
    memory.regions[SECTIONS] = bytes(sections)
    memory.regions[ROOTS] = struct.pack("<QQ", SECTIONS, 0)
    return memory


def test_mem_map_runs_follow_sparsemem_extreme_sections_and_merge_contiguous_ones():
    memory = sparse_tree([0, 1, 2, 5])
    info = dict(SPARSE_INFO, **{"SYMBOL(mem_section)": f"{ROOTS:x}"})
    runs = mem_map_runs(memory.read_virtual, info, max_pfn=6 * SECTION_PAGES - 100)
    assert runs == (
        MemMapRun(0, 3 * SECTION_PAGES, VMEMMAP),
        MemMapRun(5 * SECTION_PAGES, 6 * SECTION_PAGES - 100, VMEMMAP + 5 * SECTION_PAGES * STRUCT_PAGE),
    )


def test_mem_map_runs_split_where_mem_map_is_not_contiguous():
    # Without vmemmap each section's mem_map is allocated on its own.
    memory = sparse_tree([0, 1], mem_map_of=lambda nr: DIRECT_MAP + 0x100_0000 * (2 - nr))
    info = dict(SPARSE_INFO, **{"SYMBOL(mem_section)": f"{ROOTS:x}"})
    runs = mem_map_runs(memory.read_virtual, info, max_pfn=2 * SECTION_PAGES)
    assert [run.mem_map for run in runs] == [DIRECT_MAP + 0x200_0000, DIRECT_MAP + 0x100_0000]


def test_mem_section_symbol_pointing_at_the_pointer_is_followed():
    memory = sparse_tree([0])
    pointer = DIRECT_MAP + 0x30_0000
    memory.regions[pointer] = struct.pack("<Q", ROOTS)
    info = dict(SPARSE_INFO, **{"SYMBOL(mem_section)": f"{pointer:x}"})
    assert mem_map_runs(memory.read_virtual, info, max_pfn=SECTION_PAGES) == (
        MemMapRun(0, SECTION_PAGES, VMEMMAP),)


def test_mem_section_tree_without_valid_sections_is_bad_source_naming_the_symbol():
    memory = sparse_tree([])
    info = dict(SPARSE_INFO, **{"SYMBOL(mem_section)": f"{ROOTS:x}"})
    with pytest.raises(BadSource, match=f"{ROOTS:#x}"):
        mem_map_runs(memory.read_virtual, info, max_pfn=SECTION_PAGES)


def test_unreadable_struct_pages_are_bad_source_naming_pfns_and_vaddr():
    mem = MemMap(1024)
    runs = (MemMapRun(0, 2048, VMEMMAP),)  # the second 1024 struct pages are not mapped
    with pytest.raises(BadSource, match=rf"pfns 0x400-0x800 at vaddr {VMEMMAP + 1024 * STRUCT_PAGE:#x}"):
        classify_mem_map(mem.read_virtual, runs, page_rules(INFO_6_1, 31), max_pfn=2048, chunk_pages=1024)


def test_flatmem_is_unsupported():
    with pytest.raises(Unsupported, match="FLATMEM"):
        mem_map_runs(lambda vaddr, size: b"", {"SYMBOL(mem_map)": "ffffffff82000000"}, max_pfn=1)


# --- mem_usage -----------------------------------------------------------------------------------


def test_mem_usage_rows_add_up_to_the_pages_looked_at():
    mem = MemMap(1024)
    mem.free_block(512, 8)
    mem.cache(1)
    mem.cache(2, PG_PRIVATE)
    mem.anon(3)
    rows = mem_usage(mem.classify(31))
    assert [(row.type, row.pages, row.excludable) for row in rows.values()] == [
        ("NON_PRI_CACHE", 1, True), ("PRI_CACHE", 1, True), ("USER", 1, True), ("FREE", 256, True),
        ("HWPOISON", 0, True), ("OFFLINE", 0, True), ("KERN_DATA", 1024 - 259, False)]
    with pytest.raises(ValueError, match="dump level"):
        mem_usage(mem.classify(16))


# --- the real 6.1 dump against makedumpfile ---------------------------------------------------


class RealDump:
    def __init__(self, path: str):
        self.source = FileSource(path)
        self.layout = read_layout(self.source)
        self.view = ElfMemory(self.layout, self.source)
        page = self.layout.page_size
        self.ram_pfn_ranges = [(s.paddr // page, -(-(s.paddr + s.memsz) // page)) for s in self.layout.segments]
        self.max_pfn = max(end for _, end in self.ram_pfn_ranges)

    def classify(self, dump_level: int, **kwargs):
        kwargs.setdefault("max_pfn", self.max_pfn)
        kwargs.setdefault("ram_pfn_ranges", self.ram_pfn_ranges)
        return classify_pages(self.view.read, self.layout.vmcoreinfo, self.layout.machine,
                              dump_level, **kwargs)


@pytest.fixture(scope="module")
def real_dump(real_vmcore):
    dump = RealDump(real_vmcore)
    yield dump
    dump.source.close()


@pytest.fixture(scope="module")
def makedumpfile_copy(real_vmcore_for_makedumpfile) -> Path:
    return real_vmcore_for_makedumpfile


MDF_STATS = {
    "cache": "Non-private cache pages", "cache_private": "Private cache pages",
    "user": "User process data pages", "free": "Free pages",
    "hwpoison": "Hwpoison pages", "offline": "Offline pages",
}


def run_makedumpfile(copy: Path, dump_level: int) -> tuple[dict[str, int], np.ndarray, Path]:
    """makedumpfile -l -d LEVEL: its per-class report and the dumped-pages (2nd) bitmap of its output."""
    out = copy.with_name(f"mdf-d{dump_level}.kdump")
    out.unlink(missing_ok=True)
    run = subprocess.run(["makedumpfile", "-l", "-d", str(dump_level), "--message-level", "31", str(copy), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = {key: int(re.search(rf"{label}\s*: 0x([0-9a-f]+)", run.stdout + run.stderr)[1], 16)
              for key, label in MDF_STATS.items()}
    report["total_pages"] = int(re.search(r"Original pages\s*: 0x([0-9a-f]+)", run.stdout + run.stderr)[1], 16)
    raw = out.read_bytes()
    # disk_dump_header (64-bit): block_size, sub_hdr_size, bitmap_blocks, max_mapnr from offset 428.
    block_size, sub_header_blocks, bitmap_blocks, max_mapnr = struct.unpack_from("<iiII", raw, 428)
    half = bitmap_blocks * block_size // 2
    start = (1 + sub_header_blocks) * block_size + half
    dumped = np.unpackbits(np.frombuffer(raw, np.uint8, half, start), bitorder="little")[:max_mapnr]
    return report, dumped.astype(bool), out


@pytest.mark.slow
@pytest.mark.parametrize("dump_level", [31, 2, 4, 8, 16])
def test_real_dump_counts_equal_makedumpfile(real_dump, makedumpfile_copy, dump_level):
    report, _, out = run_makedumpfile(makedumpfile_copy, dump_level)
    out.unlink()
    result = real_dump.classify(dump_level)
    # makedumpfile -d 31 also reports zero pages (bit 1); compared here are only
    # the struct page classes. At -d 31 (measured): cache 3752, cache_private 0,
    # user 18, free 106113 of 131040 pages; hwpoison and offline 0.
    assert counts_and_total(result) == report


@pytest.mark.slow
def test_real_dump_excludes_the_same_pfns_as_makedumpfile(real_dump, makedumpfile_copy):
    # -d 30: every class but zero pages, so makedumpfile's 2nd bitmap is
    # exactly RAM minus what the struct pages exclude.
    report, dumped, out = run_makedumpfile(makedumpfile_copy, 30)
    out.unlink()
    result = real_dump.classify(30)
    max_mapnr = len(dumped)  # makedumpfile cut max_pfn to the last section with a mem_map
    ram = np.zeros(max_mapnr, dtype=bool)
    for start, end in real_dump.ram_pfn_ranges:
        ram[start:min(end, max_mapnr)] = True
    assert not result.excluded[max_mapnr:].any()
    mismatched = np.flatnonzero((ram & ~result.excluded[0:max_mapnr]) != dumped)
    assert mismatched.size == 0, f"pfns differ from makedumpfile, first {mismatched[:8].tolist()}"
    assert result.excluded.count() == sum(report[key] for key in MDF_STATS)


@pytest.mark.slow
def test_real_dump_numbers_and_speed(real_dump):
    started = time.perf_counter()
    result = real_dump.classify(31)
    seconds = time.perf_counter() - started
    found = counts_and_total(result)
    assert {key: found[key] for key in ("cache", "cache_private", "user", "free", "total_pages")} == {
        "cache": 3752, "cache_private": 0, "user": 18, "free": 106113, "total_pages": 131040}
    rows = mem_usage(result)
    assert rows["KERN_DATA"].pages == 131040 - 3752 - 18 - 106113
    # Without RAM ranges every pfn with a struct page is looked at: 4 sections of 32768.
    assert real_dump.classify(31, ram_pfn_ranges=None).counts.total_pages == 131072
    # 131072 struct pages in well under a second; 4 Mi pages (16 GiB) is 32 times that.
    assert seconds < 2.0, f"{seconds:.3f} s for 131072 struct pages"


@pytest.mark.slow
def test_classifying_4_mi_struct_pages_takes_seconds(real_dump):
    """The real dump's 131072 struct pages repeated 32 times, through the same numpy path."""
    from vmcap.kernel.arch import make_translator

    info = real_dump.layout.vmcoreinfo
    translator = make_translator(real_dump.view.read, info, real_dump.layout.machine)
    (run,) = mem_map_runs(translator.read_virtual, info, 131072)
    real = translator.read_virtual(run.mem_map, 131072 * STRUCT_PAGE)
    copies = 32

    def read_repeated(vaddr: int, size: int) -> bytes:
        at = (vaddr - VMEMMAP) % len(real)
        return real[at:at + size]

    started = time.perf_counter()
    result = classify_mem_map(read_repeated, (MemMapRun(0, 131072 * copies, VMEMMAP),),
                              page_rules(info, 31), max_pfn=131072 * copies)
    seconds = time.perf_counter() - started
    assert result.counts.classes["free"] == 106113 * copies
    assert seconds < 20, f"{seconds:.2f} s for 4 Mi struct pages"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pfn_bitmap_behaves_like_a_bool_array(data):
    from vmcap.kernel.pageclass import PfnBitmap

    size = data.draw(st.integers(1, 300))
    reference = np.zeros(size, dtype=bool)
    bitmap = PfnBitmap(size)
    for _ in range(data.draw(st.integers(0, 4))):
        # Disjoint ascending ranges, some adjacent (an end that is the next start), some empty.
        edges = sorted(data.draw(st.lists(st.integers(0, size), max_size=40)))
        edges = np.array(edges[:len(edges) // 2 * 2], dtype=np.int64)
        starts, ends = edges[0::2], edges[1::2]
        bitmap.set_ranges(starts, ends)
        for start, end in zip(starts, ends):
            reference[start:end] = True
    assert bitmap.count() == int(reference.sum())
    assert np.array_equal(bitmap.to_array(), reference)
    lo = data.draw(st.integers(0, size))
    hi = data.draw(st.integers(lo, size))
    assert np.array_equal(bitmap[lo:hi], reference[lo:hi])
    assert bitmap[lo:].tolist() == reference[lo:].tolist()
    pfn = data.draw(st.integers(0, size - 1))
    assert bitmap[pfn] == bool(reference[pfn])


def _first_clear_reference(reference: np.ndarray, lo: int, hi: int) -> int:
    clear = np.flatnonzero(~reference[lo:hi])
    return lo + int(clear[0]) if len(clear) else hi


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pfn_bitmap_first_clear_is_the_first_unset_pfn(data):
    """Runs of set bits of any length and phase, long ones included (the byte scan's growing pieces)."""
    from vmcap.kernel.pageclass import PfnBitmap

    size = data.draw(st.integers(1, 5000))
    bitmap = PfnBitmap(size)
    reference = np.zeros(size, dtype=bool)
    for _ in range(data.draw(st.integers(0, 6))):
        lo = data.draw(st.integers(0, size))
        hi = data.draw(st.integers(lo, size))
        bitmap.set_range(lo, hi)
        reference[lo:hi] = True
    lo = data.draw(st.integers(0, size))
    hi = data.draw(st.integers(lo, size + 20))
    assert bitmap.first_clear(lo, hi) == _first_clear_reference(reference, lo, min(hi, size)), (lo, hi)


@pytest.mark.parametrize("seed", range(3))
def test_cyclic_exclusion_first_clear_matches_the_whole_bitmap(seed):
    mem = random_mem_map(np.random.default_rng(seed), 16384)
    mem.compound(8192, 12, HUGETLB_PAGE_DTOR)  # excluded across a cycle boundary
    reference = mem.classify(31, chunk_pages=512, cycle_pfns=1 << 20).excluded.to_array()
    cyclic = mem.classify(31, chunk_pages=512, cycle_pfns=1024).excluded
    rng = np.random.default_rng(seed + 7)
    starts = [8192, 8191, 0, 16383] + [int(x) for x in rng.integers(0, 16384, 60)]
    for lo in starts:
        hi = int(rng.integers(lo, 16385))
        assert cyclic.first_clear(lo, hi) == _first_clear_reference(reference, lo, hi), (lo, hi)


# --- cyclic mode: bounded state whatever max_pfn is ------------------------------------------


def random_mem_map(rng: np.random.Generator, count: int) -> MemMap:
    """Buddy blocks, compound cache/anon/hugetlb pages (some gigantic) and order-0 pages, aligned."""
    mem = MemMap(count)
    pfn = 0
    while pfn < count:
        order = int(rng.choice([0, 0, 0, 1, 3, 5, 9, 10]))
        if pfn % (1 << order) or pfn + (1 << order) > count:
            order = 0
        kind = int(rng.integers(5))
        if kind == 0:
            mem.free_block(pfn, order)
        elif kind == 1 and order:
            mem.compound(pfn, order, HUGETLB_PAGE_DTOR)
        elif kind == 2 and order:
            mem.compound(pfn, order)
            mem.anon(pfn)
        elif kind == 3:
            mem.cache(pfn)
        pfn += 1 << order
    return mem


@pytest.mark.parametrize("seed", range(4))
def test_cyclic_exclusion_matches_the_one_cycle_walk_pfn_for_pfn(seed):
    mem = random_mem_map(np.random.default_rng(seed), 16384)
    mem.compound(8192, 12, HUGETLB_PAGE_DTOR)  # 4096 pfns: crosses two 1024-pfn cycles
    whole = mem.classify(31, chunk_pages=512, cycle_pfns=1 << 20)
    cyclic = mem.classify(31, chunk_pages=512, cycle_pfns=1024)
    reference = whole.excluded.to_array()
    assert whole.excluded.cycle_pfns >= 16384 and cyclic.excluded.cycle_pfns == 1024
    assert cyclic.counts == whole.counts
    assert cyclic.excluded.count() == whole.excluded.count() == int(reference.sum())
    assert np.array_equal(cyclic.excluded.to_array(), reference)
    rng = np.random.default_rng(seed + 100)
    for _ in range(50):  # any slice, in any order, crossing cycles or not
        lo = int(rng.integers(0, 16384))
        hi = int(rng.integers(lo, 16385))
        assert np.array_equal(cyclic.excluded[lo:hi], reference[lo:hi]), (lo, hi)
        assert cyclic.excluded[lo] == reference[lo]


def test_cyclic_exclusion_rewalks_each_cycle_once_in_pfn_order_and_skips_clean_cycles():
    mem = MemMap(8192)
    mem.free_block(1024, 10)     # cycle 1 only
    mem.compound(4096, 11, HUGETLB_PAGE_DTOR)  # cycles 4 and 5, from a head in cycle 4
    result = mem.classify(31, chunk_pages=512, cycle_pfns=1024)
    excluded = result.excluded
    reads_of_counting_walk = len(mem.reads)
    pieces = [excluded[lo:lo + 300] for lo in range(0, 8192, 300)]
    assert np.flatnonzero(np.concatenate(pieces)).tolist() == list(range(1024, 2048)) + list(range(4096, 6144))
    # Cycle 0 is kept from the counting walk; 1, 4 and 5 are walked again, 2, 3, 6 and 7 are not.
    assert excluded.cycles_walked == 3
    # A run's end is found across a cycle boundary; clean cycles answer at once.
    assert [excluded.first_clear(lo, hi) for lo, hi in ((1024, 8192), (4096, 8192), (0, 8192),
                                                        (5000, 5500), (2500, 8192))] == [2048, 6144, 0, 5500, 2500]
    cycle_5_reads = [vaddr for vaddr, _ in mem.reads[reads_of_counting_walk:]
                     if 5120 <= (vaddr - VMEMMAP) // STRUCT_PAGE < 6144]
    assert cycle_5_reads, "cycle 5 is decided by its own walk (its pages are tails: nothing claimed)"


def test_classification_state_does_not_grow_with_the_address_space():
    # 4 Gi pfns (16 TiB of pages) with 4096 pfns of RAM at each end: a whole-space
    # bitmap would be 512 MiB; the cyclic state is one cycle and an int per cycle.
    space = 1 << 32
    mem = MemMap(4096)
    for pfn in range(0, 4096, 1024):
        mem.free_block(pfn, 10)

    def read_virtual(vaddr: int, size: int) -> bytes:
        return mem.read_virtual(VMEMMAP + (vaddr - VMEMMAP) % (4096 * STRUCT_PAGE), size)

    runs = (MemMapRun(0, 4096, VMEMMAP), MemMapRun(space - 4096, space, VMEMMAP + (space - 4096) * STRUCT_PAGE))
    result = classify_mem_map(read_virtual, runs, page_rules(INFO_6_1, 31), max_pfn=space)
    assert result.excluded.count() == result.counts.classes["free"] == 8192
    assert result.excluded[space - 5000:space].sum() == 4096
    assert result.excluded[1 << 31:(1 << 31) + 4096].sum() == 0
    assert result.excluded.cycles_walked == 1


def test_pfn_bitmap_set_range_sets_exactly_the_range():
    from vmcap.kernel.pageclass import PfnBitmap

    for lo in range(0, 20):
        for hi in range(lo, 40):
            bitmap = PfnBitmap(40)
            bitmap.set_range(lo, hi)
            assert np.flatnonzero(bitmap.to_array()).tolist() == list(range(lo, hi)), (lo, hi)


# --- struct pages through mmap windows -------------------------------------------------------


def test_real_dump_struct_pages_are_mapped_only_inside_one_segments_data(real_vmcore):
    """With map_physical (as classify_dump passes it) the walk maps struct pages rather than
    copying them: the same classification as reading them, and every window a whole
    granule-aligned range of one segment's file data (never a fractional page)."""
    from vmcap.fileio.mmapio import ALLOCATION_GRANULARITY, FileSource, RecordingSource
    from vmcap.source.dump import elf_dump

    recorder = RecordingSource(FileSource(real_vmcore))
    try:
        layout = read_layout(recorder)
        dump = elf_dump(layout, recorder)
        common = dict(max_pfn=dump.max_pfn, ram_pfn_ranges=dump.ram_pfn_ranges)
        mapped = classify_pages(dump.physical.read, dump.vmcoreinfo, dump.platform, 31,
                                map_physical=dump.physical.mapped, **common)
        maps = [call for call in recorder.calls if call.kind == "map"]
        read = classify_pages(dump.physical.read, dump.vmcoreinfo, dump.platform, 31, **common)
    finally:
        recorder.close()
    assert mapped.counts == read.counts
    assert np.array_equal(mapped.excluded.to_array(), read.excluded.to_array())
    assert len(maps) >= 8, "the struct pages of a 1 GiB guest are 16 MiB: mapped in 1 MiB chunks"
    # --non-mmap (makedumpfile's too): nothing is mapped, struct pages are read.
    unmapped = RecordingSource(FileSource(real_vmcore, allow_mmap=False))
    try:
        dump = elf_dump(read_layout(unmapped), unmapped)
        refused = classify_pages(dump.physical.read, dump.vmcoreinfo, dump.platform, 31,
                                 map_physical=dump.physical.mapped, **common)
    finally:
        unmapped.close()
    assert refused.counts == read.counts and not [c for c in unmapped.calls if c.kind == "map"]
    for call in maps:
        assert call.offset % ALLOCATION_GRANULARITY == 0 and call.length % ALLOCATION_GRANULARITY == 0
        assert any(s.offset <= call.offset and call.offset + call.length <= s.offset + s.filesz
                   for s in layout.segments), call


def test_mapped_bytes_are_the_read_bytes_and_never_a_fractional_page(make_vmcore):
    """ElfMemory.mapped: the bytes read() gives, or None where the window would reach past
    the segment's file data: its fractional pages, zero fill, another segment, no segment."""
    from vmcap.fileio.mmapio import FileSource
    from vmcap.source.dump import ElfMemory

    from conftest import spec

    src, info = make_vmcore(spec())  # conftest's FRACTIONAL_RANGES
    with FileSource(src) as source:
        layout = read_layout(source)
        memory = ElfMemory(layout, source)
        whole = next(s for s in layout.segments if s.paddr == 0x100000)  # 2 MiB of whole pages
        with memory.mapped(whole.paddr + 0x3000, 0x2345) as view:
            assert bytes(view) == memory.read(whole.paddr + 0x3000, 0x2345)
        assert memory.mapped(whole.paddr + whole.filesz - 0x1000, 0x2000) is None  # past its data
        mid_page = next(s for s in layout.segments if s.paddr == 0x300400)  # starts mid-page
        assert memory.mapped(mid_page.paddr, 0x100) is None  # its first page is fractional
        with memory.mapped(0x301000, 0x1000) as view:  # its next page is whole
            assert bytes(view) == memory.read(0x301000, 0x1000)
        assert memory.mapped(0x400100, 0x100) is None  # a sub-page segment
        assert memory.mapped(0x200000 + 0x100000, 0x10) is None  # no segment there
