"""aarch64 kernel virtual -> physical translation on synthetic arm64 vmcores.

Each vmcore is an ELF64 little-endian EM_AARCH64 core built by vmcap.sample
("pattern" RAM, so a byte read from the wrong physical address shows), with
real translation tables written over some of its pages: swapper_pg_dir in
the kernel image, the kernel image mapped by pages (and a 2 MiB block with 4
KiB pages), the linear map by pages and by blocks at every level Linux uses,
vmalloc pages scattered in reverse order, and for 52-bit configurations
physical addresses above 2**48. The tables here are built from the kernel's
own definitions (pgtable-hwdef.h ARM64_HW_PGTABLE_LEVEL_SHIFT, the
descriptor formats of the Arm ARM), the expected levels per configuration
are written out by hand, and drgn, which walks the same tables with its own
code when a kernel address is not in any PT_LOAD's p_vaddr, is the
independent oracle for every read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmcap.errors import BadSource, Unsupported
from vmcap.kernel.arch import make_translator
from vmcap.kernel.translate import Aarch64Translator, X86_64Translator
from vmcap.sample import EM_AARCH64, RamRange, SampleSpec, build_vmcore, expected_bytes
from vmcap.save import SaveOptions, save
from vmcap.source.dump import kernel_log, open_dump

try:
    import drgn
except ImportError:  # pragma: no cover - drgn is an optional oracle
    drgn = None

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
U64 = (1 << 64) - 1

# Descriptor bits (Arm ARM, VMSAv8-64 translation table formats).
VALID = 0x1
TABLE_OR_PAGE = 0x3
BLOCK = 0x1
AF = 1 << 10
NG = 1 << 11
SH_INNER = 0x3 << 8  # bits [9:8]: shareability without LPA2, PA[51:50] with it
ATTR_INDX_NORMAL = 0x4 << 2
AP_READ_ONLY = 1 << 7
DBM = 1 << 51
CONTIGUOUS = 1 << 52
PXN, UXN = 1 << 53, 1 << 54
SOFTWARE_DIRTY = 1 << 55
PXN_TABLE, UXN_TABLE = 1 << 59, 1 << 60
BLOCK_NT = 1 << 16  # FEAT_BBM's nT hint in block descriptors: below the block's output address

KERNELOFFSET = 0x2A0_0000  # KASLR shift, 2 MiB aligned as arm64 makes it
MODULES_VSIZE = 128 * MIB
KERNEL_IMAGE_AT = 2 * MIB  # the image's physical offset from PHYS_OFFSET
KERNEL_IMAGE_BYTES = 4 * MIB
SWAPPER_PG_DIR_AT = 3 * MIB  # swapper_pg_dir's offset in the image
VMALLOC_TARGETS_AT = 6 * MIB  # physical pages behind the scattered vmalloc mapping
TABLE_POOL_AT = 8 * MIB
LOW_RAM_BYTES = 12 * MIB  # [PHYS_OFFSET, +12 MiB) is in the dump and mapped linearly by pages
VMALLOC_PAGES = 6


@dataclass(frozen=True)
class Arm64Config:
    """One arm64 kernel configuration, with what its walk must look like (by hand)."""

    name: str
    page_size: int
    va_bits: int  # NUMBER(VA_BITS): the configured size
    t1sz: int | None  # NUMBER(TCR_EL1_T1SZ) (5.9+); None for older kernels
    walk_bits: int  # the VA size swapper_pg_dir is laid out for
    levels: int  # table levels of the walk
    root_entries: int
    linear_blocks: tuple[tuple[int, int], ...]  # (Arm level, paddr) blocks in the linear map
    flipped: bool = True  # 5.4+ layout: linear map in the lower half of the kernel VAs
    phys_offset: int = 1 * GIB  # memstart_addr (QEMU virt puts RAM at 1 GiB)
    max_physmem_bits: int | None = None
    high_paddr: int | None = None  # a page above 2**48 mapped in vmalloc
    lpa2: bool = False  # descriptor bits [9:8] are PA[51:50]
    forbidden_block_level: int | None = None  # a level where a 0b01 descriptor must fault
    osrelease: str = "6.6.0-vmcap-arm64"

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def runtime_bits(self) -> int:
        return 64 - self.t1sz if self.t1sz is not None else self.va_bits

    @property
    def page_offset(self) -> int:
        """Where the linear map starts (arch/arm64/include/asm/memory.h)."""
        if self.flipped:
            return (-(1 << self.runtime_bits)) & U64
        return (-(1 << (self.va_bits - 1))) & U64

    @property
    def kimage_vaddr(self) -> int:
        """_text: KIMAGE_VADDR (MODULES_END) plus the KASLR offset."""
        if self.flipped:
            modules_vaddr = -(1 << (min(self.va_bits, 48) - 1))  # _PAGE_END(VA_BITS_MIN)
        else:
            modules_vaddr = -(1 << self.va_bits)  # VA_START
        return (modules_vaddr + MODULES_VSIZE + KERNELOFFSET) & U64

    @property
    def kernel_paddr(self) -> int:
        return self.phys_offset + KERNEL_IMAGE_AT

    @property
    def kimage_voffset(self) -> int:
        return (self.kimage_vaddr - self.kernel_paddr) & U64

    @property
    def swapper_pg_dir(self) -> int:
        return self.kimage_vaddr + SWAPPER_PG_DIR_AT

    @property
    def vmalloc_vaddr(self) -> int:
        return self.kimage_vaddr + 256 * MIB

    def linear(self, paddr: int) -> int:
        return self.page_offset + (paddr - self.phys_offset)

    def level_shift(self, level: int) -> int:
        """ARM64_HW_PGTABLE_LEVEL_SHIFT(n) = (PAGE_SHIFT - 3) * (4 - n) + 3."""
        return (self.page_shift - 3) * (4 - level) + 3

    def vmcoreinfo(self) -> dict[str, str]:
        info = {
            "OSRELEASE": self.osrelease,
            "PAGESIZE": str(self.page_size),
            "SYMBOL(swapper_pg_dir)": f"{self.swapper_pg_dir:x}",
            "NUMBER(VA_BITS)": str(self.va_bits),
            "NUMBER(kimage_voffset)": f"0x{self.kimage_voffset:x}",
            "NUMBER(PHYS_OFFSET)": f"0x{self.phys_offset:x}",
            "KERNELOFFSET": f"{KERNELOFFSET:x}",
            "CRASHTIME": "1700000000",
        }
        if self.t1sz is not None:
            info["NUMBER(TCR_EL1_T1SZ)"] = f"0x{self.t1sz:x}"
        if self.max_physmem_bits is not None:
            info["NUMBER(MAX_PHYSMEM_BITS)"] = str(self.max_physmem_bits)
        return info


CONFIGS = (
    Arm64Config("4k-48bit-4level", 4096, 48, 16, 48, 4, 512,
                ((2, 1 * GIB + 16 * MIB), (2, 1 * GIB + 18 * MIB), (1, 2 * GIB)), forbidden_block_level=0),
    Arm64Config("4k-39bit-3level", 4096, 39, 25, 39, 3, 512,
                ((2, 1 * GIB + 16 * MIB), (1, 2 * GIB))),
    Arm64Config("4k-48bit-before-5.4", 4096, 48, None, 48, 4, 512,
                ((2, 1 * GIB + 16 * MIB), (1, 2 * GIB)), flipped=False, osrelease="5.3.0-vmcap-arm64",
                forbidden_block_level=0),
    Arm64Config("4k-52bit-lpa2-5level", 4096, 52, 12, 52, 5, 16,
                ((2, 16 * MIB), (1, 1 * GIB), (0, 512 * GIB), (2, 0x7_0000_0000_0000)),
                phys_offset=0, max_physmem_bits=52, high_paddr=0xF_ABCD_1234_5000, lpa2=True,
                forbidden_block_level=-1),
    Arm64Config("4k-52bit-on-48bit-cpu", 4096, 52, 16, 48, 4, 512,
                ((2, 1 * GIB + 16 * MIB), (1, 2 * GIB)), forbidden_block_level=0),
    Arm64Config("16k-47bit-3level", 16384, 47, 17, 47, 3, 2048,
                ((2, 1 * GIB + 32 * MIB), (2, 1 * GIB + 64 * MIB)), forbidden_block_level=1),
    Arm64Config("16k-48bit-4level", 16384, 48, 16, 48, 4, 2,
                ((2, 1 * GIB + 32 * MIB),), forbidden_block_level=1),
    Arm64Config("16k-36bit-2level", 16384, 36, 28, 36, 2, 2048,
                ((2, 1 * GIB + 32 * MIB),)),
    Arm64Config("64k-42bit-2level", 65536, 42, 22, 42, 2, 8192,
                ((2, 1 * GIB + 512 * MIB),)),
    Arm64Config("64k-48bit-3level", 65536, 48, 16, 48, 3, 64,
                ((2, 1 * GIB + 512 * MIB),), forbidden_block_level=1),
    Arm64Config("64k-52bit-lpa-3level", 65536, 52, 12, 52, 3, 1024,
                ((2, 512 * MIB), (1, 4 * TIB), (2, 0x7_0000_0000_0000)),
                phys_offset=0, max_physmem_bits=52, high_paddr=0xF_ABCD_1234_0000),
    # 64 KiB pages: swapper_pg_dir stays laid out for 52 bits when the CPU only
    # has 48 (TTBR1 points into it at an offset), so the walk uses VA_BITS.
    Arm64Config("64k-52bit-on-48bit-cpu", 65536, 52, 16, 52, 3, 1024,
                ((2, 1 * GIB + 512 * MIB),), forbidden_block_level=1),
)


# --- building translation tables and the vmcore around them ----------------------------------


@dataclass
class TranslationTables:
    """arm64 TTBR1 tables under construction: {table paddr: contents}, allocated from a pool."""

    config: Arm64Config
    byte_order: str = "little"
    tables: dict[int, bytearray] = field(default_factory=dict)
    next_table: int = 0

    def __post_init__(self):
        self.next_table = self.config.phys_offset + TABLE_POOL_AT
        self.tables[self.root_paddr] = bytearray(self.config.page_size)

    @property
    def root_paddr(self) -> int:
        return self.config.kernel_paddr + SWAPPER_PG_DIR_AT

    @property
    def root_level(self) -> int:
        return 4 - self.config.levels

    def index(self, vaddr: int, level: int) -> int:
        c = self.config
        bits = c.walk_bits - c.level_shift(level) if level == self.root_level else c.page_shift - 3
        return (vaddr >> c.level_shift(level)) & ((1 << bits) - 1)

    def address_bits(self, paddr: int) -> int:
        """paddr as a descriptor holds it (52-bit PAs split as FEAT_LPA / FEAT_LPA2 place them)."""
        c = self.config
        if c.page_size == 65536:
            return (paddr & ((1 << 48) - 1)) | (((paddr >> 48) & 0xF) << 12)
        if c.lpa2:
            return (paddr & ((1 << 50) - 1)) | (((paddr >> 50) & 0x3) << 8)
        assert paddr < 1 << 48
        return paddr

    def leaf_attributes(self) -> int:
        """Attribute bits a kernel mapping carries, which translation must ignore."""
        attributes = AF | NG | ATTR_INDX_NORMAL | AP_READ_ONLY | DBM | CONTIGUOUS | PXN | UXN | SOFTWARE_DIRTY
        return attributes if self.config.lpa2 else attributes | SH_INNER

    def entry_paddr(self, vaddr: int, level: int) -> int:
        """The paddr of vaddr's descriptor at level, making the tables above it."""
        table = self.root_paddr
        for upper in range(self.root_level, level):
            at = table + 8 * self.index(vaddr, upper)
            descriptor = self._get(at)
            if descriptor & TABLE_OR_PAGE != TABLE_OR_PAGE:
                assert descriptor == 0, f"{vaddr:#x}: level {upper} already maps a block"
                new_table = self.next_table
                assert new_table + self.config.page_size <= self.config.phys_offset + LOW_RAM_BYTES
                self.next_table += self.config.page_size
                self.tables[new_table] = bytearray(self.config.page_size)
                descriptor = self.address_bits(new_table) | TABLE_OR_PAGE | AF | PXN_TABLE | UXN_TABLE
                self._put(at, descriptor)
            table = self._table_address(descriptor)
        return table + 8 * self.index(vaddr, level)

    def _table_address(self, descriptor: int) -> int:
        if self.config.page_size == 65536:
            return (descriptor & ((1 << 48) - 1) & ~0xFFFF) | (((descriptor >> 12) & 0xF) << 48)
        if self.config.lpa2:
            return (descriptor & ((1 << 50) - 1) & ~0xFFF) | (((descriptor >> 8) & 0x3) << 50)
        return descriptor & ((1 << 48) - 1) & ~(self.config.page_size - 1)

    def _frame(self, paddr: int) -> tuple[bytearray, int]:
        page = paddr & ~(self.config.page_size - 1)
        return self.tables[page], paddr - page

    def _get(self, paddr: int) -> int:
        table, at = self._frame(paddr)
        return int.from_bytes(table[at:at + 8], self.byte_order)

    def _put(self, paddr: int, descriptor: int) -> None:
        table, at = self._frame(paddr)
        table[at:at + 8] = descriptor.to_bytes(8, self.byte_order)

    def map(self, vaddr: int, paddr: int, level: int = 3) -> None:
        """A page (level 3) or block descriptor mapping vaddr to paddr."""
        size = 1 << self.config.level_shift(level)
        assert vaddr % size == 0 and paddr % size == 0, (hex(vaddr), hex(paddr), level)
        kind = TABLE_OR_PAGE if level == 3 else BLOCK | BLOCK_NT
        self.set(vaddr, level, self.address_bits(paddr) | kind | self.leaf_attributes())

    def set(self, vaddr: int, level: int, descriptor: int) -> int:
        """Write a raw descriptor for vaddr at level; returns its paddr."""
        at = self.entry_paddr(vaddr, level)
        self._put(at, descriptor)
        return at

    def read_physical(self, paddr: int, size: int) -> bytes:
        """Table memory only (for tests that need no vmcore)."""
        table, at = self._frame(paddr)
        assert at + size <= len(table)
        return bytes(table[at:at + size])


