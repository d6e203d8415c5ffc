"""x86_64 kernel virtual addresses: what a walk returns, and how many walks a read costs."""

from __future__ import annotations

import struct

import pytest

from vmcap.errors import BadSource
from vmcap.kernel.translate import START_KERNEL_MAP, X86_64Translator

PAGE = 4096
TABLE = 0x63  # present, writable, accessed, dirty
LARGE = 0xE3  # ... and PSE
NX = 1 << 63

ROOT = 0x10_0000  # the tables, at paddrs of their own
PUD = 0x10_1000
PMD = 0x10_2000
PTE = 0x10_3000
VMEMMAP = 0xFFFF_EA00_0000_0000  # PGD index 468, PUD index 0
DIRECT = 0xFFFF_8880_0000_0000  # PGD index 273


def _table(entries: dict[int, int]) -> bytes:
    table = bytearray(PAGE)
    for index, value in entries.items():
        struct.pack_into("<Q", table, 8 * index, value)
    return bytes(table)


class Memory:
    """Page tables in a dict of pages; every other byte reads as its paddr's low byte."""

    def __init__(self):
        self.pages = {
            ROOT: _table({468: PUD | TABLE, 273: PUD + 0x4000 | TABLE}),
            PUD: _table({0: PMD | TABLE}),
            # vmemmap: eight 2 MiB pages at 0x4000_0000.., then a 4 KiB-page table
            PMD: _table({**{i: (0x4000_0000 + i * (2 << 20)) | LARGE | NX for i in range(8)},
                         8: PTE | TABLE}),
            PTE: _table({0: 0x7000_0000 | TABLE, 1: 0x7000_5000 | TABLE}),
            # the direct map: a 1 GiB page at paddr 0
            PUD + 0x4000: _table({0: 0 | LARGE}),
        }
        self.reads: list[tuple[int, int]] = []

    def read_physical(self, paddr: int, size: int) -> bytes:
        self.reads.append((paddr, size))
        if paddr in self.pages:
            return self.pages[paddr][:size]
        return bytes((paddr + i) & 0xFF for i in range(size))


def translator(memory: Memory) -> X86_64Translator:
    info = {"SYMBOL(init_top_pgt)": f"{START_KERNEL_MAP + ROOT:x}", "NUMBER(phys_base)": "0"}
    return X86_64Translator(memory.read_physical, info)


def test_translate_gives_the_bytes_left_in_the_page_that_maps_the_address():
    t = translator(Memory())
    assert t.translate(VMEMMAP + 0x1234) == (0x4000_1234, (2 << 20) - 0x1234)
    assert t.translate(VMEMMAP + (16 << 20) + 0x10) == (0x7000_0010, PAGE - 0x10)
    assert t.translate(VMEMMAP + (16 << 20) + PAGE) == (0x7000_5000, PAGE)
    assert t.translate(DIRECT + 0x12_3456) == (0x12_3456, (1 << 30) - 0x12_3456)
    # the kernel image: linear up to the end of its window
    assert t.translate(START_KERNEL_MAP + 0x5000) == (0x5000, (512 << 20) - 0x5000)
    assert t.to_physical(VMEMMAP + (3 << 20) + 8) == 0x4030_0008
    assert t.walk_page_tables(VMEMMAP + (16 << 20) + PAGE + 1) == 0x7000_5001
    with pytest.raises(BadSource, match="PTE entry 0x0"):
        t.translate(VMEMMAP + (16 << 20) + 2 * PAGE)


def test_reading_struct_pages_in_2_mib_pages_walks_once_per_2_mib():
    """16 MiB of struct pages (1 GiB of RAM): 8 walks, not 4096 (0.04 s of a -d 31 capture)."""
    memory = Memory()
    t = translator(memory)
    walks = []
    walk = t._walk
    t._walk = lambda vaddr: walks.append(vaddr) or walk(vaddr)
    data = t.read_virtual(VMEMMAP + 0x40, 16 << 20)
    assert len(walks) == 9  # eight 2 MiB pages and the first 4 KiB page after them
    data_reads = [(p, n) for p, n in memory.reads if p not in memory.pages]
    assert data_reads == [(0x4000_0040, (16 << 20) - 0x40), (0x7000_0000, 0x40)]
    assert data[:4] == bytes([0x40, 0x41, 0x42, 0x43])
    assert data[-0x40:] == bytes(range(0x40))
