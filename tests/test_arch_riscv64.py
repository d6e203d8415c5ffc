"""riscv64 kernel virtual -> physical translation (Sv39, Sv48, Sv57) and a real riscv64 kdump.

The synthetic part builds page tables in a fake physical memory where every
8-byte word that no table was written over holds its own address, so a read
from the wrong place shows. The level shifts, indices and PTE bits are taken
from the privileged spec (Volume II, "Sv39/Sv48/Sv57" and "Svnapot") and
written out here, not borrowed from vmcap.

The real part uses the dumps tests/arch/make-riscv64-dump.sh made: Debian's
6.12 riscv64 kernel under qemu-system-riscv64 -M virt, crashed with sysrq-c
and captured by a kdump kernel (kexec -p) that copied /proc/vmcore. Beside
each dump are makedumpfile's --dump-dmesg text and the pfns its -d 31 output
stores (tests/arch/riscv64_kept_pfns.py), from upstream makedumpfile with the
2026 riscv64 superpage fix; the tests skip when the data is absent.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmcap.errors import BadSource, Unsupported
from vmcap.kernel.arch import EM_RISCV, make_translator
from vmcap.kernel.riscv64 import Riscv64Translator
from vmcap.sample import RamRange, SampleSpec, build_vmcore
from vmcap.source.dump import kernel_log, open_dump

from conftest import env_without_debug

sys.path.insert(0, str(Path(__file__).parent / "arch"))
from riscv64_kept_pfns import parse as parse_kept_pfns  # noqa: E402
from riscv64_kept_pfns import stored_pfns  # noqa: E402

from real_dumps import decompress_zst  # noqa: E402

try:
    import drgn
except ImportError:  # pragma: no cover - drgn is an optional oracle
    drgn = None

DATA = Path(__file__).parent / "data"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

# PTE bits (privileged spec, Sv39 page table entry; arch/riscv/include/asm/pgtable-bits.h).
V, R, W, X, U, G, A, D = (1 << bit for bit in range(8))
PBMT_IO = 2 << 61  # Svpbmt "IO"
THEAD_SO_C_B = 0b111 << 61  # T-Head MAE attributes in bits 59..63 (not address bits)
NAPOT = 1 << 63
KERNEL_LEAF = V | R | W | A | D | G
POINTER = V

# Debian 6.12 on QEMU virt (the real dump's VMCOREINFO): the image is linked at
# KERNEL_LINK_ADDR and loaded at 0x80200000.
KERNEL_LINK_ADDR = 0xFFFF_FFFF_8000_0000
KERNEL_PADDR = 0x8020_0000
VA_KERNEL_PA_OFFSET = KERNEL_LINK_ADDR - KERNEL_PADDR  # NUMBER(va_kernel_pa_offset)=0xfffffffeffe00000
SWAPPER_PG_DIR = 0xFFFF_FFFF_81DC_B000
SWAPPER_PADDR = 0x81FC_B000
PAGE_OFFSET = {39: 0xFFFF_FFD6_0000_0000, 48: 0xFFFF_AF80_0000_0000, 57: 0xFF60_0000_0000_0000}
LEVEL_NAMES = {39: ("PGD", "PMD", "PTE"), 48: ("PGD", "PUD", "PMD", "PTE"),
               57: ("PGD", "P4D", "PUD", "PMD", "PTE")}
TABLE_POOL = 0x9000_0000


def vmcoreinfo(va_bits: int) -> dict[str, str]:
    return {
        "PAGESIZE": "4096",
        "SYMBOL(swapper_pg_dir)": f"{SWAPPER_PG_DIR:x}",
        "NUMBER(VA_BITS)": str(va_bits),
        "NUMBER(va_kernel_pa_offset)": f"{VA_KERNEL_PA_OFFSET:#x}",
        "NUMBER(PAGE_OFFSET)": f"{PAGE_OFFSET[va_bits]:#x}",
        "NUMBER(phys_ram_base)": str(0x8000_0000),
        "NUMBER(KERNEL_LINK_ADDR)": f"{KERNEL_LINK_ADDR:#x}",
    }


def pattern(paddr: int, size: int) -> bytes:
    """What unwritten memory holds: each 8-byte word its own address (so bit 0, V, is clear)."""
    first = paddr & ~7
    words = np.arange(first, paddr + size + 8, 8, dtype=np.uint64)
    return words.astype("<u8").tobytes()[paddr - first:paddr - first + size]


class FakeMemory:
    """Physical memory holding page tables rooted at swapper_pg_dir; reads are recorded."""

    def __init__(self, va_bits: int):
        self.va_bits = va_bits
        self.levels = len(LEVEL_NAMES[va_bits])  # root is level levels-1, PTEs level 0
        self.tables: dict[int, bytearray] = {SWAPPER_PADDR: bytearray(4096)}
        self.next_table = TABLE_POOL
        self.reads: list[tuple[int, int]] = []

    def entry_at(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.tables[table], index * 8)[0]

    def set_entry(self, table: int, index: int, value: int) -> int:
        struct.pack_into("<Q", self.tables[table], index * 8, value)
        return table + index * 8

    def table_for(self, vaddr: int, level: int) -> int:
        """The table of `level` on vaddr's walk, making the tables above it as needed."""
        table = SWAPPER_PADDR
        for above in range(self.levels - 1, level, -1):
            index = (vaddr >> (12 + 9 * above)) & 511
            entry = self.entry_at(table, index)
            if not entry & V:
                child = self.next_table
                self.next_table += 4096
                self.tables[child] = bytearray(4096)
                entry = POINTER | (child >> 12) << 10
                self.set_entry(table, index, entry)
            table = (entry >> 10) << 12
        return table

    def map(self, vaddr: int, paddr: int, level: int = 0, flags: int = KERNEL_LEAF) -> int:
        """A leaf at `level` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB, 3: 512 GiB, 4: 256 TiB); the PTE's paddr."""
        table = self.table_for(vaddr, level)
        return self.set_entry(table, (vaddr >> (12 + 9 * level)) & 511, flags | (paddr >> 12) << 10)

    def read_physical(self, paddr: int, size: int) -> bytes:
        self.reads.append((paddr, size))
        out = bytearray(pattern(paddr, size))
        for table, content in self.tables.items():
            lo, hi = max(paddr, table), min(paddr + size, table + 4096)
            if lo < hi:
                out[lo - paddr:hi - paddr] = content[lo - table:hi - table]
        return bytes(out)

    def translator(self) -> Riscv64Translator:
        return make_translator(self.read_physical, vmcoreinfo(self.va_bits), "EM_RISCV")