@dataclass(frozen=True)
class Probe:
    """A read whose translation is known: size bytes at vaddr are at paddr."""

    vaddr: int
    paddr: int
    size: int
    what: str


@dataclass
class Arm64Vmcore:
    config: Arm64Config
    path: Path
    spec: SampleSpec
    tables: TranslationTables
    probes: list[Probe]
    unmapped: dict[str, int]  # what -> vaddr that must not translate

    def expected(self, paddr: int, size: int) -> bytes:
        """Physical memory as written: the sample's pattern, with table pages over it."""
        out = bytearray(expected_bytes(self.spec, paddr, size))
        page_size = self.config.page_size
        for table_paddr, table in self.tables.tables.items():
            lo, hi = max(paddr, table_paddr), min(paddr + size, table_paddr + page_size)
            if lo < hi:
                out[lo - paddr:hi - paddr] = table[lo - table_paddr:hi - table_paddr]
        return bytes(out)


def build_arm64_vmcore(config: Arm64Config, directory: Path) -> Arm64Vmcore:
    """Write an arm64 vmcore with the tables and mappings described in the module docstring."""
    c = config
    page = c.page_size
    tables = TranslationTables(c)
    probes: list[Probe] = []
    ranges = [RamRange(c.phys_offset, LOW_RAM_BYTES)]

    # The kernel image: pages, and with 4 KiB pages its first 2 MiB as one block.
    image_block = 2 * MIB if page == 4096 else 0
    if image_block:
        tables.map(c.kimage_vaddr, c.kernel_paddr, level=2)
    for offset in range(image_block, KERNEL_IMAGE_BYTES, page):
        tables.map(c.kimage_vaddr + offset, c.kernel_paddr + offset)
    for offset in (0, 8, image_block - 8 if image_block else page + 24, 2 * MIB + 3 * page + 16,
                   KERNEL_IMAGE_BYTES - 64):
        probes.append(Probe(c.kimage_vaddr + offset, c.kernel_paddr + offset, 64, "kernel image"))
    probes.append(Probe(c.kimage_vaddr + MIB - 100, c.kernel_paddr + MIB - 100, 3 * MIB, "kernel image span"))
    probes.append(Probe(c.swapper_pg_dir, tables.root_paddr, 8 * c.root_entries, "swapper_pg_dir"))

    # Low RAM in the linear map by pages (rodata=full maps it so), holes punched below.
    for offset in range(0, LOW_RAM_BYTES, page):
        if offset in (7 * MIB, 7 * MIB + page):
            continue
        tables.map(c.linear(c.phys_offset + offset), c.phys_offset + offset)
    for offset in (0, KERNEL_IMAGE_AT + 40, SWAPPER_PG_DIR_AT + KERNEL_IMAGE_AT, TABLE_POOL_AT + 8,
                   LOW_RAM_BYTES - 8):
        paddr = c.phys_offset + offset
        probes.append(Probe(c.linear(paddr), paddr, 8, "linear page"))
    probes.append(Probe(c.linear(c.phys_offset + 5 * page - 16), c.phys_offset + 5 * page - 16, 4 * page,
                        "linear pages span"))

    # Linear-map blocks; the dump holds a window in the middle and the last page of each.
    for level, paddr in c.linear_blocks:
        size = 1 << c.level_shift(level)
        tables.map(c.linear(paddr), paddr, level)
        middle = paddr + size // 2
        ranges += [RamRange(middle - page, 2 * page), RamRange(paddr + size - page, page)]
        probes += [
            Probe(c.linear(middle - 24), middle - 24, 48, f"level {level} block middle"),
            Probe(c.linear(middle - page), middle - page, 2 * page, f"level {level} block window"),
            Probe(c.linear(paddr + size - 8), paddr + size - 8, 8, f"level {level} block end"),
        ]

    # vmalloc: pages whose physical frames run backwards, so no two are contiguous.
    targets = [c.phys_offset + VMALLOC_TARGETS_AT + (VMALLOC_PAGES - 1 - i) * page for i in range(VMALLOC_PAGES)]
    if c.high_paddr is not None:
        targets[2] = c.high_paddr
        ranges.append(RamRange(c.high_paddr, page))
    for i, paddr in enumerate(targets):
        tables.map(c.vmalloc_vaddr + i * page, paddr)
        probes.append(Probe(c.vmalloc_vaddr + i * page + 16 * i, paddr + 16 * i, 32, f"vmalloc page {i}"))

    # What must not translate.
    unmapped = {
        "linear hole": c.linear(c.phys_offset + 7 * MIB),
        "invalid pte": c.vmalloc_vaddr + VMALLOC_PAGES * page,
        "reserved pte": c.vmalloc_vaddr + (VMALLOC_PAGES + 1) * page,
        "no table": c.vmalloc_vaddr + 64 * GIB if c.walk_bits > 40 else c.vmalloc_vaddr + 1 * GIB,
        "user address": 0x0000_FFFF_8000_1000,
    }
    # debug_pagealloc / set_memory_valid(false): the address bits stay, the valid bit goes.
    tables.set(unmapped["invalid pte"], 3, tables.address_bits(targets[0]) | tables.leaf_attributes() | 0x2)
    tables.set(unmapped["reserved pte"], 3, tables.address_bits(targets[0]) | tables.leaf_attributes() | BLOCK)
    if c.forbidden_block_level is not None:
        # Slot 1 of that level under the first root slot: past the linear map's low RAM and blocks.
        vaddr = (-(1 << c.walk_bits) & U64) + (1 << c.level_shift(c.forbidden_block_level))
        tables.set(vaddr, c.forbidden_block_level, tables.address_bits(0) | BLOCK | AF)
        unmapped["block at a table-only level"] = vaddr

    spec = SampleSpec(ranges=tuple(ranges), page_size=page, machine=EM_AARCH64, cpus=1,
                      vmcoreinfo=c.vmcoreinfo(), content="pattern")
    path = directory / f"{c.name}.vmcore"
    written = build_vmcore(str(path), spec)
    with open(path, "r+b") as f:
        for table_paddr, table in tables.tables.items():
            segment = next(s for s in written.segments if s.paddr <= table_paddr < s.paddr + s.filesz)
            f.seek(segment.offset + table_paddr - segment.paddr)
            f.write(table)
    return Arm64Vmcore(c, path, spec, tables, probes, unmapped)


