"""The kernel log (dmesg) of the crashed kernel, read from the dump.

Two ring buffer formats are handled, chosen by what VMCOREINFO describes:

- 5.10 and later: the lockless printk_ringbuffer (SYMBOL(prb); kernel/printk/
  printk_ringbuffer.h). A descriptor ring (state + data-block position per
  record), an info ring (seq, timestamp, text length, level per record) and a
  text data ring.
- 3.5 to 5.9: log_buf, a byte buffer of variable-length struct printk_log
  records (struct log before 3.11) each followed by its text.

Each ring is read whole in one read_virtual call (a few hundred KiB), then
decoded from bytes by pure functions. format_makedumpfile() renders records
byte for byte as `makedumpfile --dump-dmesg` does (printk.c dump_record,
makedumpfile.c dump_log_entry).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Protocol

from ..errors import BadSource, Unsupported
from . import vmcoreinfo as vi


@dataclass(frozen=True)
class LogRecord:
    """One printk record.

    seq is the kernel's sequence number for the lockless ring buffer. log_buf
    kernels (3.5-5.9) do not export log_first_seq in VMCOREINFO, so there seq
    counts from 0 at the oldest record still in the buffer. caller_id is the
    raw printk caller id (bit 31 set: CPU number, clear: task id), None when
    the kernel does not record it (log_buf without CONFIG_PRINTK_CALLER).
    """

    seq: int
    ts_nsec: int
    level: int
    facility: int
    caller_id: int | None
    text: bytes


class VirtualMemory(Protocol):
    def read_virtual(self, vaddr: int, size: int) -> bytes: ...


# Kernel integers in the crashed kernel's byte order ("little" or "big"): the
# translator says which (its byte_order; x86_64 and arm64 dumps are little).
_INTS = {order: tuple(struct.Struct(prefix + code) for code in "HIQ")
         for order, prefix in (("little", "<"), ("big", ">"))}


def _u16(buf: bytes, at: int, order: str = "little") -> int:
    return _INTS[order][0].unpack_from(buf, at)[0]


def _u32(buf: bytes, at: int, order: str = "little") -> int:
    return _INTS[order][1].unpack_from(buf, at)[0]


def _u64(buf: bytes, at: int, order: str = "little") -> int:
    return _INTS[order][2].unpack_from(buf, at)[0]


def _level(flags_byte: int, order: str) -> int:
    """printk_info/printk_log's "u8 flags:5, level:3": GCC packs bit-fields from the low bit
    on little-endian targets and from the high bit on big-endian ones (s390x)."""
    return flags_byte >> 5 if order == "little" else flags_byte & 0x7


# --- 5.10+ lockless ring buffer ------------------------------------------------

# desc_state from printk_ringbuffer.h: the top two bits of state_var.
DESC_STATE_SHIFT = 62
DESC_ID_MASK = (1 << DESC_STATE_SHIFT) - 1
DESC_COMMITTED = 1
DESC_FINALIZED = 2
# printk's LOG_BUF_LEN_MAX is 1 << 31; anything larger is not a ring buffer.
MAX_RING_BITS = 31
# All of a log's arrays together; a kernel log is a few MiB (CONFIG_LOG_BUF_SHIFT
# is at most 25), larger only by log_buf_len= on the command line.
MAX_LOG_BYTES = 256 << 20
ID_BYTES = 8  # each data block starts with the unsigned long descriptor id


@dataclass(frozen=True)
class RingbufferLayout:
    """Where the fields of the lockless ring buffer structures are (bytes), from VMCOREINFO."""

    prb_symbol: int  # address of `prb`, a pointer to the printk_ringbuffer
    ringbuffer_size: int
    desc_ring: int  # printk_ringbuffer.desc_ring
    text_data_ring: int  # printk_ringbuffer.text_data_ring
    count_bits: int  # prb_desc_ring.count_bits (unsigned int)
    descs: int  # prb_desc_ring.descs (pointer)
    infos: int  # prb_desc_ring.infos (pointer)
    head_id: int  # prb_desc_ring.head_id.counter
    tail_id: int  # prb_desc_ring.tail_id.counter
    size_bits: int  # prb_data_ring.size_bits (unsigned int)
    data: int  # prb_data_ring.data (pointer)
    desc_size: int
    state_var: int  # prb_desc.state_var.counter
    text_begin: int  # prb_desc.text_blk_lpos.begin
    text_next: int  # prb_desc.text_blk_lpos.next
    info_size: int
    seq: int  # printk_info.seq (u64)
    ts_nsec: int  # printk_info.ts_nsec (u64)
    text_len: int  # printk_info.text_len (u16)
    facility: int  # printk_info.facility (u8); the next byte holds flags:5, level:3
    caller_id: int | None  # printk_info.caller_id (u32); always exported since 5.10


def ringbuffer_layout(info: vi.VmcoreInfo) -> RingbufferLayout:
    """The lockless ring buffer's layout; Unsupported naming the first missing key."""
    counter = vi.offset(info, "atomic_long_t.counter", required=True)
    text_blk_lpos = vi.offset(info, "prb_desc.text_blk_lpos", required=True)
    text_len = vi.offset(info, "printk_info.text_len", required=True)
    return RingbufferLayout(
        prb_symbol=vi.symbol(info, "prb", required=True),
        ringbuffer_size=vi.size(info, "printk_ringbuffer", required=True),
        desc_ring=vi.offset(info, "printk_ringbuffer.desc_ring", required=True),
        text_data_ring=vi.offset(info, "printk_ringbuffer.text_data_ring", required=True),
        count_bits=vi.offset(info, "prb_desc_ring.count_bits", required=True),
        descs=vi.offset(info, "prb_desc_ring.descs", required=True),
        infos=vi.offset(info, "prb_desc_ring.infos", required=True),
        head_id=vi.offset(info, "prb_desc_ring.head_id", required=True) + counter,
        tail_id=vi.offset(info, "prb_desc_ring.tail_id", required=True) + counter,
        size_bits=vi.offset(info, "prb_data_ring.size_bits", required=True),
        data=vi.offset(info, "prb_data_ring.data", required=True),
        desc_size=vi.size(info, "prb_desc", required=True),
        state_var=vi.offset(info, "prb_desc.state_var", required=True) + counter,
        text_begin=text_blk_lpos + vi.offset(info, "prb_data_blk_lpos.begin", required=True),
        text_next=text_blk_lpos + vi.offset(info, "prb_data_blk_lpos.next", required=True),
        info_size=vi.size(info, "printk_info", required=True),
        seq=vi.offset(info, "printk_info.seq", required=True),
        ts_nsec=vi.offset(info, "printk_info.ts_nsec", required=True),
        text_len=text_len,
        # facility and level are not in VMCOREINFO; in every released layout
        # they are the two bytes after the u16 text_len.
        facility=text_len + 2,
        caller_id=vi.offset(info, "printk_info.caller_id"),
    )


