"""Kernel virtual->physical translation (x86_64) and dmesg extraction.

Synthetic page tables and ring buffers check each case on its own; the real
6.1 dump in ../shared/vmcores checks the whole path against makedumpfile
--dump-dmesg, drgn and the guest's serial console.
"""

from __future__ import annotations

import difflib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmcap.errors import BadSource, SourceIOError, Unsupported
from vmcap.kernel import vmcoreinfo as vi
from vmcap.kernel.arch import make_translator
from vmcap.kernel.dmesg import LogRecord, format_makedumpfile, read_kernel_log
from vmcap.kernel.translate import START_KERNEL_MAP, X86_64Translator, phys_base_from_segments
from vmcap.kernel.vmcoreinfo import parse_vmcoreinfo

from conftest import SHARED_VMCORES

PAGE = 4096
QEMU_PANIC_CONSOLE = SHARED_VMCORES / "qemu-6.1-panic.console.txt"


# --- VMCOREINFO ----------------------------------------------------------------


def test_vmcoreinfo_values_parse_with_each_keys_printf_format():
    info = parse_vmcoreinfo(
        b"OSRELEASE=6.1.0-56-amd64\nPAGESIZE=4096\nSYMBOL(prb)=ffffffff954643e0\n"
        b"SIZE(printk_info)=88\nOFFSET(printk_info.seq)=0\nLENGTH(node_data)=1024\n"
        b"NUMBER(phys_base)=-14680064\nNUMBER(VMALLOC_START)=0xffa0000000000000\n"
        b"KERNELOFFSET=12a00000\nnot a key line\nPAGESIZE=8192\n\0\0\0"
    )
    assert info["OSRELEASE"] == "6.1.0-56-amd64"
    assert vi.page_size(info) == 4096  # the first of repeated keys wins, as in makedumpfile
    assert vi.symbol(info, "prb") == 0xFFFFFFFF954643E0
    assert vi.size(info, "printk_info") == 88
    assert vi.offset(info, "printk_info.seq") == 0
    assert vi.length(info, "node_data") == 1024
    assert vi.number(info, "phys_base") == -14680064
    assert vi.number(info, "VMALLOC_START") == 0xFFA0000000000000
    assert vi.kernel_offset(info) == 0x12A00000


def test_vmcoreinfo_missing_key_is_none_or_unsupported_naming_it():
    assert vi.symbol({}, "prb") is None
    with pytest.raises(Unsupported, match=r"SYMBOL\(prb\)"):
        vi.symbol({}, "prb", required=True)
    with pytest.raises(Unsupported, match=r"OFFSET\(printk_info\.seq\)"):
        vi.offset({}, "printk_info.seq", required=True)


def test_vmcoreinfo_malformed_value_is_bad_source_naming_the_key():
    with pytest.raises(BadSource, match=r"NUMBER\(phys_base\)"):
        vi.number({"NUMBER(phys_base)": "12abc"}, "phys_base")


# --- synthetic page tables -----------------------------------------------------