@pytest.fixture(scope="module", params=CONFIGS, ids=[c.name for c in CONFIGS])
def arm64_vmcore(request, tmp_path_factory) -> Arm64Vmcore:
    return build_arm64_vmcore(request.param, tmp_path_factory.mktemp(request.param.name))


def open_translator(vmcore: Arm64Vmcore):
    dump = open_dump(str(vmcore.path))
    return dump, make_translator(dump.physical.read, dump.vmcoreinfo, dump.platform)


# --- translation ------------------------------------------------------------------------------


def test_walk_shape_follows_page_size_and_va_bits(arm64_vmcore):
    c = arm64_vmcore.config
    dump, translator = open_translator(arm64_vmcore)
    with dump:
        assert dump.platform.machine == "EM_AARCH64"
        assert isinstance(translator, Aarch64Translator)
        assert translator.paging.va_bits == c.walk_bits
        assert len(translator.paging.levels) == c.levels
        assert translator.paging.levels[0].entries == c.root_entries
        assert translator.root_table_paddr == c.kernel_paddr + SWAPPER_PG_DIR_AT


def test_kimage_linear_block_and_vmalloc_addresses_translate_to_their_pages(arm64_vmcore):
    c = arm64_vmcore.config
    dump, translator = open_translator(arm64_vmcore)
    with dump:
        for probe in arm64_vmcore.probes:
            assert translator.to_physical(probe.vaddr) == probe.paddr, probe.what
            assert translator.read_virtual(probe.vaddr, probe.size) == arm64_vmcore.expected(probe.paddr, probe.size), \
                probe.what
            if probe.what.startswith(("linear", "level")):
                # The linear map's own formula, which the translator never uses.
                assert probe.paddr == probe.vaddr - c.page_offset + c.phys_offset
            if probe.what.startswith("kernel image") or probe.what == "swapper_pg_dir":
                assert probe.paddr == probe.vaddr - c.kimage_voffset


