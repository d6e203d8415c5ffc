"""Kernel virtual addresses on s390x (z/Architecture, big-endian), Linux before 6.10.

The layer over the dump's physical memory that dmesg and page classification
read kernel data through, driven by VMCOREINFO alone, as makedumpfile's
arch/s390x.c does for these kernels. The kernel image and the identity map
share addresses with physical memory (vaddr == paddr) up to high_memory;
above it (vmemmap, vmalloc, modules) the kernel's DAT tables rooted at
swapper_pg_dir translate:

    region-first/second/third tables (level 3..1): 11 index bits each, entries
        hold the next table's origin (bits 12+), the table type TT (bits 2-3)
        and the next table's length TL (bits 0-1, in 4 KiB units less one);
        bit 0x20 invalid; a region-third entry with 0x400 maps a 2 GiB frame
    segment table (level 0): 11 index bits; 0x400 maps a 1 MiB frame, else
        the entry holds a 2 KiB page table's origin (bits 11+)
    page table: 8 index bits, 4 KiB pages; 0x400 invalid, 0x800 must be zero

The root's type is read from its first entry (every entry of a table,
invalid ones included, carries the table's TT). From Linux 6.10 the kernel
image has its own virtual address (the "-vr" kernels: os_info tells
KASLR_OFFSET, IDENTITY_BASE, VMEMMAP); those are refused as Unsupported.
"""

from __future__ import annotations

import struct

from ..errors import BadSource, SourceIOError, Unsupported
from . import vmcoreinfo as vi
from .memory import ReadPhysical, TableCache, WalkingTranslator

ENTRY = struct.Struct(">Q")
REGION_INDEX_BITS = 11
SEGMENT_SHIFT = 20  # one segment-table entry maps 1 MiB
REGION_THIRD_SHIFT = 31  # one region-third entry maps 2 GiB
PAGE_SHIFT = 12
PAGE_TABLE_ENTRIES = 256
TABLE_BYTES = 4096  # region and segment tables: 2048 entries, TL counts 4 KiB quarters

ENTRY_TYPE_MASK = 0x0C  # TT: 0 segment, 1 region-third, 2 region-second, 3 region-first
ENTRY_LENGTH_MASK = 0x03  # TL
ENTRY_INVALID = 0x20  # region and segment entries
ENTRY_LARGE = 0x400  # region-third: 2 GiB frame; segment: 1 MiB frame (FC bit)
REGION_ORIGIN = ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF
SEGMENT_ORIGIN = ~0x7FF & 0xFFFF_FFFF_FFFF_FFFF
PTE_INVALID = 0x400
PTE_ZERO_BIT = 0x800
# Bits a region/segment entry may have set (makedumpfile's rsg_table_entry_bad):
# anything else is a damaged table, not a mapping.
_ENTRY_FLAGS = ENTRY_INVALID | ENTRY_TYPE_MASK | ENTRY_LENGTH_MASK | ENTRY_LARGE | 0x100  # 0x100: CO
_TABLE_NAMES = ("segment", "region-third", "region-second", "region-first")

# Lowcore word that points at os_info, and os_info's KASLR_OFFSET entry (6.10+ "-vr" kernels).
LOWCORE_OS_INFO = 0x0E18
OS_INFO_ENTRIES_AT = 32
OS_INFO_ENTRY_BYTES = 20
OS_INFO_KASLR_OFFSET = 5


def _exactly(read_physical: ReadPhysical, paddr: int, size: int) -> bytes:
    data = read_physical(paddr, size)
    if len(data) != size:
        raise BadSource(f"s390x kernel data at paddr {paddr:#x}: read {len(data)} of {size} bytes")
    return data