class PhysicalPages:
    """Sparse physical memory made of 4 KiB frames; records each read."""

    def __init__(self):
        self.frames: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []

    def write(self, paddr: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            frame = self.frames.setdefault((paddr + i) & ~(PAGE - 1), bytearray(PAGE))
            frame[(paddr + i) % PAGE] = byte

    def set_entry(self, table_paddr: int, index: int, entry: int) -> None:
        self.write(table_paddr + 8 * index, struct.pack("<Q", entry))

    def read(self, paddr: int, size: int) -> bytes:
        self.reads.append((paddr, size))
        out = bytearray()
        for at in range(paddr, paddr + size):
            frame = self.frames.get(at & ~(PAGE - 1))
            if frame is None:
                raise SourceIOError(f"paddr {at:#x} is not in the dump", paddr=at)
            out.append(frame[at % PAGE])
        return bytes(out)


PHYS_BASE = 0x0100_0000
ROOT_SYMBOL = START_KERNEL_MAP + 0x0200_0000  # init_top_pgt inside the kernel image
ROOT_PADDR = ROOT_SYMBOL - START_KERNEL_MAP + PHYS_BASE
TABLE, TABLE2, TABLE3, TABLE4 = 0x10_0000, 0x10_1000, 0x10_2000, 0x10_3000
PRESENT_RW = 0x3
PSE = 0x80
NX = 1 << 63


def _info(five_level: bool = False, **extra: str) -> dict[str, str]:
    return {
        "SYMBOL(init_top_pgt)": f"{ROOT_SYMBOL:x}",
        "NUMBER(phys_base)": str(PHYS_BASE),
        "NUMBER(pgtable_l5_enabled)": "1" if five_level else "0",
        "NUMBER(KERNEL_IMAGE_SIZE)": str(1 << 30),
        **extra,
    }


def _indexes(vaddr: int) -> tuple[int, int, int, int, int]:
    return tuple((vaddr >> shift) & 511 for shift in (48, 39, 30, 21, 12))


DIRECT_MAP = 0xFFFF_8880_0000_0000


def test_four_level_walk_reaches_a_4k_page():
    memory = PhysicalPages()
    vaddr = DIRECT_MAP + 0x1234_5678
    _, pgd, pud, pmd, pte = _indexes(vaddr)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | PRESENT_RW)
    memory.set_entry(TABLE, pud, TABLE2 | PRESENT_RW)
    memory.set_entry(TABLE2, pmd, TABLE3 | PRESENT_RW)
    memory.set_entry(TABLE3, pte, 0x7654_3000 | PRESENT_RW | NX)
    translator = X86_64Translator(memory.read, _info())
    assert translator.to_physical(vaddr) == 0x7654_3678


def test_five_level_walk_uses_bits_48_to_56_for_the_top_table():
    memory = PhysicalPages()
    vaddr = 0xFF11_0000_0000_0000 + 0x5000  # a 5-level direct-map address
    pgd, p4d, pud, pmd, pte = _indexes(vaddr)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | PRESENT_RW)
    memory.set_entry(TABLE, p4d, TABLE2 | PRESENT_RW)
    memory.set_entry(TABLE2, pud, TABLE3 | PRESENT_RW)
    memory.set_entry(TABLE3, pmd, TABLE4 | PRESENT_RW)
    memory.set_entry(TABLE4, pte, 0xABC000 | PRESENT_RW)
    assert X86_64Translator(memory.read, _info(five_level=True)).to_physical(vaddr + 0x12) == 0xABC012
    # The same tables read as 4-level would start at a different top index.
    with pytest.raises(BadSource):
        X86_64Translator(memory.read, _info(five_level=False)).to_physical(vaddr)


def test_pmd_with_pse_maps_a_2m_page_and_pud_with_pse_a_1g_page():
    memory = PhysicalPages()
    two_meg = DIRECT_MAP + (5 << 21) + 0x1_2345
    one_gig = DIRECT_MAP + (3 << 30) + 0x1234_5678
    _, pgd, pud2, pmd2, _ = _indexes(two_meg)
    _, _, pud1, _, _ = _indexes(one_gig)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | PRESENT_RW)
    memory.set_entry(TABLE, pud2, TABLE2 | PRESENT_RW)
    memory.set_entry(TABLE2, pmd2, 0x4060_0000 | PSE | PRESENT_RW | NX)
    memory.set_entry(TABLE, pud1, 0x1_C000_0000 | PSE | PRESENT_RW)
    translator = X86_64Translator(memory.read, _info())
    assert translator.to_physical(two_meg) == 0x4060_0000 + 0x1_2345
    assert translator.to_physical(one_gig) == 0x1_C000_0000 + 0x1234_5678


def test_sme_mask_is_stripped_from_entries():
    memory = PhysicalPages()
    sme_bit = 1 << 47
    vaddr = DIRECT_MAP + (7 << 21) + 0x99
    _, pgd, pud, pmd, _ = _indexes(vaddr)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | sme_bit | PRESENT_RW)
    memory.set_entry(TABLE, pud, TABLE2 | sme_bit | PRESENT_RW)
    memory.set_entry(TABLE2, pmd, 0x80_0000 | sme_bit | PSE | PRESENT_RW)
    translator = X86_64Translator(memory.read, _info(**{"NUMBER(sme_mask)": str(sme_bit)}))
    assert translator.to_physical(vaddr) == 0x80_0099