def test_kasan_tag_in_the_top_byte_is_ignored(arm64_vmcore):
    dump, translator = open_translator(arm64_vmcore)
    with dump:
        probe = arm64_vmcore.probes[0]
        tagged = (probe.vaddr & ~(0xFF << 56)) | (0xF2 << 56)
        assert translator.to_physical(tagged) == probe.paddr


def test_unmapped_addresses_are_one_line_bad_source_naming_vaddr_level_and_descriptor(arm64_vmcore):
    dump, translator = open_translator(arm64_vmcore)
    with dump:
        for what, vaddr in arm64_vmcore.unmapped.items():
            with pytest.raises(BadSource) as raised:
                translator.to_physical(vaddr)
            message = str(raised.value)
            assert "\n" not in message and f"{vaddr:#x}" in message, what
            if what == "user address":
                assert "not a kernel address" in message
                continue
            assert "level " in message and "descriptor 0x" in message and "at paddr 0x" in message, message
            if what == "invalid pte":
                assert "level 3 descriptor" in message and "is not valid" in message
            if what == "reserved pte":
                assert "reserved" in message
            if what == "block at a table-only level":
                assert "cannot hold" in message


@pytest.mark.skipif(drgn is None, reason="drgn is not installed")
def test_drgn_reads_the_same_bytes_through_its_own_page_table_walk(arm64_vmcore):
    dump, translator = open_translator(arm64_vmcore)
    program = drgn.Program()
    program.set_core_dump(str(arm64_vmcore.path))
    with dump:
        for probe in arm64_vmcore.probes:
            assert program.read(probe.vaddr, probe.size) == translator.read_virtual(probe.vaddr, probe.size), \
                probe.what
        for what, vaddr in arm64_vmcore.unmapped.items():
            if what == "block at a table-only level":
                continue  # drgn takes any 0b01 above the last level as a block; the MMU does not
            with pytest.raises(drgn.FaultError):
                program.read(vaddr, 8)