class S390xTranslator(WalkingTranslator):
    """Kernel virtual -> physical on s390x: identity below high_memory, DAT tables above."""

    byte_order = "big"
    kernel_start = 0  # the identity map: kernel addresses start at 0
    # MAX_PHYSMEM_BITS of kernels that do not export it (makedumpfile: _ORIG, _3_3)
    physmem_bits_candidates = (42, 46)

    def __init__(self, read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo):
        self._read_physical = read_physical
        self.root_table_paddr = vi.symbol(vmcoreinfo, "swapper_pg_dir", required=True)
        if self._kaslr_offset():
            raise Unsupported("s390x kernel with a virtual kernel image (os_info KASLR_OFFSET, Linux 6.10+)")
        high_memory = vi.symbol(vmcoreinfo, "high_memory", required=True)
        (self.identity_end,) = ENTRY.unpack(_exactly(self._read_physical, high_memory, 8))
        self._tables = TableCache(lambda paddr, size: _exactly(read_physical, paddr, size))

    def _kaslr_offset(self) -> int:
        (os_info,) = ENTRY.unpack(_exactly(self._read_physical, LOWCORE_OS_INFO, 8))
        if os_info == 0 or os_info % 8:
            return 0
        at = os_info + OS_INFO_ENTRIES_AT + OS_INFO_KASLR_OFFSET * OS_INFO_ENTRY_BYTES
        try:
            (offset,) = ENTRY.unpack(_exactly(self._read_physical, at, 8))
        except (BadSource, SourceIOError):
            return 0
        return offset

    def _entry(self, table_paddr: int, index: int) -> int:
        address = table_paddr + index * 8
        page = address & ~(TABLE_BYTES - 1)
        table = self._tables.get(page, TABLE_BYTES)
        return ENTRY.unpack_from(table, address - page)[0]

    def walk_page_tables(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes mapped from there) by swapper_pg_dir, as makedumpfile's vtop_s390x."""
        table = self.root_table_paddr
        first = self._entry(table, 0)
        level = (first & ENTRY_TYPE_MASK) >> 2
        length = first & ENTRY_LENGTH_MASK
        if vaddr >> (REGION_THIRD_SHIFT + REGION_INDEX_BITS * level):
            raise BadSource(f"vaddr {vaddr:#x} is beyond the {_TABLE_NAMES[level]} table at the root "
                            f"(swapper_pg_dir, paddr {table:#x})")
        while True:
            index = (vaddr >> (SEGMENT_SHIFT + REGION_INDEX_BITS * level)) & ((1 << REGION_INDEX_BITS) - 1)
            name = _TABLE_NAMES[level]
            if index >= (length + 1) * (TABLE_BYTES // 8):
                raise BadSource(f"vaddr {vaddr:#x} not mapped: index {index} is beyond the {name} table "
                                f"at paddr {table:#x} (length {length})")
            entry = self._entry(table, index)
            where = f"{name} entry {entry:#x} at paddr {table + index * 8:#x}"
            origin_mask = REGION_ORIGIN if level else SEGMENT_ORIGIN
            if entry & ~(origin_mask | _ENTRY_FLAGS):
                raise BadSource(f"vaddr {vaddr:#x}: {where} has reserved bits set")
            if entry & ENTRY_INVALID or (entry & ENTRY_TYPE_MASK) >> 2 != level:
                raise BadSource(f"vaddr {vaddr:#x} not mapped: {where} is invalid")
            if entry & ENTRY_LARGE and level <= 1:
                size = 1 << (REGION_THIRD_SHIFT if level else SEGMENT_SHIFT)
                offset = vaddr & (size - 1)
                return (entry & ~(size - 1) & REGION_ORIGIN) | offset, size - offset
            if level == 0:
                break
            table = entry & REGION_ORIGIN
            length = entry & ENTRY_LENGTH_MASK
            level -= 1
        page_table = entry & SEGMENT_ORIGIN
        index = (vaddr >> PAGE_SHIFT) & (PAGE_TABLE_ENTRIES - 1)
        pte = self._entry(page_table, index)
        if pte & (PTE_INVALID | PTE_ZERO_BIT):
            raise BadSource(f"vaddr {vaddr:#x} not mapped: page table entry {pte:#x} at paddr "
                            f"{page_table + index * 8:#x} is invalid")
        offset = vaddr & ((1 << PAGE_SHIFT) - 1)
        return (pte & REGION_ORIGIN) | offset, (1 << PAGE_SHIFT) - offset

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes from vaddr to the end of the piece mapping it); BadSource if unmapped."""
        if vaddr < self.identity_end:
            return vaddr, self.identity_end - vaddr
        return self.walk_page_tables(vaddr)