def test_not_present_entry_is_bad_source_naming_vaddr_level_and_entry_address():
    memory = PhysicalPages()
    vaddr = DIRECT_MAP + 0x4000
    _, pgd, pud, _, _ = _indexes(vaddr)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | PRESENT_RW)
    memory.set_entry(TABLE, pud, 0x5000_0000)  # address bits but no _PAGE_PRESENT
    translator = X86_64Translator(memory.read, _info())
    with pytest.raises(BadSource) as error:
        translator.to_physical(vaddr)
    message = str(error.value)
    assert f"{vaddr:#x}" in message and "PUD" in message and f"{TABLE + 8 * pud:#x}" in message
    assert "\n" not in message


def test_kernel_image_addresses_translate_without_reading_page_tables():
    memory = PhysicalPages()
    translator = X86_64Translator(memory.read, _info())
    assert translator.to_physical(START_KERNEL_MAP + 0x0123_4567) == PHYS_BASE + 0x0123_4567
    assert memory.reads == []


def test_read_virtual_splits_at_pages_and_merges_physically_contiguous_ones():
    memory = PhysicalPages()
    base = DIRECT_MAP + 0x20_0000  # three 4 KiB pages: two contiguous, then a jump
    _, pgd, pud, pmd, pte = _indexes(base)
    memory.set_entry(ROOT_PADDR, pgd, TABLE | PRESENT_RW)
    memory.set_entry(TABLE, pud, TABLE2 | PRESENT_RW)
    memory.set_entry(TABLE2, pmd, TABLE3 | PRESENT_RW)
    for i, frame in enumerate((0x30_0000, 0x30_1000, 0x50_0000)):
        memory.set_entry(TABLE3, pte + i, frame | PRESENT_RW)
        memory.write(frame, bytes([0x41 + i]) * PAGE)
    translator = X86_64Translator(memory.read, _info())
    memory.reads.clear()
    data = translator.read_virtual(base + 0x800, 2 * PAGE)
    assert data == b"A" * 0x800 + b"B" * PAGE + b"C" * 0x800
    tables = {ROOT_PADDR, TABLE, TABLE2, TABLE3}
    assert [read for read in memory.reads if read[0] not in tables] == [(0x30_0800, 0x1800), (0x50_0000, 0x800)]
    # Page-table pages are read whole, once each, then cached.
    assert sorted(read for read in memory.reads if read[0] in tables) == sorted((table, PAGE) for table in tables)


def test_make_translator_rejects_other_architectures_by_name():
    with pytest.raises(Unsupported, match="EM_PPC64"):
        make_translator(PhysicalPages().read, _info(), "EM_PPC64")
    assert isinstance(make_translator(PhysicalPages().read, _info(), "EM_X86_64"), X86_64Translator)


def test_translator_needs_root_table_and_phys_base():
    info = _info()
    del info["SYMBOL(init_top_pgt)"]
    with pytest.raises(Unsupported, match="init_top_pgt"):
        X86_64Translator(PhysicalPages().read, info)
    info = _info()
    del info["NUMBER(phys_base)"]
    with pytest.raises(Unsupported, match=r"NUMBER\(phys_base\)"):
        X86_64Translator(PhysicalPages().read, info)
    assert X86_64Translator(PhysicalPages().read, _info(), fallback_phys_base=0).phys_base == PHYS_BASE
    text_segment = (START_KERNEL_MAP + 0x0100_0000, 0x0300_0000)  # (p_vaddr, p_paddr) as /proc/vmcore gives it
    fallback = phys_base_from_segments([(DIRECT_MAP, 0), text_segment])
    assert fallback == 0x0200_0000
    translator = X86_64Translator(PhysicalPages().read, info, fallback_phys_base=0)
    assert translator.root_table_paddr == ROOT_SYMBOL - START_KERNEL_MAP


# --- synthetic ring buffers ----------------------------------------------------


class VirtualRegions:
    """A read_virtual over a few (vaddr -> bytes) regions."""

    def __init__(self, regions: dict[int, bytes]):
        self.regions = regions

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        for start, data in self.regions.items():
            if start <= vaddr and vaddr + size <= start + len(data):
                return data[vaddr - start:vaddr - start + size]
        raise BadSource(f"vaddr {vaddr:#x} not mapped")


