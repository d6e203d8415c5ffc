"""Kernel virtual addresses on 64-bit Book3S PowerPC (ppc64le and ppc64), Linux 4.11+.

The layer over the dump's physical memory that dmesg and page classification
read kernel data through, driven by VMCOREINFO alone, as makedumpfile's
arch/ppc64.c does. A Book3S-64 kernel's address space (quadrant 3, the top
two bits set) is cut into regions by the bits below (6.1, both MMUs):

    0xc000... linear map      paddr = vaddr - PAGE_OFFSET (the kernel image is in it)
    0xc008... vmalloc, ioremap (KERN_VIRT_START): Linux page tables
    0xc00c... vmemmap         vmemmap_list (a list of (virt, phys) blocks the
                              kernel keeps for the hash MMU, which maps
                              vmemmap with bolted hash entries, not page
                              tables); the page tables when the list is empty

The Linux page tables (swapper_pg_dir) have one of two shapes: the radix MMU
(POWER9+) walks them in hardware, the hash MMU only in software. Both have
four levels of big-endian entries (since 4.7, even on little-endian kernels),
the next table's physical address in the entry (since 4.6), bit 63 present and
bit 62 (_PAGE_PTE) marking a leaf above the last level (a huge page).

Which MMU ran: NUMBER(RADIX_MMU) when VMCOREINFO has it; else
cur_cpu_spec->mmu_features (MMU_FTR_TYPE_RADIX) when VMCOREINFO gives the
symbol and offset; else the root table itself: radix non-leaf entries carry the
next level's index size in bits 0-4 (NLS), hash ones keep them zero. Debian's
6.1 exports neither key; makedumpfile 1.7.2 then assumes hash, which matters
only for vmalloc addresses (the printk buffer and struct pages are in the linear
map and vmemmap).

The kernel's byte order is not the ELF header's on every dump: QEMU 7.2 writes
pseries dumps of little-endian guests with big-endian headers. It is read from
memory: a kernel pointer variable (prb, mem_section) read in the right order is
a linear-map address.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from functools import cached_property

from ..errors import BadSource, SourceIOError, Unsupported
from . import vmcoreinfo as vi
from .memory import ReadPhysical, TableCache, WalkingTranslator, struct_prefix

PAGE_OFFSET = 0xC000_0000_0000_0000
# KERN_VIRT_START and the vmemmap region of 64 KiB and 4 KiB kernels since 4.20 (radix) / 5.x (hash).
KERN_VIRT_START = 0xC008_0000_0000_0000
VMEMMAP_START = 0xC00C_0000_0000_0000
KERNEL_QUADRANT_END = 1 << 64

ENTRY_PRESENT = 1 << 63  # _PAGE_PRESENT (4.6+)
ENTRY_LEAF = 1 << 62  # _PAGE_PTE: a huge page above the last level
# Non-leaf entries: present/leaf bits above, NLS (radix) and flags below (PGD/PUD/PMD_MASKED_BITS_4_7).
TABLE_ENTRY_FLAGS = 0xC000_0000_0000_00FF
RADIX_NEXT_LEVEL_SIZE = 0x1F
# Leaf entries: the real page number sits in place, bits up to 52 (PTE_RPN_MASK since 4.11).
LEAF_ADDRESS_BITS = (1 << 53) - 1
MMU_FTR_TYPE_RADIX = 0x40
# swapper_pg_dir is MAX_PGD_TABLE_SIZE (radix's 64 KiB) with either MMU and page size;
# a hash root uses its first 2 or 4 KiB and the rest stays zero.
MAX_PGD_TABLE_BYTES = 65536
# vmemmap_list holds one entry per vmemmap block (16 MiB or 2 MiB of struct pages);
# a list longer than this is a damaged or looping one.
MAX_VMEMMAP_BLOCKS = 1 << 22

# Index bits per level, (PTE, PMD, PUD, PGD), by MMU and page size (book3s/64/{radix,hash-64k,hash-4k}.h).
_INDEX_BITS = {
    ("radix", 65536): (5, 9, 9, 13),
    ("radix", 4096): (9, 9, 9, 13),
    ("hash", 65536): (8, 10, 10, 8),  # 4.17+
    ("hash", 4096): (9, 7, 9, 9),
}
_LEVEL_NAMES = ("PGD", "PUD", "PMD", "PTE")


@dataclass(frozen=True)
class Ppc64Level:
    name: str
    shift: int  # log2 of the bytes one entry maps
    entries: int


def ppc64_levels(mmu: str, page_size: int) -> tuple[Ppc64Level, ...]:
    """The four levels of swapper_pg_dir, root first."""
    bits = _INDEX_BITS.get((mmu, page_size))
    if bits is None:
        raise BadSource(f"VMCOREINFO PAGESIZE={page_size} is not a ppc64 page size (4096, 65536)")
    shift = page_size.bit_length() - 1
    levels = []
    for name, index_bits in zip(reversed(_LEVEL_NAMES), bits):
        levels.append(Ppc64Level(name, shift, 1 << index_bits))
        shift += index_bits
    return tuple(reversed(levels))


def _exactly(read_physical: ReadPhysical, paddr: int, size: int) -> bytes:
    data = read_physical(paddr, size)
    if len(data) != size:
        raise BadSource(f"ppc64 kernel data at paddr {paddr:#x}: read {len(data)} of {size} bytes")
    return data


def _orders_reading_as(raw: bytes, wanted) -> list[str]:
    """The byte orders in which 8 bytes read as a value that wanted(value) accepts."""
    return [order for order in ("little", "big") if wanted(int.from_bytes(raw, order))]


def ppc64_kernel_byte_order(read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, header_byte_order: str) -> str:
    """The crashed kernel's byte order, told by pointer variables in its image.

    prb (5.10+) points at printk_rb_static, whose address VMCOREINFO also
    gives: the order in which it reads so is the kernel's. Else the first of
    prb, mem_section and vmemmap_list that reads as a linear-map address in
    one order only decides. When nothing decides, the ELF header's order is kept.
    """
    def pointer_at(name: str) -> bytes | None:
        vaddr = vi.symbol(vmcoreinfo, name)
        if vaddr is None or not PAGE_OFFSET <= vaddr < KERN_VIRT_START:
            return None
        try:
            return _exactly(read_physical, vaddr - PAGE_OFFSET, 8)
        except (BadSource, SourceIOError):
            return None

    static = vi.symbol(vmcoreinfo, "printk_rb_static")
    raw = pointer_at("prb")
    if raw is not None and static is not None:
        orders = _orders_reading_as(raw, lambda value: value == static)
        if len(orders) == 1:
            return orders[0]
    for name in ("prb", "mem_section", "vmemmap_list"):
        raw = pointer_at(name)
        if raw is not None:
            orders = _orders_reading_as(raw, lambda value: PAGE_OFFSET <= value < KERN_VIRT_START)
            if len(orders) == 1:
                return orders[0]
    return header_byte_order


class Ppc64Translator(WalkingTranslator):
    """Kernel virtual -> physical on Book3S-64 (radix or hash MMU; 64 KiB or 4 KiB pages).

    read_physical(paddr, size) reads the dump. byte_order is the kernel's (see
    ppc64_kernel_byte_order); page-table entries are big-endian regardless.
    """

    # MAX_PHYSMEM_BITS of kernels that do not export it, oldest first (makedumpfile:
    # _MAX_PHYSMEM_BITS_ORIG, _3_7, _4_19, _4_20); page classification picks by LENGTH(mem_section).
    physmem_bits_candidates = (42, 46, 47, 51)

    def __init__(self, read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, *, byte_order: str = "little"):
        self._read_physical = read_physical
        self.byte_order = byte_order
        self._int = struct_prefix(byte_order)
        self.page_size = vi.page_size(vmcoreinfo, required=True)
        if self.page_size not in (4096, 65536):
            raise BadSource(f"VMCOREINFO PAGESIZE={self.page_size} is not a ppc64 page size (4096, 65536)")
        self.kernel_start = vi.symbol(vmcoreinfo, "_stext") or PAGE_OFFSET
        if self.kernel_start != PAGE_OFFSET:
            # makedumpfile translates the linear map as vaddr - SYMBOL(_stext);
            # a relocated kernel (_stext elsewhere) is not what it expects either.
            raise Unsupported(f"ppc64 kernel with SYMBOL(_stext)={self.kernel_start:#x}, not PAGE_OFFSET "
                              f"{PAGE_OFFSET:#x}")
        self.vmalloc_start = vi.number(vmcoreinfo, "vmalloc_start") or KERN_VIRT_START
        if not PAGE_OFFSET < self.vmalloc_start < KERNEL_QUADRANT_END:
            raise BadSource(f"VMCOREINFO NUMBER(vmalloc_start)={self.vmalloc_start:#x} is not a ppc64 "
                            f"kernel address")
        swapper_pg_dir = vi.symbol(vmcoreinfo, "swapper_pg_dir", required=True)
        if not PAGE_OFFSET <= swapper_pg_dir < KERN_VIRT_START:
            raise BadSource(f"VMCOREINFO SYMBOL(swapper_pg_dir)={swapper_pg_dir:x} is not in the ppc64 "
                            f"linear map ({PAGE_OFFSET:#x}-{KERN_VIRT_START:#x})")
        self.root_table_paddr = swapper_pg_dir - PAGE_OFFSET
        self._tables = TableCache(lambda paddr, size: _exactly(read_physical, paddr, size))
        self._vmcoreinfo = vmcoreinfo

    # The MMU type and vmemmap_list are read when first needed: the printk
    # buffer is in the linear map, and a dump whose tables are damaged or
    # left out should still give its log.

    @cached_property
    def mmu(self) -> str:
        """"radix" or "hash"."""
        return self._mmu_type(self._vmcoreinfo)

    @cached_property
    def levels(self) -> tuple[Ppc64Level, ...]:
        return ppc64_levels(self.mmu, self.page_size)

    @cached_property
    def vmemmap_blocks(self) -> tuple[list[tuple[int, int]], int]:
        """([(virt, phys)] sorted by virt, block bytes) from vmemmap_list; ([], 0) without one."""
        return self._vmemmap_blocks(self._vmcoreinfo)

    @cached_property
    def _vmemmap_virt(self) -> list[int]:
        return [virt for virt, _phys in self.vmemmap_blocks[0]]

    # -- reading kernel data before translation works: the linear map only ----------------------

    def _linear(self, vaddr: int, size: int) -> bytes:
        if not PAGE_OFFSET <= vaddr < self.vmalloc_start:
            raise BadSource(f"ppc64 kernel data at {vaddr:#x} is outside the linear map")
        return _exactly(self._read_physical, vaddr - PAGE_OFFSET, size)

    def _u64(self, vaddr: int) -> int:
        return struct.unpack(self._int + "Q", self._linear(vaddr, 8))[0]

    def _i32(self, vaddr: int) -> int:
        return struct.unpack(self._int + "i", self._linear(vaddr, 4))[0]

    def _mmu_type(self, info: vi.VmcoreInfo) -> str:
        known = self.mmu_if_known(info)
        if known is not None:
            return known
        cur_cpu_spec = vi.symbol(info, "cur_cpu_spec")
        features_at = vi.offset(info, "cpu_spec.mmu_features")
        if cur_cpu_spec is not None and features_at is not None:
            features = struct.unpack(self._int + "I", self._linear(self._u64(cur_cpu_spec) + features_at, 4))[0]
            return "radix" if features & MMU_FTR_TYPE_RADIX else "hash"
        root = self._table(self.root_table_paddr, MAX_PGD_TABLE_BYTES)
        entries = [e for (e,) in struct.iter_unpack(">Q", root) if e & ENTRY_PRESENT and not e & ENTRY_LEAF]
        return "radix" if any(e & RADIX_NEXT_LEVEL_SIZE for e in entries) else "hash"

    @staticmethod
    def mmu_if_known(info: vi.VmcoreInfo) -> str | None:
        """What NUMBER(RADIX_MMU) says (newer kernels export it), None without it."""
        radix = vi.number(info, "RADIX_MMU")
        return None if radix is None else ("radix" if radix == 1 else "hash")

    def _vmemmap_blocks(self, info: vi.VmcoreInfo) -> tuple[list[tuple[int, int]], int]:
        head_at = vi.symbol(info, "vmemmap_list")
        if head_at is None:
            return [], 0
        backing_size = vi.size(info, "vmemmap_backing", required=True)
        list_at = vi.offset(info, "vmemmap_backing.list", required=True)
        phys_at = vi.offset(info, "vmemmap_backing.phys", required=True)
        virt_at = vi.offset(info, "vmemmap_backing.virt_addr", required=True)
        head = self._u64(head_at)
        if head == 0:
            return [], 0
        psize = self._i32(vi.symbol(info, "mmu_vmemmap_psize", required=True))
        def_size = vi.size(info, "mmu_psize_def", required=True)
        shift_at = vi.offset(info, "mmu_psize_def.shift", required=True)
        for key, at in (("list", list_at), ("phys", phys_at), ("virt_addr", virt_at)):
            if at + 8 > backing_size:
                raise BadSource(f"VMCOREINFO OFFSET(vmemmap_backing.{key})={at} does not fit "
                                f"SIZE(vmemmap_backing)={backing_size}")
        if not 0 <= psize < 64:
            raise BadSource(f"ppc64 mmu_vmemmap_psize {psize} is not a page-size index")
        shift = self._i32(vi.symbol(info, "mmu_psize_defs", required=True) + psize * def_size + shift_at)
        if not 12 <= shift <= 34:
            raise BadSource(f"ppc64 vmemmap page shift {shift} (mmu_psize_defs[{psize}]) is not a page shift")
        blocks = []
        seen = set()
        node = head
        while node and node not in seen:
            if len(blocks) >= MAX_VMEMMAP_BLOCKS:
                raise BadSource(f"ppc64 vmemmap_list has more than {MAX_VMEMMAP_BLOCKS} entries")
            seen.add(node)
            raw = self._linear(node, backing_size)
            (next_node,) = struct.unpack_from(self._int + "Q", raw, list_at)
            (phys,) = struct.unpack_from(self._int + "Q", raw, phys_at)
            (virt,) = struct.unpack_from(self._int + "Q", raw, virt_at)
            blocks.append((virt, phys))
            node = next_node
        blocks.sort()
        return blocks, 1 << shift

    # -- translation ----------------------------------------------------------------------------

    def _table(self, table_paddr: int, size: int) -> bytes:
        return self._tables.get(table_paddr, size)

    def walk_page_tables(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes mapped from there) by swapper_pg_dir, as makedumpfile's ppc64_vtop_level4."""
        table_paddr = self.root_table_paddr
        for level in self.levels:
            index = (vaddr >> level.shift) & (level.entries - 1)
            (entry,) = struct.unpack_from(">Q", self._table(table_paddr, level.entries * 8), index * 8)
            where = f"{level.name} entry {entry:#x} at paddr {table_paddr + index * 8:#x}"
            if not entry & ENTRY_PRESENT:
                raise BadSource(f"vaddr {vaddr:#x} not mapped: {where} is not present")
            if entry & ENTRY_LEAF or level is self.levels[-1]:
                size = 1 << level.shift
                offset = vaddr & (size - 1)
                return (entry & LEAF_ADDRESS_BITS & ~(size - 1) & ~(self.page_size - 1)) | offset, size - offset
            table_paddr = entry & ~TABLE_ENTRY_FLAGS
        raise AssertionError("the last level always returns or raises")

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(paddr, bytes from vaddr to the end of the piece mapping it); BadSource if unmapped."""
        if PAGE_OFFSET <= vaddr < self.vmalloc_start:
            end = self.vmalloc_start
            return vaddr - PAGE_OFFSET, end - vaddr
        if VMEMMAP_START <= vaddr < KERNEL_QUADRANT_END and self._vmemmap_virt:
            blocks, block_size = self.vmemmap_blocks
            at = bisect.bisect_right(self._vmemmap_virt, vaddr) - 1
            if at >= 0 and vaddr < blocks[at][0] + block_size:
                virt, phys = blocks[at]
                return phys + vaddr - virt, virt + block_size - vaddr
            raise BadSource(f"vaddr {vaddr:#x} not mapped: no vmemmap_list block holds it")
        if self.vmalloc_start <= vaddr < KERNEL_QUADRANT_END:
            return self.walk_page_tables(vaddr)
        raise BadSource(f"vaddr {vaddr:#x} is not a ppc64 kernel address (below {PAGE_OFFSET:#x})")



def make_ppc64_translator(read_physical: ReadPhysical, vmcoreinfo: vi.VmcoreInfo, assumed: str) -> Ppc64Translator:
    """The translator for a ppc64 dump whose platform says ``assumed`` ("little" or "big"),
    which the kernel's own data may overrule (QEMU 7.2's pseries dumps)."""
    return Ppc64Translator(read_physical, vmcoreinfo,
                           byte_order=ppc64_kernel_byte_order(read_physical, vmcoreinfo, assumed))