def _check_fields(struct_key: str, struct_size: int, fields: dict[str, tuple[int, int]]) -> None:
    """BadSource naming the key when a field (offset, width) does not lie inside its struct."""
    for key, (at, width) in fields.items():
        if at + width > struct_size:
            raise BadSource(f"VMCOREINFO {key}={at} (+{width} bytes) lies outside "
                            f"{struct_key}={struct_size}")


def check_ringbuffer_layout(layout: RingbufferLayout) -> None:
    """Every field the decoder reads lies inside its struct (a damaged note could put it anywhere)."""
    desc_ring, data_ring = layout.desc_ring, layout.text_data_ring
    _check_fields("SIZE(printk_ringbuffer)", layout.ringbuffer_size, {
        "OFFSET(printk_ringbuffer.desc_ring) + OFFSET(prb_desc_ring.count_bits)": (desc_ring + layout.count_bits, 4),
        "OFFSET(printk_ringbuffer.desc_ring) + OFFSET(prb_desc_ring.descs)": (desc_ring + layout.descs, 8),
        "OFFSET(printk_ringbuffer.desc_ring) + OFFSET(prb_desc_ring.infos)": (desc_ring + layout.infos, 8),
        "OFFSET(printk_ringbuffer.desc_ring) + OFFSET(prb_desc_ring.head_id)": (desc_ring + layout.head_id, 8),
        "OFFSET(printk_ringbuffer.desc_ring) + OFFSET(prb_desc_ring.tail_id)": (desc_ring + layout.tail_id, 8),
        "OFFSET(printk_ringbuffer.text_data_ring) + OFFSET(prb_data_ring.size_bits)": (data_ring + layout.size_bits, 4),
        "OFFSET(printk_ringbuffer.text_data_ring) + OFFSET(prb_data_ring.data)": (data_ring + layout.data, 8),
    })
    _check_fields("SIZE(prb_desc)", layout.desc_size, {
        "OFFSET(prb_desc.state_var)": (layout.state_var, 8),
        "OFFSET(prb_desc.text_blk_lpos) + OFFSET(prb_data_blk_lpos.begin)": (layout.text_begin, 8),
        "OFFSET(prb_desc.text_blk_lpos) + OFFSET(prb_data_blk_lpos.next)": (layout.text_next, 8),
    })
    fields = {
        "OFFSET(printk_info.seq)": (layout.seq, 8),
        "OFFSET(printk_info.ts_nsec)": (layout.ts_nsec, 8),
        "OFFSET(printk_info.text_len) (+ facility, level)": (layout.text_len, 4),
    }
    if layout.caller_id is not None:
        fields["OFFSET(printk_info.caller_id)"] = (layout.caller_id, 4)
    _check_fields("SIZE(printk_info)", layout.info_size, fields)