# VMCOREINFO lines of Debian's 6.1 kernel (the qemu-6.1-panic dump).
LOCKLESS_6_1 = {
    "SYMBOL(prb)": "ffffffff95000000",
    "SIZE(printk_ringbuffer)": "88", "OFFSET(printk_ringbuffer.desc_ring)": "0",
    "OFFSET(printk_ringbuffer.text_data_ring)": "48", "OFFSET(printk_ringbuffer.fail)": "80",
    "SIZE(prb_desc_ring)": "48", "OFFSET(prb_desc_ring.count_bits)": "0", "OFFSET(prb_desc_ring.descs)": "8",
    "OFFSET(prb_desc_ring.infos)": "16", "OFFSET(prb_desc_ring.head_id)": "24",
    "OFFSET(prb_desc_ring.tail_id)": "32", "SIZE(prb_desc)": "24", "OFFSET(prb_desc.state_var)": "0",
    "OFFSET(prb_desc.text_blk_lpos)": "8", "SIZE(prb_data_blk_lpos)": "16",
    "OFFSET(prb_data_blk_lpos.begin)": "0", "OFFSET(prb_data_blk_lpos.next)": "8",
    "SIZE(printk_info)": "88", "OFFSET(printk_info.seq)": "0", "OFFSET(printk_info.ts_nsec)": "8",
    "OFFSET(printk_info.text_len)": "16", "OFFSET(printk_info.caller_id)": "20",
    "OFFSET(printk_info.dev_info)": "24", "SIZE(prb_data_ring)": "32", "OFFSET(prb_data_ring.size_bits)": "0",
    "OFFSET(prb_data_ring.data)": "8", "OFFSET(prb_data_ring.head_lpos)": "16",
    "OFFSET(prb_data_ring.tail_lpos)": "24", "SIZE(atomic_long_t)": "8", "OFFSET(atomic_long_t.counter)": "0",
}
FINALIZED, COMMITTED, REUSABLE = 2, 1, 3


def _lockless_memory(tail_id: int, head_id: int, descriptors: list[tuple[int, int, int, int, bytes]],
                     data: dict[int, bytes]) -> VirtualRegions:
    """A 6.1-layout ring: 8 descriptors, a 64-byte text ring.

    descriptors: (state_var_id, state, lpos_begin, lpos_next, info) per index.
    """
    ringbuffer, descs, infos, text = (0xFFFF_8880_0000_0000 + i * 0x1_0000 for i in range(4))
    rb = bytearray(88)
    struct.pack_into("<I", rb, 0, 3)
    struct.pack_into("<QQQQ", rb, 8, descs, infos, head_id, tail_id)
    struct.pack_into("<IxxxxQ", rb, 48, 6, text)
    desc_bytes, info_bytes = bytearray(8 * 24), bytearray(8 * 88)
    for index, (sv_id, state, begin, next_, info) in enumerate(descriptors):
        struct.pack_into("<QQQ", desc_bytes, index * 24, (state << 62) | sv_id, begin, next_)
        info_bytes[index * 88:index * 88 + len(info)] = info
    text_bytes = bytearray(64)
    for at, chunk in data.items():
        text_bytes[at:at + len(chunk)] = chunk
    return VirtualRegions({
        int(LOCKLESS_6_1["SYMBOL(prb)"], 16): struct.pack("<Q", ringbuffer), ringbuffer: bytes(rb),
        descs: bytes(desc_bytes), infos: bytes(info_bytes), text: bytes(text_bytes),
    })


def _info_bytes(seq: int, ts_nsec: int, text_len: int, facility: int, level: int, caller_id: int) -> bytes:
    return struct.pack("<QQHBBI", seq, ts_nsec, text_len, facility, level << 5, caller_id)


