"""Kernel virtual addresses as a layer over the dump's physical memory (x86_64).

Reads of kernel data (the printk ring buffer, struct pages in vmemmap) use
virtual addresses; this module turns them into physical ones the way the
crashed CPU would have, by walking the kernel's own page tables
(init_top_pgt), as makedumpfile's arch/x86_64.c does.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable

from . import vmcoreinfo as vi
from .errors import BadSource, Unsupported

ReadPhysical = Callable[[int, int], bytes]

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
# Without NUMBER(KERNEL_IMAGE_SIZE) (older kernels) only trust the non-KASLR
# image size: module space starts right after the image and is not linear.
DEFAULT_KERNEL_IMAGE_SIZE = 512 << 20

PAGE_SIZE = 4096
ENTRY_BYTES = 8
ENTRIES_PER_TABLE = 512
PRESENT = 0x1  # _PAGE_PRESENT
PAGE_SIZE_BIT = 0x80  # _PAGE_PSE: this PUD/PMD entry maps a 1 GiB/2 MiB page
# Bits 12..51 hold the next table's (or page's) physical address; bit 63 is
# NX and bits 52..62 are software/protection-key bits (makedumpfile ENTRY_MASK).
ENTRY_ADDRESS_MASK = ~0xFFF0_0000_0000_0FFF & 0xFFFF_FFFF_FFFF_FFFF

# (table name, shift of its 9 index bits, page size its entries map when PSE is set)
_LOWER_LEVELS = (("PUD", 30, 1 << 30), ("PMD", 21, 1 << 21), ("PTE", 12, None))
_LEVELS_4 = (("PGD", 39, None),) + _LOWER_LEVELS
_LEVELS_5 = (("PGD", 48, None), ("P4D", 39, None)) + _LOWER_LEVELS

TABLE_CACHE_PAGES = 64
X86_64_MACHINE_NAMES = frozenset({"x86_64", "x86-64", "amd64", "em_x86_64"})


def phys_base_from_segments(segments: Iterable[tuple[int, int]]) -> int | None:
    """phys_base from (p_vaddr, p_paddr) of PT_LOADs, for VMCOREINFO without NUMBER(phys_base).

    /proc/vmcore gives the kernel text its own PT_LOAD with p_vaddr in the
    __START_KERNEL_map region; makedumpfile (get_phys_base_x86_64) takes the
    first such segment.
    """
    for vaddr, paddr in segments:
        if vaddr >= START_KERNEL_MAP:
            return paddr - (vaddr - START_KERNEL_MAP)
    return None


class X86_64Translator:
    """Kernel virtual -> physical on x86_64, 4- or 5-level paging.

    read_physical(paddr, size) reads the dump; vmcoreinfo supplies the root
    table (SYMBOL(init_top_pgt)), NUMBER(phys_base), NUMBER(pgtable_l5_enabled)
    and NUMBER(sme_mask). fallback_phys_base is used only when VMCOREINFO
    lacks NUMBER(phys_base) (see phys_base_from_segments).
    """

    def __init__(self, read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, *,
                 fallback_phys_base: int | None = None):
        self._read_physical = read_physical
        phys_base = vi.number(vmcoreinfo, "phys_base")
        if phys_base is None:
            phys_base = fallback_phys_base
        if phys_base is None:
            raise Unsupported("VMCOREINFO lacks NUMBER(phys_base) and no kernel-text PT_LOAD gave it")
        self.phys_base = phys_base
        root = (
            vi.symbol(vmcoreinfo, "init_top_pgt")
            or vi.symbol(vmcoreinfo, "init_level4_pgt")  # before 4.13
            or vi.symbol(vmcoreinfo, "swapper_pg_dir")
        )
        if root is None:
            raise Unsupported("VMCOREINFO lacks SYMBOL(init_top_pgt) (and init_level4_pgt, swapper_pg_dir)")
        self.root_table_paddr = root - START_KERNEL_MAP + phys_base
        self.five_level = bool(vi.number(vmcoreinfo, "pgtable_l5_enabled") or 0)
        # With AMD SME the encryption bit sits inside the address bits of every entry.
        self.entry_mask = ENTRY_ADDRESS_MASK & ~(vi.number(vmcoreinfo, "sme_mask") or 0)
        image_size = vi.number(vmcoreinfo, "KERNEL_IMAGE_SIZE") or DEFAULT_KERNEL_IMAGE_SIZE
        self.kernel_text_end = START_KERNEL_MAP + image_size
        self._levels = _LEVELS_5 if self.five_level else _LEVELS_4
        self._tables: dict[int, bytes] = {}

    def _table(self, table_paddr: int) -> bytes:
        table = self._tables.get(table_paddr)
        if table is None:
            table = self._read_physical(table_paddr, PAGE_SIZE)
            if len(self._tables) >= TABLE_CACHE_PAGES:
                del self._tables[next(iter(self._tables))]  # oldest first
            self._tables[table_paddr] = table
        return table

    def to_physical(self, vaddr: int) -> int:
        """The physical address the kernel mapped vaddr to; BadSource if it is not mapped."""
        # The kernel image is mapped linearly at phys_base; this also avoids
        # needing the page tables to find the page tables.
        if START_KERNEL_MAP <= vaddr < self.kernel_text_end:
            return vaddr - START_KERNEL_MAP + self.phys_base
        return self.walk_page_tables(vaddr)

    def walk_page_tables(self, vaddr: int) -> int:
        """to_physical by the page tables alone, as makedumpfile's vtop4_x86_64 does."""
        table_paddr = self.root_table_paddr
        for name, shift, large_page_size in self._levels:
            index = (vaddr >> shift) & (ENTRIES_PER_TABLE - 1)
            (entry,) = struct.unpack_from("<Q", self._table(table_paddr), index * ENTRY_BYTES)
            if not entry & PRESENT:
                raise BadSource(
                    f"vaddr {vaddr:#x} not mapped: {name} entry {entry:#x} "
                    f"at paddr {table_paddr + index * ENTRY_BYTES:#x} is not present"
                )
            if name == "PTE":
                return (entry & self.entry_mask) | (vaddr & (PAGE_SIZE - 1))
            if large_page_size is not None and entry & PAGE_SIZE_BIT:
                return (entry & self.entry_mask & ~(large_page_size - 1)) | (vaddr & (large_page_size - 1))
            table_paddr = entry & self.entry_mask
        raise AssertionError("the last level is always PTE")

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """size bytes at kernel virtual address vaddr.

        Pages that are physically contiguous are read in one read_physical
        call, so a large buffer in the kernel image or the direct map costs
        one read, not one per page.
        """
        runs: list[tuple[int, int]] = []  # (paddr, length) of physically contiguous pieces
        position, end = vaddr, vaddr + size
        while position < end:
            piece = min(end, (position | (PAGE_SIZE - 1)) + 1) - position
            paddr = self.to_physical(position)
            if runs and runs[-1][0] + runs[-1][1] == paddr:
                runs[-1] = (runs[-1][0], runs[-1][1] + piece)
            else:
                runs.append((paddr, piece))
            position += piece
        return b"".join(self._read_physical(paddr, length) for paddr, length in runs)


def make_translator(read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, machine: str, *,
                    fallback_phys_base: int | None = None) -> X86_64Translator:
    """The kernel-virtual layer for a dump of the given machine (e.g. "EM_X86_64", "x86_64")."""
    if machine.lower() not in X86_64_MACHINE_NAMES:
        raise Unsupported(f"kernel virtual addresses are only supported on x86_64, not {machine}")
    return X86_64Translator(read_physical, vmcoreinfo, fallback_phys_base=fallback_phys_base)