def test_reads_coalesce_physically_contiguous_pages_and_whole_blocks(arm64_vmcore):
    c = arm64_vmcore.config
    dump = open_dump(str(arm64_vmcore.path))
    with dump:
        reads = []

        def recording_read(paddr, size):
            reads.append((paddr, size))
            return dump.physical.read(paddr, size)

        translator = make_translator(recording_read, dump.vmcoreinfo, dump.platform)
        table_pages = set(arm64_vmcore.tables.tables)
        span = next(p for p in arm64_vmcore.probes if p.what == "kernel image span")
        translator.read_virtual(span.vaddr, span.size)
        assert [r for r in reads if r[0] not in table_pages] == [(span.paddr, span.size)]
        # Each table page is read once, then cached.
        table_reads = [r[0] for r in reads if r[0] in table_pages]
        assert len(table_reads) == len(set(table_reads))
        reads.clear()
        vmalloc = c.vmalloc_vaddr + 100
        translator.read_virtual(vmalloc, 2 * c.page_size)
        assert len([r for r in reads if r[0] not in table_pages]) == 3  # three pages, none contiguous


# --- without a vmcore -----------------------------------------------------------------------


def test_big_endian_kernel_descriptors_are_read_big_endian():
    c = CONFIGS[0]
    tables = TranslationTables(c, byte_order="big")
    tables.map(c.kimage_vaddr + 0x5000, 0x4567_8000)
    translator = make_translator(tables.read_physical, c.vmcoreinfo(), "aarch64_be")
    assert translator.to_physical(c.kimage_vaddr + 0x5123) == 0x4567_8123
    with pytest.raises(BadSource):
        make_translator(tables.read_physical, c.vmcoreinfo(), "aarch64").to_physical(c.kimage_vaddr + 0x5123)