def test_lockless_ring_reads_wrapped_truncated_and_skips_unusable_descriptors():
    # ids 9..14 live at indexes 1..6 of an 8-entry ring; lpos values are in the
    # third wrap of the 64-byte text ring (lpos % 64 is the ring offset).
    descriptors = [(0, REUSABLE, 1, 1, b"")] * 8
    descriptors[1] = (9, FINALIZED, 152, 168, _info_bytes(100, 1_000_002_999, 5, 0, 6, 1))
    descriptors[2] = (10, COMMITTED, 184, 216, _info_bytes(101, 2_000_000_000, 10, 1, 5, 0x8000_0001))
    descriptors[3] = (11, FINALIZED, 1, 1, _info_bytes(102, 0, 0, 0, 0, 0))  # data-less (FAILED_LPOS)
    descriptors[4] = (12, REUSABLE, 0, 0, _info_bytes(103, 0, 3, 0, 0, 0))
    descriptors[5] = (5, FINALIZED, 152, 168, _info_bytes(104, 0, 5, 0, 0, 0))  # id 13's slot still holds id 5
    descriptors[6] = (14, FINALIZED, 168, 184, _info_bytes(105, 123_456_789_000_000, 100, 0, 3, 42))
    data = {
        24: struct.pack("<Q", 9) + b"ab\ncd",
        40: struct.pack("<Q", 14) + b"\x01\xe9\tzzzz!",  # text_len 100 is cut at the block end
        0: struct.pack("<Q", 10) + b"0123456789",  # id 10 wrapped: its data sits at the ring's start
    }
    records = read_kernel_log(_lockless_memory(9, 14, descriptors, data), LOCKLESS_6_1)
    assert records == [
        LogRecord(seq=100, ts_nsec=1_000_002_999, level=6, facility=0, caller_id=1, text=b"ab\ncd"),
        LogRecord(seq=101, ts_nsec=2_000_000_000, level=5, facility=1, caller_id=0x8000_0001, text=b"0123456789"),
        LogRecord(seq=105, ts_nsec=123_456_789_000_000, level=3, facility=0, caller_id=42, text=b"\x01\xe9\tzzzz!"),
    ]


def test_lockless_ring_whose_ids_span_more_than_its_descriptors_is_bad_source():
    memory = _lockless_memory(9, 9 + 8, [(0, REUSABLE, 1, 1, b"")] * 8, {})
    with pytest.raises(BadSource, match="spans more than its 8 descriptors"):
        read_kernel_log(memory, LOCKLESS_6_1)


# struct printk_log of 5.1-5.9 with CONFIG_PRINTK_CALLER (24 bytes) or without (16).
LOG_BUF_5_4 = {
    "SYMBOL(log_buf)": "ffffffff82000000", "SYMBOL(log_buf_len)": "ffffffff82000008",
    "SYMBOL(log_first_idx)": "ffffffff82000010", "SYMBOL(log_next_idx)": "ffffffff82000018",
    "SIZE(printk_log)": "16", "OFFSET(printk_log.ts_nsec)": "0", "OFFSET(printk_log.len)": "8",
    "OFFSET(printk_log.text_len)": "10", "OFFSET(printk_log.dict_len)": "12",
}


def _log_buf_memory(buffer: bytes, first_idx: int, next_idx: int) -> VirtualRegions:
    buffer_vaddr = 0xFFFF_8880_0100_0000
    globals_ = struct.pack("<QIxxxxIxxxxI", buffer_vaddr, len(buffer), first_idx, next_idx)
    return VirtualRegions({0xFFFFFFFF82000000: globals_, buffer_vaddr: buffer})


def _printk_log(ts_nsec: int, text: bytes, facility: int = 0, level: int = 6, length: int | None = None,
                caller_id: int | None = None) -> bytes:
    header = struct.pack("<QHHHBB", ts_nsec, 0, len(text), 0, facility, level << 5)
    if caller_id is not None:
        header += struct.pack("<Ixxxx", caller_id)
    record_len = length if length is not None else (len(header) + len(text) + 7) // 8 * 8
    return (header[:8] + struct.pack("<H", record_len) + header[10:] + text).ljust(record_len, b"\0")


def test_log_buf_records_follow_the_wrap_marker_to_the_buffer_start():
    buffer = bytearray(128)
    buffer[64:96] = _printk_log(5_000_000, b"oldest\nline", level=4)
    # A zero len at 96 marks the end; the next record is at index 0.
    buffer[0:24] = _printk_log(6_000_000, b"newest", facility=3, level=7)
    records = read_kernel_log(_log_buf_memory(bytes(buffer), 64, 24), LOG_BUF_5_4)
    assert records == [
        LogRecord(seq=0, ts_nsec=5_000_000, level=4, facility=0, caller_id=None, text=b"oldest\nline"),
        LogRecord(seq=1, ts_nsec=6_000_000, level=7, facility=3, caller_id=None, text=b"newest"),
    ]
    assert format_makedumpfile(records) == (
        "[    0.005000] oldest\n"
        "               line\n"
        "[    0.006000] newest\n"
    )