def records_from_rings(layout: RingbufferLayout, ringbuffer: bytes, descs: bytes, infos: bytes,
                       text_data: bytes, byte_order: str = "little") -> list[LogRecord]:
    """Decode the records from tail_id to head_id (inclusive) as makedumpfile does.

    ringbuffer is the struct printk_ringbuffer; descs, infos and text_data are
    the whole descriptor, info and text data arrays. Records not committed or
    finalized, whose state names another id (reused), or with no data block
    are skipped.
    """
    order = byte_order
    desc_ring = layout.desc_ring
    count = 1 << _u32(ringbuffer, desc_ring + layout.count_bits, order)
    data_size = len(text_data)
    head_id = _u64(ringbuffer, desc_ring + layout.head_id, order)
    tail_id = _u64(ringbuffer, desc_ring + layout.tail_id, order)
    span = (head_id - tail_id) & DESC_ID_MASK
    if span >= count:
        raise BadSource(
            f"printk ring buffer at {layout.prb_symbol:#x}: tail_id {tail_id:#x} to head_id "
            f"{head_id:#x} spans more than its {count} descriptors"
        )
    records = []
    for step in range(span + 1):
        record_id = (tail_id + step) & DESC_ID_MASK
        index = record_id % count
        desc = index * layout.desc_size
        state_var = _u64(descs, desc + layout.state_var, order)
        if state_var & DESC_ID_MASK != record_id:
            continue
        if state_var >> DESC_STATE_SHIFT not in (DESC_COMMITTED, DESC_FINALIZED):
            continue
        begin = _u64(descs, desc + layout.text_begin, order) % data_size
        next_ = _u64(descs, desc + layout.text_next, order) % data_size
        if begin == next_:  # data-less record (e.g. FAILED_LPOS)
            continue
        if begin > next_:  # the block wrapped: the kernel stored it at the ring's start
            begin = 0
        begin += ID_BYTES
        if next_ < begin:
            raise BadSource(
                f"printk record id {record_id:#x}: data block [{begin - ID_BYTES:#x}, {next_:#x}) "
                f"is shorter than its id"
            )
        info = index * layout.info_size
        text_len = min(_u16(infos, info + layout.text_len, order), next_ - begin)
        records.append(LogRecord(
            seq=_u64(infos, info + layout.seq, order),
            ts_nsec=_u64(infos, info + layout.ts_nsec, order),
            level=_level(infos[info + layout.facility + 1], order),
            facility=infos[info + layout.facility],
            caller_id=None if layout.caller_id is None else _u32(infos, info + layout.caller_id, order),
            text=bytes(text_data[begin:begin + text_len]),
        ))
    return records