MODES = [39, 48, 57]
LEAVES = [(bits, level) for bits in MODES for level in range(len(LEVEL_NAMES[bits]))]


# --- the walk on synthetic tables ---------------------------------------------------------


@pytest.mark.parametrize("va_bits, level", LEAVES, ids=[f"sv{b}-level{lv}" for b, lv in LEAVES])
def test_a_leaf_at_every_level_maps_its_whole_naturally_aligned_range(va_bits, level):
    memory = FakeMemory(va_bits)
    size = 1 << (12 + 9 * level)
    vaddr = PAGE_OFFSET[va_bits] + 5 * size if level < len(LEVEL_NAMES[va_bits]) - 1 else PAGE_OFFSET[va_bits]
    paddr = 3 * size
    memory.map(vaddr, paddr, level)
    translator = memory.translator()
    for offset in (0, 8, size // 2 + 0x238, size - 8):
        assert translator.translate(vaddr + offset) == (paddr + offset, size - offset)
    assert translator.to_physical(vaddr + size - 1) == paddr + size - 1
    if level == 0:
        assert translator.read_virtual(vaddr + 16, 24) == pattern(paddr + 16, 24)


@pytest.mark.parametrize("va_bits, vaddr, indices", [
    # indices root first, VPN fields of the spec: Sv39 VPN[2..0] = bits 38:30, 29:21, 20:12 ...
    (39, 0xFFFF_FFD6_0123_4567, (0x158, 0x009, 0x034)),
    (48, 0xFFFF_AF80_1234_5678, (0x15F, 0x000, 0x091, 0x145)),
    (57, 0xFF61_2345_6789_A000, (0x161, 0x046, 0x115, 0x13C, 0x09A)),
])
def test_each_level_indexes_its_own_nine_vpn_bits(va_bits, vaddr, indices):
    memory = FakeMemory(va_bits)
    paddr = 0x8765_4000
    memory.map(vaddr, paddr)
    table = SWAPPER_PADDR
    for index in indices:  # the entries sit exactly where the spec says
        entry = memory.entry_at(table, index)
        assert entry & V
        table = (entry >> 10) << 12
    assert table == paddr
    assert memory.translator().to_physical(vaddr) == paddr | (vaddr & 0xFFF)


def test_the_root_is_swapper_pg_dir_through_va_kernel_pa_offset_and_mode_follows_va_bits():
    for va_bits in MODES:
        translator = FakeMemory(va_bits).translator()
        assert translator.root_table_paddr == SWAPPER_PADDR
        assert translator.mode == f"Sv{va_bits}"
        assert [level.name for level in translator.levels] == list(LEVEL_NAMES[va_bits])
        assert translator.kernel_start == (1 << 64) - (1 << (va_bits - 1))


def test_attribute_bits_above_the_ppn_are_not_address_bits():
    memory = FakeMemory(39)
    base = PAGE_OFFSET[39]
    memory.map(base, 0x8010_0000, flags=KERNEL_LEAF | PBMT_IO)
    memory.map(base + 2 * MIB, 0x8060_0000, level=1, flags=KERNEL_LEAF | THEAD_SO_C_B & ~NAPOT)
    # T-Head's strong-order bit is bit 63, Svnapot's N: without the 64 KiB PPN mark, a 4 KiB page.
    memory.map(base + 0x5000, 0x8010_3000, flags=KERNEL_LEAF | THEAD_SO_C_B)
    translator = memory.translator()
    assert translator.to_physical(base + 0x10) == 0x8010_0010
    assert translator.to_physical(base + 2 * MIB + 0x12345) == 0x8061_2345
    assert translator.translate(base + 0x5008) == (0x8010_3008, 4096 - 8)


def test_svnapot_64k_pte_maps_the_64k_range_around_the_page():
    memory = FakeMemory(48)
    vaddr = PAGE_OFFSET[48] + 0x30000  # a 64 KiB aligned range; its 16 PTEs all say the same
    for page in range(16):
        # PPN[3:0] = 0b1000 marks 64 KiB; the real PPN bits [3:0] come from the vaddr.
        memory.map(vaddr + page * 4096, 0x8234_0000 | 0x8000, flags=KERNEL_LEAF | NAPOT)
    translator = memory.translator()
    assert translator.translate(vaddr + 0x5123) == (0x8234_5123, 0x10000 - 0x5123)
    assert translator.to_physical(vaddr + 0xFFF8) == 0x8234_FFF8


def test_read_virtual_reads_physically_contiguous_pages_at_once():
    memory = FakeMemory(57)
    base = PAGE_OFFSET[57] + 0x7000_0000
    memory.map(base, 0x8100_0000)
    memory.map(base + 4096, 0x8100_1000)  # contiguous with the first
    memory.map(base + 8192, 0x8300_0000)  # elsewhere
    translator = memory.translator()
    translator.read_virtual(base, 4096)  # warm the table cache
    memory.reads.clear()
    data = translator.read_virtual(base + 100, 3 * 4096 - 200)
    assert data == pattern(0x8100_0000 + 100, 2 * 4096 - 100) + pattern(0x8300_0000, 4096 - 100)
    assert memory.reads == [(0x8100_0000 + 100, 2 * 4096 - 100), (0x8300_0000, 4096 - 100)]


def _bad(memory: FakeMemory, vaddr: int) -> str:
    with pytest.raises(BadSource) as raised:
        memory.translator().to_physical(vaddr)
    message = str(raised.value)
    assert "\n" not in message and f"{vaddr:#x}" in message
    return message


@pytest.mark.parametrize("va_bits", MODES)
def test_an_invalid_entry_names_vaddr_level_entry_and_where_it_is(va_bits):
    memory = FakeMemory(va_bits)
    vaddr = PAGE_OFFSET[va_bits] + 0x1234_5000
    pte_at = memory.map(vaddr, 0x8000_1000)
    struct.pack_into("<Q", memory.tables[pte_at & ~0xFFF], pte_at & 0xFFF, 0x8000_1000 >> 2)  # V clear
    message = _bad(memory, vaddr)
    assert f"Sv{va_bits} level 0 (PTE) entry {0x8000_1000 >> 2:#x} at paddr {pte_at:#x} is not valid" in message
    root_index = (vaddr >> (12 + 9 * (len(LEVEL_NAMES[va_bits]) - 1))) & 511
    message = _bad(FakeMemory(va_bits), vaddr)  # nothing mapped: the root entry is zero
    assert f"(PGD) entry 0x0 at paddr {SWAPPER_PADDR + 8 * root_index:#x} is not valid" in message


def test_writable_without_readable_is_a_reserved_encoding():
    memory = FakeMemory(39)
    vaddr = PAGE_OFFSET[39] + 0x4000
    memory.map(vaddr, 0x8000_4000, flags=V | W | A | D)
    assert "is reserved (writable but not readable)" in _bad(memory, vaddr)


def test_a_pointer_at_the_last_level_faults():
    memory = FakeMemory(48)
    vaddr = PAGE_OFFSET[48] + 0x4000
    memory.map(vaddr, 0x8000_4000, flags=POINTER)
    assert "level 0 (PTE)" in (message := _bad(memory, vaddr)) and "points to another table" in message


@pytest.mark.parametrize("level", [1, 2])
def test_a_misaligned_superpage_faults(level):
    memory = FakeMemory(57)
    size = 1 << (12 + 9 * level)
    vaddr = PAGE_OFFSET[57] + size
    memory.map(vaddr, 4 * size + 0x1000, level)
    message = _bad(memory, vaddr + 0x10)
    assert "is a misaligned superpage" in message and f"level {level}" in message


def test_user_and_non_canonical_addresses_are_not_kernel_addresses():
    memory = FakeMemory(39)
    for vaddr in (0x3F_FFFF_F000, 0x0000_4000_0000_0000, 0xFFFF_FF00_0000_0000 - 1 - (1 << 38)):
        message = _bad(memory, vaddr)
        assert "is not a kernel address" in message and "Sv39" in message


def test_a_walk_over_garbage_tables_raises_bad_source_never_another_exception():
    rng = np.random.default_rng(13)
    for va_bits in MODES:
        memory = FakeMemory(va_bits)
        memory.tables[SWAPPER_PADDR][:] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
        translator = memory.translator()
        for vaddr in rng.integers(0, 1 << 63, 200, dtype=np.uint64).tolist():
            try:
                paddr, mapped = translator.translate(vaddr | 1 << 63)
            except BadSource:
                continue
            assert 0 <= paddr < 1 << 56 and mapped > 0


# --- VMCOREINFO ---------------------------------------------------------------------------


@pytest.mark.parametrize("machine", ["EM_RISCV", "riscv64"])
def test_make_translator_dispatches_riscv64_machine_names(machine):
    assert isinstance(make_translator(lambda p, s: b"", vmcoreinfo(39), machine), Riscv64Translator)


@pytest.mark.parametrize("key", ["NUMBER(VA_BITS)", "SYMBOL(swapper_pg_dir)", "NUMBER(va_kernel_pa_offset)"])
def test_a_missing_key_is_unsupported_naming_it_and_the_machine(key):
    info = vmcoreinfo(48)
    del info[key]
    with pytest.raises(Unsupported) as raised:
        make_translator(lambda p, s: b"", info, "EM_RISCV")
    assert key in str(raised.value) and "EM_RISCV" in str(raised.value)


def test_page_offset_phys_ram_base_and_pagesize_are_optional():
    memory = FakeMemory(39)
    memory.map(PAGE_OFFSET[39], 0x8000_0000)
    info = vmcoreinfo(39)
    for key in ("NUMBER(PAGE_OFFSET)", "NUMBER(phys_ram_base)", "NUMBER(KERNEL_LINK_ADDR)", "PAGESIZE"):
        del info[key]
    assert make_translator(memory.read_physical, info, "riscv64").to_physical(PAGE_OFFSET[39] + 9) == 0x8000_0009


@pytest.mark.parametrize("changes, named", [
    ({"NUMBER(VA_BITS)": "47"}, r"NUMBER\(VA_BITS\)=47 is not a riscv64 paging mode"),
    ({"PAGESIZE": "65536"}, "PAGESIZE=65536"),
    ({"NUMBER(va_kernel_pa_offset)": f"{VA_KERNEL_PA_OFFSET + 8:#x}"}, "not a page-aligned table address"),
])
def test_impossible_values_are_bad_source_naming_the_key(changes, named):
    info = vmcoreinfo(57) | changes
    with pytest.raises(BadSource, match=named):
        make_translator(lambda p, s: b"", info, "EM_RISCV")


def vmcap(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          env=env_without_debug(), timeout=timeout)


def test_dmesg_on_an_elf_core_with_empty_page_tables_is_one_line_exit_3(tmp_path):
    """The whole CLI path: EM_RISCV ELF core, VMCOREINFO with a log buffer, tables all zero."""
    info = vmcoreinfo(57) | {
        "OSRELEASE": "6.1.0-riscv64", "SYMBOL(log_buf)": "ffffffff81000000",
        "SYMBOL(log_buf_len)": "ffffffff81000008", "SYMBOL(log_first_idx)": "ffffffff81000010",
        "SYMBOL(log_next_idx)": "ffffffff81000018", "SIZE(printk_log)": "16",
        "OFFSET(printk_log.ts_nsec)": "0", "OFFSET(printk_log.len)": "8",
        "OFFSET(printk_log.text_len)": "10", "OFFSET(printk_log.dict_len)": "12",
    }
    core = tmp_path / "riscv64.core"
    build_vmcore(core, SampleSpec(ranges=(RamRange(0x8020_0000, 32 * MIB),), machine=EM_RISCV,
                                  content="zero", vmcoreinfo=info))
    run = vmcap("dmesg", core)
    stderr = run.stderr.decode()
    assert run.returncode == 3, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "vaddr 0xffffffff81000000 not mapped: Sv57 level 4 (PGD) entry 0x0" in stderr


# --- the real riscv64 kdumps ---------------------------------------------------------------

REAL_DUMPS = sorted(p.name.removesuffix(".vmcore.zst") for p in DATA.glob("riscv64-sv*.vmcore.zst"))


@pytest.fixture(scope="module", params=REAL_DUMPS or ["riscv64-sv57"])
def real_riscv64(request, tmp_path_factory) -> tuple[str, Path]:
    """(name, decompressed vmcore) for each riscv64 dump in tests/data; skipped when absent."""
    name = request.param
    compressed = DATA / f"{name}.vmcore.zst"
    if not compressed.exists():
        pytest.skip(f"no real riscv64 dump ({compressed} is absent; tests/arch/make-riscv64-dump.sh makes it)")
    return name, decompress_zst(compressed, tmp_path_factory.mktemp(name) / f"{name}.vmcore")


@pytest.mark.slow
def test_real_dump_is_a_kdump_with_the_note_in_the_mode_its_name_says(real_riscv64):
    name, path = real_riscv64
    with open_dump(str(path)) as dump:
        assert (dump.container, dump.platform.machine) == ("elf", "EM_RISCV")
        translator = make_translator(dump.physical.read, dump.vmcoreinfo, dump.platform)
        assert translator.mode == name.removeprefix("riscv64-").capitalize()


@pytest.mark.slow
def test_real_dump_dmesg_is_byte_identical_to_makedumpfile(real_riscv64):
    name, path = real_riscv64
    expected = (DATA / f"{name}.makedumpfile-dmesg.txt").read_bytes()
    run = vmcap("dmesg", "--caller-id", path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
    assert b"VMCAPLAB-MARKER: the quick brown fox jumps over the lazy dog" in run.stdout


@pytest.mark.slow
def test_real_dump_d31_stores_exactly_the_pages_makedumpfile_stores(real_riscv64, tmp_path):
    name, path = real_riscv64
    expected = parse_kept_pfns((DATA / f"{name}.makedumpfile-d31-pfns.txt").read_text())
    out = tmp_path / "d31.kdump"
    run = vmcap("save", "-d", "31", "--format", "kdump", "--compress", "none", path, out)
    assert run.returncode == 0, run.stderr
    kept, zero = stored_pfns(str(out))
    assert np.array_equal(kept, expected["kept"]), \
        f"kept pfns differ from makedumpfile: {np.setxor1d(kept, expected['kept'])[:8]}"
    assert np.array_equal(zero, expected["zero"])
    # The kdump output names the machine "riscv64" (utsname) and reads back the same log.
    run = vmcap("dmesg", "--caller-id", out)
    assert run.returncode == 0, run.stderr
    assert run.stdout == (DATA / f"{name}.makedumpfile-dmesg.txt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("level", [2, 4, 8, 16])
def test_real_dump_each_class_alone_keeps_the_pages_makedumpfile_keeps(real_riscv64, tmp_path, level):
    name, path = real_riscv64
    expected = parse_kept_pfns((DATA / f"{name}.makedumpfile-levels-pfns.txt").read_text())[f"d{level}"]
    out = tmp_path / f"d{level}.kdump"
    run = vmcap("save", "-d", level, "--format", "kdump", "--compress", "none", path, out)
    assert run.returncode == 0, run.stderr
    # Without -d 1 makedumpfile stores each zero page and vmcap one for all: the same pages.
    dumped = np.union1d(*stored_pfns(str(out)))
    assert np.array_equal(dumped, expected), f"pfns differ from makedumpfile: {np.setxor1d(dumped, expected)[:8]}"


@pytest.mark.slow
def test_real_dump_translation_agrees_with_the_kernel_image_and_linear_map_formulas(real_riscv64):
    """makedumpfile's shortcuts (VTOP): image at va_kernel_pa_offset, linear map at phys_ram_base."""
    _, path = real_riscv64
    with open_dump(str(path)) as dump:
        info = dump.vmcoreinfo
        translator = make_translator(dump.physical.read, info, dump.platform)
        offset = int(info["NUMBER(va_kernel_pa_offset)"], 16)
        page_offset = int(info["NUMBER(PAGE_OFFSET)"], 16)
        ram_base = int(info["NUMBER(phys_ram_base)"])
        for symbol in ("prb", "init_uts_ns", "swapper_pg_dir", "_stext"):
            vaddr = int(info[f"SYMBOL({symbol})"], 16)
            assert translator.to_physical(vaddr) == vaddr - offset
        mem_section = int(info["SYMBOL(mem_section)"], 16)
        assert mem_section >= page_offset
        assert translator.to_physical(mem_section) == mem_section - page_offset + ram_base
        name = int(info["SYMBOL(init_uts_ns)"], 16) + int(info["OFFSET(uts_namespace.name)"])
        release = translator.read_virtual(name + 2 * 65, 65)  # sysname, nodename, release
        assert release.rstrip(b"\0").decode() == info["OSRELEASE"]


@pytest.mark.slow
def test_real_dump_bad_swapper_pg_dir_is_one_line_exit_3(real_riscv64, tmp_path):
    _, path = real_riscv64
    with open_dump(str(path)) as dump:
        raw = dump.vmcoreinfo
        text = "".join(f"{key}={value}\n" for key, value in raw.items())
    # One page below the real root: a page of the kernel image that holds no tables.
    real_root = int(raw["SYMBOL(swapper_pg_dir)"], 16)
    moved = tmp_path / "vmcoreinfo.txt"
    moved.write_text(text.replace(f"SYMBOL(swapper_pg_dir)={real_root:x}",
                                  f"SYMBOL(swapper_pg_dir)={real_root + 0x100000:x}"))
    run = vmcap("dmesg", "--vmcoreinfo", moved, path)
    stderr = run.stderr.decode()
    assert run.returncode == 3, stderr
    assert len(stderr.strip().splitlines()) == 1 and "not mapped" in stderr and "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.skipif(drgn is None, reason="drgn is not installed")
def test_drgn_reads_vmcap_output_of_the_real_dump(real_riscv64, tmp_path):
    """drgn reads vmcap's -d 31 ELF: physical addresses, and kernel-image addresses through the
    kernel-text PT_LOAD's p_vaddr. drgn 0.3.0 walks no riscv64 page tables (a linear-map or
    vmemmap address is a FaultError), so it checks vmcap's image translations, not its walk."""
    name, path = real_riscv64
    out = tmp_path / "d31.elf"
    run = vmcap("save", "-d", "31", "--format", "elf", path, out)
    assert run.returncode == 0, run.stderr
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    assert prog.platform.arch == drgn.Architecture.RISCV64
    with open_dump(str(path)) as dump:
        info = dump.vmcoreinfo
        translator = make_translator(dump.physical.read, info, dump.platform)
        uts = translator.to_physical(int(info["SYMBOL(init_uts_ns)"], 16))
        assert prog.read(uts, 4096, True) == dump.physical.read(uts, 4096)
        for symbol in ("init_uts_ns", "prb"):
            vaddr = int(info[f"SYMBOL({symbol})"], 16)
            assert prog.read(vaddr, 256) == translator.read_virtual(vaddr, 256)
    release = uts + int(info["OFFSET(uts_namespace.name)"]) + 2 * 65
    assert prog.read(release, len(info["OSRELEASE"]), True).decode() == info["OSRELEASE"]


@pytest.mark.slow
def test_kernel_log_api_matches_the_cli(real_riscv64):
    _, path = real_riscv64
    with open_dump(str(path)) as dump:
        records = kernel_log(dump)
    assert records and records[0].text.startswith(b"Linux version 6.12")