def test_log_buf_with_printk_caller_records_caller_ids():
    info = {**LOG_BUF_5_4, "SIZE(printk_log)": "24", "OFFSET(printk_log.caller_id)": "16"}
    buffer = _printk_log(1, b"hi", caller_id=0x8000_0003).ljust(64, b"\0")
    (record,) = read_kernel_log(_log_buf_memory(buffer, 0, 32), info)
    assert record.caller_id == 0x8000_0003 and record.text == b"hi"


def test_log_buf_cycle_or_index_outside_is_bad_source():
    buffer = bytearray(64)
    buffer[0:24] = _printk_log(1, b"loop")  # 0 -> 24, and 24 is a wrap marker back to 0
    with pytest.raises(BadSource, match="loop without reaching log_next_idx"):
        read_kernel_log(_log_buf_memory(bytes(buffer), 0, 40), LOG_BUF_5_4)
    with pytest.raises(BadSource, match="outside log_buf"):
        read_kernel_log(_log_buf_memory(bytes(buffer), 60, 0), LOG_BUF_5_4)


def test_kernel_without_prb_or_log_buf_is_unsupported():
    with pytest.raises(Unsupported, match=r"SYMBOL\(prb\)"):
        read_kernel_log(VirtualRegions({}), {"SYMBOL(log_buf)": "ffffffff82000000"})


# --- makedumpfile formatting ---------------------------------------------------


def test_format_escapes_like_makedumpfile_signed_char_and_c_locale():
    record = LogRecord(seq=0, ts_nsec=12_345_678_901, level=6, facility=0, caller_id=None,
                       text=b"a\x01\x7f\xe9\x00\tb\rc\x0b\x0c")
    # Bytes >= 0x80 are negative chars in makedumpfile, printed as "\x%02x" of an int.
    assert format_makedumpfile([record]) == "[   12.345678] a\\x01\\x7f\\xffffffe9\\x00\tb\rc\x0b\x0c\n"


def test_format_indents_continuation_lines_and_prints_empty_records():
    records = [
        LogRecord(0, 123_456 * 10**9 + 999_999, 6, 0, None, b"x\n\ny\n"),
        LogRecord(1, 0, 6, 0, None, b""),
    ]
    indent = " " * len("[123456.000999] ")
    assert format_makedumpfile(records) == (
        f"[123456.000999] x\n{indent}\n{indent}y\n{indent}\n[    0.000000] \n"
    )


def test_format_caller_ids_as_makedumpfile_1_7_5_does():
    records = [
        LogRecord(0, 1_500_000_000, 6, 0, 1, b"task\nnext"),
        LogRecord(1, 2_000_000, 6, 0, 0x8000_0010, b"cpu"),
        LogRecord(2, 3_000_000, 6, 0, None, b"no caller"),
    ]
    assert format_makedumpfile(records, caller_ids=True) == (
        "[    1.500000] [      T1] task\n"
        "                          next\n"
        "[    0.002000] [     C16] cpu\n"
        "[    0.003000] no caller\n"
    )


# --- the real dump -------------------------------------------------------------


@pytest.fixture(scope="session")
def qemu_panic_elf(real_vmcore) -> Path:
    return Path(real_vmcore)


@pytest.fixture(scope="session")
def qemu_panic(qemu_panic_elf):
    """The real dump, opened (vmcap.source.dump.Dump)."""
    from vmcap.source.dump import open_dump

    with open_dump(str(qemu_panic_elf)) as dump:
        yield dump


@pytest.fixture(scope="session")
def qemu_panic_log(qemu_panic) -> list[LogRecord]:
    translator = qemu_panic.translator
    return read_kernel_log(translator, qemu_panic.vmcoreinfo)


def _makedumpfile_version() -> tuple[int, ...] | None:
    if not shutil.which("makedumpfile"):
        return None
    banner = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", banner)
    return tuple(int(part) for part in found.groups()) if found else None