def _read_lockless(memory: VirtualMemory, layout: RingbufferLayout) -> list[LogRecord]:
    order = getattr(memory, "byte_order", "little")
    check_ringbuffer_layout(layout)
    prb = _u64(memory.read_virtual(layout.prb_symbol, 8), 0, order)
    ringbuffer = memory.read_virtual(prb, layout.ringbuffer_size)
    desc_ring, data_ring = layout.desc_ring, layout.text_data_ring
    count_bits = _u32(ringbuffer, desc_ring + layout.count_bits, order)
    size_bits = _u32(ringbuffer, data_ring + layout.size_bits, order)
    if size_bits > MAX_RING_BITS or count_bits > size_bits:
        raise BadSource(
            f"printk ring buffer at {prb:#x}: count_bits {count_bits}, size_bits {size_bits} are not plausible"
        )
    count = 1 << count_bits
    total = count * (layout.desc_size + layout.info_size) + (1 << size_bits)
    if total > MAX_LOG_BYTES:
        raise Unsupported(f"printk ring buffer at {prb:#x}: {count} descriptors and "
                          f"{1 << size_bits} text bytes ({total} bytes); vmcap reads logs up to "
                          f"{MAX_LOG_BYTES} bytes")
    descs = memory.read_virtual(_u64(ringbuffer, desc_ring + layout.descs, order), count * layout.desc_size)
    infos = memory.read_virtual(_u64(ringbuffer, desc_ring + layout.infos, order), count * layout.info_size)
    text_data = memory.read_virtual(_u64(ringbuffer, data_ring + layout.data, order), 1 << size_bits)
    return records_from_rings(layout, ringbuffer, descs, infos, text_data, order)


# --- 3.5-5.9 log_buf -----------------------------------------------------------


@dataclass(frozen=True)
class LogBufLayout:
    """Symbols and struct printk_log (struct log before 3.11) field offsets, from VMCOREINFO."""

    log_buf_symbol: int  # char *log_buf
    log_buf_len_symbol: int  # u32 log_buf_len
    first_idx_symbol: int  # u32 log_first_idx
    next_idx_symbol: int  # u32 log_next_idx
    header_size: int  # sizeof(struct printk_log); the text follows the header
    ts_nsec: int  # u64
    len: int  # u16 length of the whole record; 0 marks "wrap to the start"
    text_len: int  # u16
    facility: int  # u8; the next byte holds flags:5, level:3
    caller_id: int | None  # u32, only with CONFIG_PRINTK_CALLER (5.1+)


def log_buf_layout(info: vi.VmcoreInfo) -> LogBufLayout:
    struct_name = "printk_log" if vi.size(info, "printk_log") is not None else "log"
    text_len = vi.offset(info, f"{struct_name}.text_len", required=True)
    dict_len = vi.offset(info, f"{struct_name}.dict_len")
    return LogBufLayout(
        log_buf_symbol=vi.symbol(info, "log_buf", required=True),
        log_buf_len_symbol=vi.symbol(info, "log_buf_len", required=True),
        first_idx_symbol=vi.symbol(info, "log_first_idx", required=True),
        next_idx_symbol=vi.symbol(info, "log_next_idx", required=True),
        header_size=vi.size(info, struct_name, required=True),
        ts_nsec=vi.offset(info, f"{struct_name}.ts_nsec", required=True),
        len=vi.offset(info, f"{struct_name}.len", required=True),
        text_len=text_len,
        # facility and level are not in VMCOREINFO; they follow the u16 dict_len.
        facility=(dict_len if dict_len is not None else text_len + 2) + 2,
        caller_id=vi.offset(info, f"{struct_name}.caller_id"),
    )