@pytest.mark.parametrize("machine", ["EM_AARCH64", "aarch64", "arm64", "AArch64"])
def test_make_translator_dispatches_arm64_machine_names(machine):
    c = CONFIGS[0]
    tables = TranslationTables(c)
    assert isinstance(make_translator(tables.read_physical, c.vmcoreinfo(), machine), Aarch64Translator)


def test_other_machines_stay_unsupported_and_x86_64_unchanged():
    with pytest.raises(Unsupported, match="EM_MIPS"):
        make_translator(lambda paddr, size: b"", CONFIGS[0].vmcoreinfo(), "EM_MIPS")
    x86_info = {"SYMBOL(init_top_pgt)": "ffffffff82a0c000", "NUMBER(phys_base)": "0"}
    assert isinstance(make_translator(lambda paddr, size: b"", x86_info, "EM_X86_64"), X86_64Translator)


@pytest.mark.parametrize("key, named", [
    ("PAGESIZE", r"PAGESIZE"),
    ("NUMBER(VA_BITS)", r"NUMBER\(VA_BITS\)"),
    ("SYMBOL(swapper_pg_dir)", r"SYMBOL\(swapper_pg_dir\)"),
    ("NUMBER(kimage_voffset)", r"NUMBER\(kimage_voffset\)"),
])
def test_missing_required_key_is_unsupported_naming_it_and_the_machine(key, named):
    info = CONFIGS[0].vmcoreinfo()
    del info[key]
    with pytest.raises(Unsupported, match=named) as raised:
        make_translator(lambda paddr, size: b"", info, "EM_AARCH64")
    assert "EM_AARCH64" in str(raised.value) and "\n" not in str(raised.value)


