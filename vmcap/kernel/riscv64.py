"""Kernel virtual addresses on riscv64 (Sv39, Sv48, Sv57), from VMCOREINFO alone.

The kernel writes what a reader needs (arch_crash_save_vmcoreinfo in
arch/riscv/kernel/crash_core.c, now vmcore_info.c): NUMBER(VA_BITS) is the
paging mode the kernel chose at boot (39, 48 or 57: it probes Sv57, then Sv48,
then Sv39, and "no5lvl"/"no4lvl" cap it), SYMBOL(swapper_pg_dir) the root
table, and NUMBER(va_kernel_pa_offset) the offset of the kernel image mapping
(kernel_map.virt_addr - kernel_map.phys_addr), which gives the root's
physical address. makedumpfile's arch/riscv64.c needs the same keys; the
first version of that kernel function did not write va_kernel_pa_offset, and
such dumps are Unsupported here as there.

Every kernel address is translated by walking swapper_pg_dir, as
Aarch64Translator does: makedumpfile shortcuts the linear map
(vaddr - PAGE_OFFSET + phys_ram_base) and the image (vaddr -
va_kernel_pa_offset), which gives the same answer wherever the kernel mapped
the address, but the tables also say where it did not (the firmware's
no-map memory, debug_pagealloc, KFENCE).

The walk follows the privileged spec's rules (Volume II, "Virtual Address
Translation Process"), so a corrupt table gives one clear error rather than a
wrong address: V clear, W without R, a table pointer at the last level, and a
superpage whose PPN is not aligned to its size all fault. A leaf may sit at
any level (a 256 TiB page at the Sv57 root, down to 4 KiB pages), and a
Svnapot 64 KiB PTE maps its whole range as the MMU does (makedumpfile reads
its PPN as a 4 KiB page's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BadSource
from . import vmcoreinfo as vi
from .memory import ReadPhysical, TableCache, WalkingTranslator

PAGE_SIZE = 4096  # the only base page size RISC-V defines
PAGE_SHIFT = 12
INDEX_BITS = 9  # every Sv39/48/57 table has 512 eight-byte entries
ENTRIES_PER_TABLE = 1 << INDEX_BITS
ENTRY_BYTES = 8

# Page table entry bits (arch/riscv/include/asm/pgtable-bits.h).
PTE_VALID = 1 << 0
PTE_READ = 1 << 1
PTE_WRITE = 1 << 2
PTE_EXEC = 1 << 3
PTE_LEAF = PTE_READ | PTE_WRITE | PTE_EXEC  # any of them: a leaf; none: a pointer to the next table
PTE_NAPOT = 1 << 63  # Svnapot: a last-level entry for a naturally aligned 64 KiB range
PPN_SHIFT = 10
# PPN in bits 10..53 (_PAGE_PFN_MASK). Bits 54..63 are not address bits: PBMT
# (Svpbmt), N (Svnapot), and on T-Head cores the vendor memory attributes in
# 59..63 (ERRATA_THEAD_MAE), so they are masked off rather than rejected, as
# makedumpfile's PTE_PFN_PROT_MASK and the kernel's own pte_pfn do.
PPN_MASK = (1 << 44) - 1
# The one NAPOT size Svnapot defines: PPN bits [3:0] = 0b1000 marks 64 KiB.
NAPOT_64K_PPN_BITS, NAPOT_64K_PPN_MASK, NAPOT_64K_SIZE = 0b1000, 0xF, 1 << 16

# Linux's names for the levels, root first, by VA_BITS.
_LEVEL_NAMES = {
    39: ("PGD", "PMD", "PTE"),
    48: ("PGD", "PUD", "PMD", "PTE"),
    57: ("PGD", "P4D", "PUD", "PMD", "PTE"),
}
MODE_NAMES = {39: "Sv39", 48: "Sv48", 57: "Sv57"}


@dataclass(frozen=True)
class Riscv64Level:
    """One level of the walk: entry index = (vaddr >> shift) % 512."""

    number: int  # the spec's numbering: 0 is the last level (4 KiB pages)
    name: str  # Linux's: PGD, P4D, PUD, PMD, PTE

    @property
    def shift(self) -> int:
        return PAGE_SHIFT + INDEX_BITS * self.number

    @property
    def mapping_size(self) -> int:
        return 1 << self.shift


def riscv64_levels(vmcoreinfo: vi.VmcoreInfo) -> tuple[int, tuple[Riscv64Level, ...]]:
    """(VA_BITS, the levels root first) from NUMBER(VA_BITS) and PAGESIZE."""
    page_size = vi.page_size(vmcoreinfo)
    if page_size is not None and page_size != PAGE_SIZE:
        raise BadSource(f"VMCOREINFO PAGESIZE={page_size} is not riscv64's page size ({PAGE_SIZE})")
    va_bits = vi.number(vmcoreinfo, "VA_BITS", required=True)
    names = _LEVEL_NAMES.get(va_bits)
    if names is None:
        raise BadSource(f"VMCOREINFO NUMBER(VA_BITS)={va_bits} is not a riscv64 paging mode "
                        "(39 Sv39, 48 Sv48, 57 Sv57)")
    count = len(names)
    return va_bits, tuple(Riscv64Level(count - 1 - i, name) for i, name in enumerate(names))


class Riscv64Translator(WalkingTranslator):
    """Kernel virtual -> physical on riscv64 (Sv39/Sv48/Sv57), for kernels writing VA_BITS and va_kernel_pa_offset.

    read_physical(paddr, size) reads the dump. The root is swapper_pg_dir at
    SYMBOL(swapper_pg_dir) - NUMBER(va_kernel_pa_offset): the table sits in
    the kernel image, which is mapped at that offset from its load address.
    XIP kernels do not write va_kernel_pa_offset (their image is partly in
    ROM) and are Unsupported.
    """

    def __init__(self, read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo):
        self._read_physical = read_physical
        self.va_bits, self.levels = riscv64_levels(vmcoreinfo)
        swapper_pg_dir = vi.symbol(vmcoreinfo, "swapper_pg_dir", required=True)
        va_kernel_pa_offset = vi.number(vmcoreinfo, "va_kernel_pa_offset", required=True)
        self.root_table_paddr = (swapper_pg_dir - va_kernel_pa_offset) & ((1 << 64) - 1)
        if self.root_table_paddr % PAGE_SIZE:
            raise BadSource(f"VMCOREINFO SYMBOL(swapper_pg_dir)={swapper_pg_dir:#x} - "
                            f"NUMBER(va_kernel_pa_offset)={va_kernel_pa_offset:#x} = "
                            f"{self.root_table_paddr:#x} is not a page-aligned table address")
        # Kernel addresses: bits 63..VA_BITS-1 all set (the spec requires
        # them to equal bit VA_BITS-1; the lower half is user space).
        self.kernel_start = (1 << 64) - (1 << (self.va_bits - 1))
        self._tables = TableCache(read_physical)

    @property
    def mode(self) -> str:
        return MODE_NAMES[self.va_bits]

    def _table(self, table_paddr: int) -> bytes:
        return self._tables.get(table_paddr, PAGE_SIZE)

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes from vaddr to the end of the page or superpage mapping it); BadSource if unmapped."""
        if not self.kernel_start <= vaddr < 1 << 64:
            raise BadSource(f"vaddr {vaddr:#x} is not a kernel address: with {self.mode} the kernel half "
                            f"starts at {self.kernel_start:#x}")
        table_paddr = self.root_table_paddr
        for level in self.levels:
            index = (vaddr >> level.shift) & (ENTRIES_PER_TABLE - 1)
            (entry,) = struct.unpack_from("<Q", self._table(table_paddr), index * ENTRY_BYTES)
            ppn = (entry >> PPN_SHIFT) & PPN_MASK
            why = None
            if not entry & PTE_VALID:
                why = "is not valid"
            elif entry & (PTE_READ | PTE_WRITE) == PTE_WRITE:
                why = "is reserved (writable but not readable)"
            elif not entry & PTE_LEAF:
                if level.number == 0:
                    why = "points to another table from the last level"
                else:
                    table_paddr = ppn << PAGE_SHIFT
                    continue
            # N with another PPN[3:0] is reserved by Svnapot, but on T-Head cores bit 63 is the
            # strong-order attribute of an ordinary page: such an entry maps a 4 KiB page.
            elif level.number == 0 and entry & PTE_NAPOT and ppn & NAPOT_64K_PPN_MASK == NAPOT_64K_PPN_BITS:
                offset = vaddr & (NAPOT_64K_SIZE - 1)
                return ((ppn & ~NAPOT_64K_PPN_MASK) << PAGE_SHIFT) | offset, NAPOT_64K_SIZE - offset
            elif ppn & ((1 << (level.shift - PAGE_SHIFT)) - 1):
                why = (f"is a misaligned superpage (its PPN {ppn:#x} is not a multiple of "
                       f"{level.mapping_size >> PAGE_SHIFT} pages)")
            else:
                offset = vaddr & (level.mapping_size - 1)
                return (ppn << PAGE_SHIFT) | offset, level.mapping_size - offset
            raise BadSource(f"vaddr {vaddr:#x} not mapped: {self.mode} level {level.number} ({level.name}) "
                            f"entry {entry:#x} at paddr {table_paddr + index * ENTRY_BYTES:#x} {why}")
        raise AssertionError("the last level always returns or raises")