def check_log_buf_layout(layout: LogBufLayout) -> None:
    """Every field of the record header lies inside it (a damaged note could put it anywhere)."""
    fields = {
        "OFFSET(printk_log.ts_nsec)": (layout.ts_nsec, 8),
        "OFFSET(printk_log.len)": (layout.len, 2),
        "OFFSET(printk_log.text_len)": (layout.text_len, 2),
        "OFFSET(printk_log.dict_len) (+ facility, level)": (layout.facility, 2),
    }
    if layout.caller_id is not None:
        fields["OFFSET(printk_log.caller_id)"] = (layout.caller_id, 4)
    _check_fields("SIZE(printk_log)", layout.header_size, fields)


def records_from_log_buf(layout: LogBufLayout, log_buf: bytes, first_idx: int, next_idx: int,
                         byte_order: str = "little") -> list[LogRecord]:
    """Walk log_buf from first_idx to next_idx as makedumpfile's dump_dmesg does."""
    order = byte_order
    check_log_buf_layout(layout)
    header = layout.header_size
    # Each step advances by at least one header, so more steps than this is a cycle.
    max_records = len(log_buf) // header
    records = []
    position = first_idx
    while position != next_idx:
        if not 0 <= position <= len(log_buf) - header:
            raise BadSource(
                f"log_buf record index {position:#x} is outside log_buf ({len(log_buf):#x} bytes); "
                f"log_first_idx {first_idx:#x}, log_next_idx {next_idx:#x}"
            )
        if len(records) > max_records:
            raise BadSource(
                f"log_buf records loop without reaching log_next_idx {next_idx:#x} "
                f"(log_first_idx {first_idx:#x}, now at {position:#x})"
            )
        record_len = _u16(log_buf, position + layout.len, order)
        if record_len == 0:  # end-of-buffer marker: this record is at the start
            position = 0
            record_len = _u16(log_buf, layout.len, order)
        text_len = _u16(log_buf, position + layout.text_len, order)
        if record_len < header or header + text_len > record_len or position + record_len > len(log_buf):
            raise BadSource(
                f"log_buf record at index {position:#x}: len {record_len}, text_len {text_len} "
                f"do not fit a {header}-byte header in a {len(log_buf):#x}-byte log_buf"
            )
        text_start = position + header
        records.append(LogRecord(
            seq=len(records),
            ts_nsec=_u64(log_buf, position + layout.ts_nsec, order),
            level=_level(log_buf[position + layout.facility + 1], order),
            facility=log_buf[position + layout.facility],
            caller_id=None if layout.caller_id is None else _u32(log_buf, position + layout.caller_id, order),
            text=bytes(log_buf[text_start:text_start + text_len]),
        ))
        position += record_len
    return records


def _read_log_buf(memory: VirtualMemory, layout: LogBufLayout) -> list[LogRecord]:
    order = getattr(memory, "byte_order", "little")
    log_buf = _u64(memory.read_virtual(layout.log_buf_symbol, 8), 0, order)
    log_buf_len = _u32(memory.read_virtual(layout.log_buf_len_symbol, 4), 0, order)
    first_idx = _u32(memory.read_virtual(layout.first_idx_symbol, 4), 0, order)
    next_idx = _u32(memory.read_virtual(layout.next_idx_symbol, 4), 0, order)
    if not 0 < log_buf_len <= 1 << MAX_RING_BITS:
        raise BadSource(f"log_buf_len {log_buf_len:#x} at {layout.log_buf_len_symbol:#x} is not plausible")
    if log_buf_len > MAX_LOG_BYTES:
        raise Unsupported(f"log_buf_len {log_buf_len:#x}: vmcap reads logs up to {MAX_LOG_BYTES} bytes")
    return records_from_log_buf(layout, memory.read_virtual(log_buf, log_buf_len), first_idx, next_idx, order)


