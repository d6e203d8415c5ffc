"""Kernel virtual addresses as a layer over the dump's physical memory (x86_64, aarch64).

ppc64, s390x and riscv64 have their own modules (ppc64, s390x, riscv64);
kernel.arch (Platform.translator, make_translator) picks the layer for a dump's machine.

Reads of kernel data (the printk ring buffer, struct pages in vmemmap) use
virtual addresses; this module turns them into physical ones the way the
crashed CPU would have, by walking the kernel's own page tables:
init_top_pgt on x86_64, as makedumpfile's arch/x86_64.c does, and
swapper_pg_dir (the TTBR1 tables) on aarch64, as makedumpfile's arch/arm64.c
and drgn's libdrgn/arch_aarch64.c do.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from ..errors import BadSource, Unsupported
from . import vmcoreinfo as vi
from .memory import ReadPhysical, TableCache, WalkingTranslator, read_translated, struct_prefix

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
        self._tables = TableCache(read_physical)

    def _table(self, table_paddr: int) -> bytes:
        return self._tables.get(table_paddr, PAGE_SIZE)

    def to_physical(self, vaddr: int) -> int:
        """The physical address the kernel mapped vaddr to; BadSource if it is not mapped."""
        return self.translate(vaddr)[0]

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes mapped contiguously from vaddr on); BadSource if vaddr is not mapped."""
        # The kernel image is mapped linearly at phys_base; this also avoids
        # needing the page tables to find the page tables.
        if START_KERNEL_MAP <= vaddr < self.kernel_text_end:
            return vaddr - START_KERNEL_MAP + self.phys_base, self.kernel_text_end - vaddr
        return self._walk(vaddr)

    def walk_page_tables(self, vaddr: int) -> int:
        """to_physical by the page tables alone, as makedumpfile's vtop4_x86_64 does."""
        return self._walk(vaddr)[0]

    def _walk(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes to the end of the page, 2 MiB or 1 GiB page that maps vaddr)."""
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
                offset = vaddr & (PAGE_SIZE - 1)
                return (entry & self.entry_mask) | offset, PAGE_SIZE - offset
            if large_page_size is not None and entry & PAGE_SIZE_BIT:
                offset = vaddr & (large_page_size - 1)
                return (entry & self.entry_mask & ~(large_page_size - 1)) | offset, large_page_size - offset
            table_paddr = entry & self.entry_mask
        raise AssertionError("the last level is always PTE")

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """size bytes at kernel virtual address vaddr.

        Physically contiguous pieces are read in one read_physical call, and
        a 2 MiB or 1 GiB page (vmemmap, the direct map) is translated once, so
        16 MiB of struct pages cost 8 walks, not 4096.
        """
        return read_translated(vaddr, size, self.translate, self._read_physical)


# --- aarch64 -------------------------------------------------------------------------------

ADDRESS_MASK_64 = (1 << 64) - 1

# Descriptor bits [1:0] (Arm ARM, VMSAv8-64 descriptor formats): 0b11 is a
# table below the last level and a page at it; 0b01 is a block below the last
# level and reserved (faults) at it; bit 0 clear is invalid (faults).
DESCRIPTOR_TYPE_MASK = 0x3
DESCRIPTOR_TABLE_OR_PAGE = 0x3
DESCRIPTOR_BLOCK = 0x1
# Output address bits [47:PAGE_SHIFT] sit in place in every descriptor; bits
# above 47 are attributes (contiguous, PXN/UXN, software bits) or RES0.
OUTPUT_ADDRESS_BITS_47 = (1 << 48) - 1
# 52-bit physical addresses put PA[51:48] elsewhere: with 64 KiB pages
# (FEAT_LPA) in descriptor bits [15:12], which must be zero with 48-bit PAs,
# so they can always be used; with 4/16 KiB pages (FEAT_LPA2, Linux 6.9+)
# PA[49:48] sit in place and PA[51:50] in bits [9:8], which are the
# shareability field without LPA2. (mask, left shift) per case:
PA_51_48_FROM_BITS_15_12 = (0xF000, 36)
PA_51_50_FROM_BITS_9_8 = (0x300, 42)

# The translation levels (Arm numbering: the last is 3) whose descriptors may
# be blocks, by granule; any other 0b01 descriptor faults. With 52-bit
# output addresses one more level may hold them (_LPA_BLOCK_LEVEL); Linux
# itself only makes PMD blocks, and PUD blocks with 4 KiB pages.
_BLOCK_LEVELS = {4096: frozenset({1, 2}), 16384: frozenset({2}), 65536: frozenset({2})}
_LPA_BLOCK_LEVEL = {4096: 0, 16384: 1, 65536: 1}


@dataclass(frozen=True)
class Aarch64Level:
    """One level of the TTBR1 walk: descriptor index = (vaddr >> shift) % entries."""

    number: int  # Arm numbering: 3 is the last level; the root is 4 - levels (-1 with 4K/52-bit)
    shift: int  # log2 of the bytes one descriptor maps
    entries: int  # descriptors in a table of this level (the root may have fewer than a page's)
    holds_blocks: bool

    @property
    def mapping_size(self) -> int:
        return 1 << self.shift


@dataclass(frozen=True)
class Aarch64Paging:
    """The kernel half (TTBR1) translation regime an arm64 kernel ran with.

    va_bits is the size of the kernel half the walk covers: the kernel half is
    [2**64 - 2**va_bits, 2**64), and the walk needs
    ceil((va_bits - page_shift) / (page_shift - 3)) levels
    (arch/arm64/include/asm/pgtable-hwdef.h ARM64_HW_PGTABLE_LEVELS):
    4K pages: 39 bits 3 levels, 48 bits 4, 52 bits 5; 16K: 36 bits 2, 47
    bits 3, 48 bits 4, 52 bits 4; 64K: 42 bits 2, 48 and 52 bits 3.
    """

    page_size: int
    va_bits: int
    levels: tuple[Aarch64Level, ...]  # root first
    address_low_mask: int  # descriptor bits holding PA bits in place
    address_high_mask: int  # descriptor bits holding PA[51:48] or PA[51:50], shifted up by:
    address_high_shift: int

    @property
    def kernel_start(self) -> int:
        return (1 << 64) - (1 << self.va_bits)

    def output_address(self, descriptor: int) -> int:
        """The physical address a table/block/page descriptor points at (low bits not masked)."""
        return ((descriptor & self.address_low_mask)
                | ((descriptor & self.address_high_mask) << self.address_high_shift))


def aarch64_paging(vmcoreinfo: vi.VmcoreInfo) -> Aarch64Paging:
    """The TTBR1 walk's shape from PAGESIZE, NUMBER(VA_BITS) and NUMBER(TCR_EL1_T1SZ).

    NUMBER(VA_BITS) (4.12+) is the configured size, which since 5.4 may
    exceed the size used at run time when the CPU lacks 52-bit VAs;
    64 - NUMBER(TCR_EL1_T1SZ) (5.9+) is the run-time size. With 64 KiB pages
    a 52-bit kernel falling back to 48 bits keeps swapper_pg_dir laid out for
    52 bits (TTBR1 points into it at an offset, "offset_ttbr1"), so the walk
    uses VA_BITS; with 4/16 KiB pages (6.9+ LPA2) the fallback folds a level
    away, so the walk uses the run-time size. drgn decides the same way.
    NUMBER(MAX_USER_VA_BITS) (5.4-5.10) is about TTBR0 and is not needed.
    """
    page_size = vi.page_size(vmcoreinfo, required=True)
    if page_size not in _BLOCK_LEVELS:
        raise BadSource(f"VMCOREINFO PAGESIZE={page_size} is not an arm64 granule (4096, 16384, 65536)")
    page_shift = page_size.bit_length() - 1
    va_bits = vi.number(vmcoreinfo, "VA_BITS", required=True)
    t1sz = vi.number(vmcoreinfo, "TCR_EL1_T1SZ")
    walks_run_time_size = page_size != 65536 and t1sz is not None
    if walks_run_time_size:
        va_bits = 64 - t1sz
    if not page_shift < va_bits <= 52:
        source = "64 - NUMBER(TCR_EL1_T1SZ)" if walks_run_time_size else "NUMBER(VA_BITS)"
        raise BadSource(f"VMCOREINFO {source} = {va_bits} is not a virtual address size for "
                        f"PAGESIZE={page_size} (needs {page_shift} < bits <= 52)")
    bits_per_level = page_shift - 3
    level_count = -(-(va_bits - page_shift) // bits_per_level)
    root_number = 4 - level_count

    address_low_mask = OUTPUT_ADDRESS_BITS_47 & ~(page_size - 1)
    high_mask, high_shift = 0, 0
    block_levels = set(_BLOCK_LEVELS[page_size])
    if page_size == 65536:
        high_mask, high_shift = PA_51_48_FROM_BITS_15_12
        # 4 TiB level-1 blocks need 52-bit PAs (FEAT_LPA), which the kernel
        # reports as MAX_PHYSMEM_BITS (makedumpfile's lpa_52_bit_support_available).
        if vi.number(vmcoreinfo, "MAX_PHYSMEM_BITS") == 52:
            block_levels.add(_LPA_BLOCK_LEVEL[page_size])
    elif va_bits == 52:
        # Linux enables LPA2 only with 52-bit VAs and PAs together (commit
        # 352b0395b505, "arm64: Enable 52-bit virtual addressing for 4k and 16k
        # granule configs"), so the run-time VA size says whether bits [9:8]
        # are address bits.
        address_low_mask |= 0x3 << 48
        high_mask, high_shift = PA_51_50_FROM_BITS_9_8
        block_levels.add(_LPA_BLOCK_LEVEL[page_size])

    levels = []
    for number in range(root_number, 4):
        shift = page_shift + (3 - number) * bits_per_level
        entries = 1 << (min(va_bits, shift + bits_per_level) - shift)
        levels.append(Aarch64Level(number, shift, entries, number != 3 and number in block_levels))
    return Aarch64Paging(page_size, va_bits, tuple(levels), address_low_mask, high_mask, high_shift)


def _untagged(vaddr: int) -> int:
    """vaddr with its top byte made the sign extension of bit 55.

    KASAN's tag-based modes keep a tag in the top byte of kernel pointers and
    set TCR_EL1.TBI1 so that the MMU ignores it; bit 55 picks TTBR1 either way.
    """
    if vaddr & (1 << 55):
        return vaddr | 0xFF00_0000_0000_0000
    return vaddr & 0x00FF_FFFF_FFFF_FFFF


class Aarch64Translator(WalkingTranslator):
    """Kernel virtual -> physical on arm64 (4/16/64 KiB pages, 36- to 52-bit VAs), Linux 4.12+.

    read_physical(paddr, size) reads the dump. Every kernel address is
    translated by walking swapper_pg_dir, the TTBR1 root, whose physical
    address is SYMBOL(swapper_pg_dir) - NUMBER(kimage_voffset): swapper_pg_dir
    lives in the kernel image, which is mapped at kimage_voffset above its
    load address (since 4.6; VMCOREINFO says so from 4.12).

    No linear shortcut is taken, not even for the linear map, where
    paddr = vaddr - PAGE_OFFSET + NUMBER(PHYS_OFFSET) (PAGE_OFFSET
    -2**VA_BITS since 5.4's "flipped" layout, -2**(VA_BITS - 1) before):
    PAGE_OFFSET and memstart_addr both move with the 52-bit fallbacks (5.4,
    6.9), and linear addresses may be unmapped on purpose (NOMAP firmware
    memory, debug_pagealloc, KFENCE, secretmem), which only the tables show.
    The walk covers the kernel image, the linear map, vmemmap and vmalloc
    alike; read_virtual reads a whole block (a 2 MiB, 32 MiB, 512 MiB or
    1 GiB mapping) in one read_physical call.

    Only TTBR1 (kernel) addresses translate; a pointer's KASAN tag in the
    top byte is ignored, as the MMU does with TCR_EL1.TBI1.
    """

    def __init__(self, read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, *, byte_order: str = "little"):
        self._read_physical = read_physical
        self.paging = aarch64_paging(vmcoreinfo)
        swapper_pg_dir = vi.symbol(vmcoreinfo, "swapper_pg_dir", required=True)
        self.kimage_voffset = vi.number(vmcoreinfo, "kimage_voffset", required=True) & ADDRESS_MASK_64
        self.root_table_paddr = (swapper_pg_dir - self.kimage_voffset) & ADDRESS_MASK_64
        self.byte_order = byte_order
        self._descriptor_format = struct_prefix(byte_order) + "Q"
        self._last_level = self.paging.levels[-1]
        self._tables = TableCache(read_physical)

    def _table(self, table_paddr: int, entries: int) -> bytes:
        return self._tables.get(table_paddr, entries * ENTRY_BYTES)

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes from vaddr to the end of the page or block mapping it); BadSource if unmapped."""
        address = _untagged(vaddr)
        paging = self.paging
        if address < paging.kernel_start:
            raise BadSource(f"vaddr {vaddr:#x} is not a kernel address: the kernel half "
                            f"({paging.va_bits}-bit VAs) starts at {paging.kernel_start:#x}")
        table_paddr = self.root_table_paddr
        for level in paging.levels:
            index = (address >> level.shift) & (level.entries - 1)
            (descriptor,) = struct.unpack_from(self._descriptor_format, self._table(table_paddr, level.entries),
                                               index * ENTRY_BYTES)
            kind = descriptor & DESCRIPTOR_TYPE_MASK
            if kind == DESCRIPTOR_TABLE_OR_PAGE and level is not self._last_level:
                table_paddr = paging.output_address(descriptor) & ~(paging.page_size - 1)
                continue
            if kind == DESCRIPTOR_TABLE_OR_PAGE or (kind == DESCRIPTOR_BLOCK and level.holds_blocks):
                offset = address & (level.mapping_size - 1)
                return (paging.output_address(descriptor) & ~(level.mapping_size - 1)) | offset, \
                    level.mapping_size - offset
            if not kind & 1:
                why = "is not valid"
            elif level is self._last_level:
                why = "is reserved (0b01 at the last level)"
            else:
                why = f"is a block, which level {level.number} cannot hold with {paging.page_size // 1024} KiB pages"
            raise BadSource(f"vaddr {vaddr:#x} not mapped: level {level.number} descriptor {descriptor:#x} "
                            f"at paddr {table_paddr + index * ENTRY_BYTES:#x} {why}")
        raise AssertionError("the last level always returns or raises")