def test_optional_keys_may_be_missing():
    c = CONFIGS[0]
    tables = TranslationTables(c)
    tables.map(c.kimage_vaddr, c.kernel_paddr)
    info = c.vmcoreinfo()
    del info["NUMBER(PHYS_OFFSET)"], info["NUMBER(TCR_EL1_T1SZ)"], info["KERNELOFFSET"]
    assert make_translator(tables.read_physical, info, "aarch64").to_physical(c.kimage_vaddr + 8) == \
        c.kernel_paddr + 8


@pytest.mark.parametrize("changes, named", [
    ({"PAGESIZE": "8192"}, "PAGESIZE=8192"),
    ({"NUMBER(VA_BITS)": "53", "NUMBER(TCR_EL1_T1SZ)": "0xb"}, "TCR_EL1_T1SZ"),
    ({"NUMBER(VA_BITS)": "12"}, r"NUMBER\(VA_BITS\) = 12"),
])
def test_impossible_geometry_is_bad_source_naming_the_key(changes, named):
    info = CONFIGS[0].vmcoreinfo()
    if "NUMBER(TCR_EL1_T1SZ)" not in changes:
        del info["NUMBER(TCR_EL1_T1SZ)"]
    info.update(changes)
    with pytest.raises(BadSource, match=named):
        make_translator(lambda paddr, size: b"", info, "EM_AARCH64")


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[9]], ids=[CONFIGS[0].name, CONFIGS[9].name])
def test_kdump_file_names_the_machine_aarch64_and_translates_the_same(config, tmp_path):
    vmcore = build_arm64_vmcore(config, tmp_path)
    kdump_path = tmp_path / f"{config.name}.kdump"
    save(str(vmcore.path), str(kdump_path), SaveOptions(output_format="kdump"))
    with open_dump(str(kdump_path)) as dump:
        assert (dump.container, dump.platform.arch) == ("kdump", "aarch64")
        translator = make_translator(dump.physical.read, dump.vmcoreinfo, dump.platform)
        for probe in vmcore.probes:
            assert translator.read_virtual(probe.vaddr, probe.size) == vmcore.expected(probe.paddr, probe.size), \
                probe.what


def test_kernel_log_on_an_arm64_dump_gets_past_translation(arm64_vmcore):
    """`vmcap dmesg`'s path: the translator is made; what stops it is the missing ring buffer keys."""
    with open_dump(str(arm64_vmcore.path)) as dump:
        with pytest.raises(Unsupported, match=r"SYMBOL\(prb\)"):
            kernel_log(dump)