# --- entry points --------------------------------------------------------------


def read_kernel_log(translator: VirtualMemory, vmcoreinfo: vi.VmcoreInfo) -> list[LogRecord]:
    """All records in the crashed kernel's log buffer, oldest first.

    translator provides read_virtual (e.g. kernel.X86_64Translator). The
    format is chosen as makedumpfile chooses it: SYMBOL(prb) means the 5.10+
    lockless ring buffer, else SYMBOL(log_buf) with log_first_idx means 3.5-5.9.
    """
    if vi.symbol(vmcoreinfo, "prb") is not None:
        return _read_lockless(translator, ringbuffer_layout(vmcoreinfo))
    if vi.symbol(vmcoreinfo, "log_buf") is not None and vi.symbol(vmcoreinfo, "log_first_idx") is not None:
        return _read_log_buf(translator, log_buf_layout(vmcoreinfo))
    raise Unsupported(
        "VMCOREINFO lacks SYMBOL(prb) and SYMBOL(log_buf)/SYMBOL(log_first_idx): "
        "no kernel log format vmcap reads (kernels before 3.5 keep a plain character ring)"
    )


_ESCAPES: dict[int, dict[int, str]] = {}


def _escape_table(indent: int) -> dict[int, str]:
    """str.translate table for one record's text, as makedumpfile writes it.

    makedumpfile tests each byte as a (signed) char with isprint() || isspace()
    in the C locale and prints the rest with "\\x%02x" of the char promoted to
    int, so bytes 0x80-0xff come out as \\xffffff80-\\xffffffff. A newline is
    followed by spaces up to the width of the record's prefix.
    """
    table = _ESCAPES.get(indent)
    if table is None:
        table = {}
        for byte in range(256):
            if byte == 0x0A:
                table[byte] = "\n" + " " * indent
            elif 0x20 <= byte <= 0x7E or byte in (0x09, 0x0B, 0x0C, 0x0D):
                continue  # printed as is
            elif byte < 0x80:
                table[byte] = f"\\x{byte:02x}"
            else:
                table[byte] = f"\\x{byte | 0xFFFFFF00:08x}"
        _ESCAPES[indent] = table
    return table


def format_makedumpfile(records: Iterable[LogRecord], *, caller_ids: bool = False) -> str:
    """The text `makedumpfile --dump-dmesg` writes for these records.

    Each record is "[%5llu.%06lu] " + text + "\\n". makedumpfile 1.7.5 and later
    (commit 48bb1e0) add "[%8s] " with T<pid> or C<cpu> after the timestamp
    whenever VMCOREINFO has the caller_id offset, which every 5.10+ kernel
    exports; pass caller_ids=True to match those versions. 1.7.2 (Debian 12)
    prints no caller ids.
    """
    lines = []
    for record in records:
        seconds, nanoseconds = divmod(record.ts_nsec, 1_000_000_000)
        prefix = f"[{seconds:5d}.{nanoseconds // 1000:06d}] "
        if caller_ids and record.caller_id is not None:
            kind = "C" if record.caller_id & 0x8000_0000 else "T"
            prefix += f"[{kind + str(record.caller_id & 0x7FFF_FFFF):>8}] "
        text = record.text.decode("latin-1").translate(_escape_table(len(prefix)))
        lines.append(f"{prefix}{text}\n")
    return "".join(lines)