def test_prb_symbol_translates_and_page_walk_agrees_with_kernel_image_shortcut(qemu_panic):
    info = qemu_panic.vmcoreinfo
    translator = make_translator(qemu_panic.physical.read, info, qemu_panic.platform)
    assert translator.five_level  # TCG guest with la57: exercises the 5-level walk
    prb = vi.symbol(info, "prb", required=True)
    paddr = translator.to_physical(prb)
    assert paddr == prb - START_KERNEL_MAP + vi.number(info, "phys_base")
    assert translator.walk_page_tables(prb) == paddr
    ringbuffer = struct.unpack("<Q", translator.read_virtual(prb, 8))[0]
    assert ringbuffer == vi.symbol(info, "printk_rb_static")


def test_translation_matches_drgn(qemu_panic, qemu_panic_elf):
    drgn = pytest.importorskip("drgn")
    program = drgn.Program()
    program.set_core_dump(str(qemu_panic_elf))
    info = qemu_panic.vmcoreinfo
    translator = make_translator(qemu_panic.physical.read, info, qemu_panic.platform)
    mem_section_root = vi.symbol(info, "mem_section", required=True)  # in the direct map
    sections = struct.unpack("<Q", translator.read_virtual(mem_section_root, 8))[0]
    mem_map = struct.unpack("<Q", translator.read_virtual(sections, 8))[0] & ~0x1F  # in vmemmap
    for vaddr, size in ((vi.symbol(info, "init_uts_ns"), 390), (mem_section_root, 64), (sections, 4096),
                        (mem_map, 3 * 2**20)):
        assert translator.read_virtual(vaddr, size) == program.read(vaddr, size), hex(vaddr)


def test_kernel_log_holds_the_panic_in_sequence(qemu_panic_log):
    texts = [record.text for record in qemu_panic_log]
    assert texts[0].startswith(b"Linux version 6.1.0-56-amd64 ")
    assert b"Kernel panic - not syncing: sysrq triggered crash" in texts
    assert texts[-1] == b"---[ end Kernel panic - not syncing: sysrq triggered crash ]---"
    seqs = [record.seq for record in qemu_panic_log]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert [record.level for record in qemu_panic_log if record.text.startswith(b"Kernel panic")] == [0]


def test_kernel_log_matches_the_serial_console(qemu_panic_log):
    """The console file was captured on another boot of the same guest (its
    timestamps and KASLR offset differ), so lines are compared without
    timestamps, in order; boot-time lines at 0.000000 must match exactly."""
    if not QEMU_PANIC_CONSOLE.exists():
        pytest.skip(f"{QEMU_PANIC_CONSOLE} not present")
    console = QEMU_PANIC_CONSOLE.read_text(encoding="latin-1").splitlines()
    timestamped = re.compile(r"^\[ *\d+\.\d{6}\] (.*)$")
    console_lines = [found.group(1) for line in console if (found := timestamped.match(line))]
    # The console prints the prefix on every line of a multi-line record.
    log_lines = [line.decode("latin-1") for record in qemu_panic_log for line in record.text.split(b"\n")]
    matcher = difflib.SequenceMatcher(None, console_lines, log_lines, autojunk=False)
    in_order = sum(block.size for block in matcher.get_matching_blocks())
    assert in_order >= 0.9 * len(console_lines)
    formatted = set(format_makedumpfile(qemu_panic_log).splitlines())
    at_boot = [line for line in console if line.startswith("[    0.000000] ") and "tsc:" not in line]
    assert len(at_boot) >= 10 and all(line in formatted for line in at_boot)


def test_format_equals_makedumpfile_dump_dmesg(qemu_panic_log, real_vmcore_for_makedumpfile,
                                               tmp_path):
    version = _makedumpfile_version()
    if version is None:
        pytest.skip("makedumpfile not installed")
    copy = real_vmcore_for_makedumpfile
    out = tmp_path / "dmesg.txt"
    run = subprocess.run(["makedumpfile", "--dump-dmesg", str(copy), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    expected = out.read_bytes().decode("latin-1")
    assert expected.count("\n") >= 400
    assert format_makedumpfile(qemu_panic_log, caller_ids=version >= (1, 7, 5)) == expected
