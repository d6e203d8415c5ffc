"""makedumpfile's kdump-compressed ("diskdump") format: a writer and a reader.

File layout (makedumpfile IMPLEMENTATION, diskdump_mod.h, crash diskdump.c;
every field in the dumped machine's byte order):

    0                          disk_dump_header, padded to one block
    block_size                 kdump_sub_header, then the ELF note bytes  (sub_hdr_size blocks)
    (1 + sub_hdr_size) * bs    1st bitmap: pfn is RAM                     (bitmap_blocks / 2 blocks)
                               2nd bitmap: pfn is dumped                  (bitmap_blocks / 2 blocks)
    (1 + sub_hdr_size + bitmap_blocks) * bs
                               page_desc[pages dumped], 24 bytes each, in pfn order
    after the descriptors      page data, each page compressed on its own (or raw)

block_size is the page size. Bitmaps are LSB-first (pfn n is bit n & 7 of
byte n >> 3). Readers find a page's descriptor by counting the set bits of
the 2nd bitmap below its pfn, so descriptors and 2nd-bitmap bits must match
one for one.

The writer keeps only the two bitmaps in memory (one bit per pfn); page
descriptors and page data go to their final offsets as pages arrive, and the
headers are written last, so a capture cut short leaves a file without the
"KDUMP   " signature rather than one that looks whole.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from ..cpus import usable_cpus
from ..errors import BadSource, CorruptOutput, OutputError, OutputFull, Unsupported
from ..fileio.mmapio import open_source_fd
from ..kernel import vmcoreinfo as vi
from ..kernel.memory import struct_prefix
from .digest import PLACEHOLDER, UNKNOWN, StreamDigest, hex_value
from .elf import NoteSpan, build_note, iter_note_spans
from .flattened import DETECT_BYTES as FLATTENED_DETECT_BYTES
from .flattened import FlattenedFile, is_flattened
from .head import KdumpFile
from .note import DIGEST_LINE_KEYS

# The descriptor flags are re-exported: tests and tools know them as kdump's.
from .pagecodecs import (
    DUMP_DH_COMPRESSED_LZO,
    DUMP_DH_COMPRESSED_SNAPPY,
    DUMP_DH_COMPRESSED_ZLIB,
    DUMP_DH_COMPRESSED_ZSTD,
    PAGE_COMPRESSION_FLAGS,
    PAGE_FLAG,
    PageDataError,
    PageDecoder,
    encode_pages,
    page_compressor,
)

__all__ = [
    "KdumpHeader",
    "KdumpHeaderInfo",
    "KdumpLayout",
    "KdumpReader",
    "KdumpStats",
    "KdumpWriter",
    "is_kdump",
    "plan_layout",
]

KDUMP_SIGNATURE = b"KDUMP   "
LEGACY_DISKDUMP_SIGNATURE = b"DISKDUMP"
HEADER_VERSION = 6
DESCRIPTOR_BYTES = 24

# Header status bits beside the page compression flags (codecs.py).
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8  # header status only
DUMP_DH_EXCLUDED_VMEMMAP = 0x10  # header status only

COMPRESSION_FLAG = PAGE_FLAG
_COMPRESSION_NAMES = (
    (DUMP_DH_COMPRESSED_ZLIB, "zlib"),
    (DUMP_DH_COMPRESSED_LZO, "lzo"),
    (DUMP_DH_COMPRESSED_SNAPPY, "snappy"),
    (DUMP_DH_COMPRESSED_ZSTD, "zstd"),
)
_PAGE_COMPRESSION_FLAGS = PAGE_COMPRESSION_FLAGS

DUMP_LEVEL_EXCLUDE_ZERO = 1

# One batch is what the compressor threads share out: this much per thread
# keeps the per-batch Python work small next to the compression itself,
# and the staging copy plus its compressed pages small in a capture kernel.
BATCH_BYTES = 1 << 20
# write_pages stores a chunk of at least this many pages as it is rather
# than copying it into the staging batch (a batch's fixed cost is smaller).
DIRECT_MIN_PAGES = 64

_DESCRIPTOR_FIELDS = [("offset", "i8"), ("size", "u4"), ("flags", "u4"), ("page_flags", "u8")]


_MIN_BLOCK_SIZE = 512
_MAX_BLOCK_SIZE = 1 << 20


# --------------------------------------------------------------------------
# Struct layouts, described once for both the writer and the reader.

@dataclass(frozen=True)
class _StructLayout:
    """A C struct as (field name, struct format) pairs; pads have name None."""

    fields: tuple[tuple[str | None, str], ...]
    byte_order: str

    @functools.cached_property
    def _struct(self) -> struct.Struct:
        prefix = struct_prefix(self.byte_order)
        return struct.Struct(prefix + "".join(fmt for _, fmt in self.fields))

    @property
    def size(self) -> int:
        return self._struct.size

    @property
    def names(self) -> list[str]:
        return [name for name, fmt in self.fields if name is not None]

    def pack(self, values: dict[str, object]) -> bytes:
        """Pack values by field name; fields not given are zero (or empty strings)."""
        return self._struct.pack(*(values.get(name, b"" if fmt.endswith("s") else 0)
                                   for name, fmt in self.fields if name is not None))

    def unpack(self, data: bytes) -> dict[str, object]:
        return dict(zip(self.names, self._struct.unpack_from(data)))


_UTSNAME_FIELDS = tuple((f"uts_{part}", "65s")
                        for part in ("sysname", "nodename", "release", "version", "machine", "domainname"))
_HEADER_COUNTERS = (
    ("status", "I"), ("block_size", "i"), ("sub_hdr_size", "i"), ("bitmap_blocks", "I"),
    ("max_mapnr", "I"), ("total_ram_blocks", "I"), ("device_blocks", "I"),
    ("written_blocks", "I"), ("current_cpu", "I"), ("nr_cpus", "i"),
)

# struct disk_dump_header: struct timeval is two longs of the dumped machine,
# aligned to a long, so the pad after utsname (which ends at byte 402) and
# everything after it move with the ELF class.
_DISK_DUMP_HEADER_FIELDS = {
    64: (("signature", "8s"), ("header_version", "i"), *_UTSNAME_FIELDS, (None, "6x"),
         ("tv_sec", "q"), ("tv_usec", "q"), *_HEADER_COUNTERS),  # 464 bytes
    32: (("signature", "8s"), ("header_version", "i"), *_UTSNAME_FIELDS, (None, "2x"),
         ("tv_sec", "i"), ("tv_usec", "i"), *_HEADER_COUNTERS),  # 452 bytes
}

# struct kdump_sub_header: `unsigned long` fields follow the dumped machine's
# long, off_t is always 64-bit. i386 aligns 64-bit fields to 4 bytes
# ("packed"), other 32-bit ABIs (ARM) to 8 ("padded"); crash diskdump.c and
# libkdumpfile diskdump.c document the three variants.
_SUB_HEADER_FIELDS = {
    "lp64": (("phys_base", "Q"), ("dump_level", "i"), ("split", "i"),
             ("start_pfn", "Q"), ("end_pfn", "Q"),
             ("offset_vmcoreinfo", "q"), ("size_vmcoreinfo", "Q"),
             ("offset_note", "q"), ("size_note", "Q"),
             ("offset_eraseinfo", "q"), ("size_eraseinfo", "Q"),
             ("start_pfn_64", "Q"), ("end_pfn_64", "Q"), ("max_mapnr_64", "Q")),  # 104 bytes
    "ilp32_packed": (("phys_base", "I"), ("dump_level", "i"), ("split", "i"),
                     ("start_pfn", "I"), ("end_pfn", "I"),
                     ("offset_vmcoreinfo", "q"), ("size_vmcoreinfo", "I"),
                     ("offset_note", "q"), ("size_note", "I"),
                     ("offset_eraseinfo", "q"), ("size_eraseinfo", "I"),
                     ("start_pfn_64", "Q"), ("end_pfn_64", "Q"), ("max_mapnr_64", "Q")),  # 80 bytes
    "ilp32_padded": (("phys_base", "I"), ("dump_level", "i"), ("split", "i"),
                     ("start_pfn", "I"), ("end_pfn", "I"), (None, "4x"),
                     ("offset_vmcoreinfo", "q"), ("size_vmcoreinfo", "I"), (None, "4x"),
                     ("offset_note", "q"), ("size_note", "I"), (None, "4x"),
                     ("offset_eraseinfo", "q"), ("size_eraseinfo", "I"), (None, "4x"),
                     ("start_pfn_64", "Q"), ("end_pfn_64", "Q"), ("max_mapnr_64", "Q")),  # 96 bytes
}

_64BIT_MACHINES = ("x86_64", "aarch64", "ppc64", "s390x", "riscv64", "loongarch64", "mips64",
                   "ia64", "sparc64")


def _sub_header_variant(elf_class: int, machine: str) -> str:
    if elf_class == 64:
        return "lp64"
    if re.fullmatch(r"i[3-6]86", machine):
        return "ilp32_packed"
    return "ilp32_padded"


def _header_layout(elf_class: int, byte_order: str) -> _StructLayout:
    return _StructLayout(_DISK_DUMP_HEADER_FIELDS[elf_class], byte_order)


def _sub_header_layout(elf_class: int, machine: str, byte_order: str) -> _StructLayout:
    return _StructLayout(_SUB_HEADER_FIELDS[_sub_header_variant(elf_class, machine)], byte_order)


# The 32-bit header is the shorter one; anything shorter cannot be a header.
_HEADER_BYTES_MIN = min(_header_layout(c, "little").size for c in (32, 64))


def _descriptor_dtype(byte_order: str) -> np.dtype:
    prefix = struct_prefix(byte_order)
    return np.dtype([(name, prefix + code) for name, code in _DESCRIPTOR_FIELDS])


def _check_byte_order(byte_order: str) -> None:
    if byte_order not in ("little", "big"):
        raise ValueError(f"byte_order must be 'little' or 'big', not {byte_order!r}")


# --------------------------------------------------------------------------
# ELF notes and VMCOREINFO

def _find_vmcoreinfo_note(notes: bytes, byte_order: str) -> NoteSpan | None:
    for note in iter_note_spans(notes, byte_order):
        if note.name == "VMCOREINFO":
            return note
    return None


def _vmcoreinfo_number(vmcoreinfo: bytes, name: str) -> int | None:
    """NUMBER(name) from VMCOREINFO, or None if absent or unreadable (only a header hint)."""
    try:
        return vi.number(vi.parse_vmcoreinfo(vmcoreinfo), name)
    except BadSource:
        return None


# --------------------------------------------------------------------------
# Writer

@dataclass(frozen=True)
class KdumpHeaderInfo:
    """What the kdump headers say about the dumped machine and kernel."""

    machine: str  # utsname machine, e.g. "x86_64" (Platform.utsname)
    elf_class: int  # 32 or 64: size of the dumped kernel's long, which shapes the headers
    byte_order: str  # 'little' or 'big', of the dumped machine
    page_size: int
    release: str  # VMCOREINFO OSRELEASE, or ""
    nr_cpus: int
    vmcoreinfo: bytes  # raw VMCOREINFO note text, b"" if none
    notes: bytes  # the source's PT_NOTE bytes, copied verbatim (crash finds NT_PRSTATUS there)
    crash_time: int = 0  # seconds since the epoch, VMCOREINFO CRASHTIME
    version: str = ""  # utsname version (init_uts_ns), if the caller read it; see _UNKNOWN_UTS_VERSION


# libkdumpfile (and so drgn) ignores a header utsname whose release, version or
# machine is empty (util.c uts_looks_sane), and then cannot tell the
# architecture. VMCOREINFO has no version string, so stand in for it.
_UNKNOWN_UTS_VERSION = "unknown"


@dataclass(frozen=True)
class KdumpStats:
    pages_present: int  # pfns set in the 1st bitmap: every page given to write_pages
    pages_dumped: int  # pfns set in the 2nd bitmap = page descriptors written
    zero_pages_excluded: int  # all-zero pages left out of the 2nd bitmap (exclude_zero=True)
    pages_stored_raw: int  # pages stored uncompressed (compression did not make them smaller, or "none")
    data_bytes: int  # bytes of page data written, the shared zero page included
    file_bytes: int
    zero_pages_shared: int = 0  # all-zero pages pointing at the one stored zero page (exclude_zero=False)


@dataclass(frozen=True)
class KdumpLayout:
    """Where each part of a kdump file goes; all offsets are absolute."""

    block_size: int
    sub_header_blocks: int
    bitmap_bytes: int  # one bitmap, padded to whole blocks
    descriptor_capacity: int  # page_desc slots reserved before the page data

    @property
    def sub_header_offset(self) -> int:
        return self.block_size

    @property
    def bitmap_blocks(self) -> int:
        return 2 * self.bitmap_bytes // self.block_size

    @property
    def present_bitmap_offset(self) -> int:
        return (1 + self.sub_header_blocks) * self.block_size

    @property
    def dumped_bitmap_offset(self) -> int:
        return self.present_bitmap_offset + self.bitmap_bytes

    @property
    def descriptor_offset(self) -> int:
        return self.dumped_bitmap_offset + self.bitmap_bytes

    @property
    def data_offset(self) -> int:
        return self.descriptor_offset + DESCRIPTOR_BYTES * self.descriptor_capacity


def _bitmap_bytes(max_mapnr: int, block_size: int) -> int:
    # makedumpfile's len_bitmap / 2: each bitmap is rounded up to whole
    # blocks, and crash and libkdumpfile only see two bitmaps when
    # bitmap_blocks >= 2 * ceil(ceil(max_mapnr / 8) / block_size).
    return -(-(-(-max_mapnr // 8)) // block_size) * block_size


def plan_layout(block_size: int, max_mapnr: int, sub_header_bytes: int,
                descriptor_capacity: int) -> KdumpLayout:
    """The layout for a dump of max_mapnr pfns with up to descriptor_capacity dumped pages.

    sub_header_bytes is the kdump_sub_header plus the notes stored after it;
    makedumpfile computes sub_hdr_size the same way, so many-CPU machines
    push the bitmaps past the second block.
    """
    return KdumpLayout(block_size=block_size,
                       sub_header_blocks=max(1, -(-sub_header_bytes // block_size)),
                       bitmap_bytes=_bitmap_bytes(max_mapnr, block_size),
                       descriptor_capacity=descriptor_capacity)


def _pwrite_all(sink, data, offset: int, what: str) -> None:
    """Write data (bytes or an array) at offset of a positional sink (head.KdumpFile,
    flattened.FlattenedWriter), which raises OutputError itself."""
    if isinstance(data, np.ndarray):
        # memoryview.cast refuses non-native formats such as '<u4' or a
        # structured descriptor dtype; a byte view of the array does not.
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    else:
        view = memoryview(data).cast("B")
    sink.pwrite(view, offset, what)


def _merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint (start, end) ranges covering the given ones."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def _set_bits(bitmap: np.ndarray, pfns: np.ndarray) -> None:
    """Set LSB-first bits for strictly increasing pfns."""
    if len(pfns) == 0:
        return
    byte_index = pfns >> 3
    bits = np.left_shift(1, pfns & 7).astype(np.uint8)
    # Several pfns can share a byte; pfns are sorted, so OR each group once.
    group_starts = np.flatnonzero(np.r_[True, byte_index[1:] != byte_index[:-1]])
    bitmap[byte_index[group_starts]] |= np.bitwise_or.reduceat(bits, group_starts)


BITMAP_WINDOW_BYTES = 256 << 10  # 2 Mi pfns: the bitmaps are written in windows this size


def _set_bit_range(bitmap: np.ndarray, lo: int, hi: int) -> None:
    """Set LSB-first bits lo .. hi-1: whole bytes at once, the partial ones bit by bit."""
    if hi <= lo:
        return
    head_end = min(hi, -(-lo // 8) * 8)
    for bit in range(lo, head_end):
        bitmap[bit >> 3] |= 1 << (bit & 7)
    tail_start = max(head_end, hi - hi % 8)
    bitmap[head_end >> 3:tail_start >> 3] = 0xFF
    for bit in range(tail_start, hi):
        bitmap[bit >> 3] |= 1 << (bit & 7)


class _StreamedBitmap:
    """A bitmap written to the file as the pfns pass, in bounded memory.

    Pages come in increasing pfn order, so every byte below the current
    window is final: it is written out and the window moves on. A 512 GiB
    machine needs 16 MiB per bitmap, a 16 TiB one 512 MiB, and the capture
    kernel has ~200 MiB; the window is WINDOW_BYTES whatever the size.
    Bytes never touched stay holes in the new file, which read as zeros.
    """

    WINDOW_BYTES = BITMAP_WINDOW_BYTES

    def __init__(self, sink, file_offset: int, what: str):
        self._sink = sink
        self._file_offset = file_offset
        self._what = what
        self._window = np.zeros(self.WINDOW_BYTES, dtype=np.uint8)
        self._window_index = 0
        self._dirty = False
        # (start, end) file ranges written so far, in order, adjacent ones
        # merged: the META digest reads back only these (the rest is holes).
        self.written: list[tuple[int, int]] = []

    def set(self, pfns: np.ndarray) -> None:
        """Set the bits of strictly increasing pfns (not below any pfn set before)."""
        if not len(pfns):
            return
        first = int(pfns[0])
        if int(pfns[-1]) - first + 1 == len(pfns):  # increasing, so consecutive: whole bytes at once
            self.set_range(first, len(pfns))
            return
        window_pfns = self.WINDOW_BYTES * 8
        windows = pfns // window_pfns
        # pfns increase, so each window's pfns are one slice of them.
        cuts = (np.flatnonzero(np.diff(windows)) + 1).tolist()
        for lo, hi in zip([0] + cuts, cuts + [len(pfns)]):
            index = int(windows[lo])
            if index != self._window_index:
                self._flush()
                self._window[:] = 0
                self._window_index = index
            _set_bits(self._window, pfns[lo:hi] - index * window_pfns)
            self._dirty = True

    def set_range(self, first: int, count: int) -> None:
        """Set the bits of pfns first .. first+count-1 (same order rule as set), a window at a time."""
        window_pfns = self.WINDOW_BYTES * 8
        position, end = first, first + count
        while position < end:
            index = position // window_pfns
            if index != self._window_index:
                self._flush()
                self._window[:] = 0
                self._window_index = index
            base = index * window_pfns
            stop = min(end, base + window_pfns)
            _set_bit_range(self._window, position - base, stop - base)
            self._dirty = True
            position = stop

    def _flush(self) -> None:
        if self._dirty:
            self._write(self._window)

    def _write(self, window: np.ndarray) -> None:
        start = self._file_offset + self._window_index * self.WINDOW_BYTES
        _pwrite_all(self._sink, window, start, self._what)
        self._dirty = False
        end = start + len(window)
        if self.written and self.written[-1][1] == start:
            self.written[-1] = (self.written[-1][0], end)
        elif end > start:
            self.written.append((start, end))

    def close(self, bitmap_bytes: int) -> None:
        """Write the last window, cut to the bitmap's size."""
        if self._dirty:
            start = self._window_index * self.WINDOW_BYTES
            self._write(self._window[:max(0, bitmap_bytes - start)])


def _worker_count(threads: int) -> int:
    if threads < 0:
        raise ValueError(f"threads must be >= 0, not {threads}")
    return threads or usable_cpus()


class KdumpPageStore:
    """A kdump file's body, as batches of whole pages arrive in pfn order: page data
    appended, page descriptors in pfn order, both bitmaps; counted, and digested as
    the bytes go out (see vmcap.formats.digest).

    Each page is compressed on its own (pagecodecs). An all-zero page is
    never stored: left out of the 2nd bitmap (exclude_zero), or its
    descriptor points at one shared zero page, as makedumpfile stores them.
    KdumpWriter stages pages into batches and writes the head.
    """

    def __init__(self, sink, layout: KdumpLayout, *, page_size: int, byte_order: str, compress: str,
                 level: int | None, workers: int, exclude_zero: bool, size_limit: int | None):
        self._sink = sink
        self._layout = layout
        self._page_size = page_size
        self._compress = compress
        self._exclude_zero = exclude_zero
        self._descriptor_dtype = _descriptor_dtype(byte_order)

        self._present_bitmap = _StreamedBitmap(sink, layout.present_bitmap_offset, "1st bitmap")
        self._dumped_bitmap = _StreamedBitmap(sink, layout.dumped_bitmap_offset, "2nd bitmap")
        self._pages_compressor = page_compressor(compress, level, workers)

        self._descriptors_written = 0
        self._pages_present = 0
        self._zero_pages_excluded = 0
        self._zero_pages_shared = 0
        self._pages_stored_raw = 0
        self._data_end = layout.data_offset
        # Page data may not go past this file size (makedumpfile -L): OutputFull.
        self._size_limit = size_limit
        # The first pfn whose page may be missing from the file if writing
        # stops now: pages in a failed batch are not stored.
        self._stored_through = 0
        # Digests of the append-only regions, as their bytes go out (see vmcap.formats.digest).
        self._data_digest = StreamDigest()
        self._descriptor_digest = StreamDigest()
        self._zero_page_offset = -1
        if not exclude_zero:
            # Every zero page's descriptor points here (makedumpfile's pd_zero):
            # one stored copy, always at the start of the page data.
            self._zero_page_offset = self._data_end
            _pwrite_all(sink, bytes(page_size), self._zero_page_offset, "shared zero page")
            self._data_digest.update_zeros(page_size)
            self._data_end += page_size

    def store_batch(self, pfns: np.ndarray, pages: np.ndarray, *, present_marked: bool = False) -> None:
        """Write one batch's page data and descriptors, and mark its bitmap bits
        (the 1st bitmap's only if mark_staged has not)."""
        count = len(pfns)
        nonzero = pages.view(np.uint64).any(axis=1)
        stored = np.flatnonzero(nonzero)  # rows whose data is written; zero pages never are
        dumped_mask = nonzero if self._exclude_zero else np.ones(count, dtype=bool)
        dumped_count = int(dumped_mask.sum())
        if self._descriptors_written + dumped_count > self._layout.descriptor_capacity:
            raise ValueError(f"more than max_pages_present={self._layout.descriptor_capacity} pages "
                             f"dumped (at pfn {int(pfns[0]):#x})")

        page_data, sizes, flags = self._encode(pages, stored)
        descriptors = np.zeros(dumped_count, dtype=self._descriptor_dtype)
        if self._exclude_zero:
            rows: slice | np.ndarray = slice(None)  # every dumped page has its own data
        else:
            rows = stored
            descriptors["offset"] = self._zero_page_offset
            descriptors["size"] = self._page_size
        descriptors["offset"][rows] = self._data_end + np.cumsum(sizes) - sizes
        descriptors["size"][rows] = sizes
        descriptors["flags"][rows] = flags

        if self._size_limit is not None and self._data_end + int(sizes.sum()) > self._size_limit:
            raise OutputFull(f"size limit of {self._size_limit} bytes reached at pfn "
                             f"{int(pfns[0]):#x} (kdump page data at offset {self._data_end:#x})")
        if len(stored):
            _pwrite_all(self._sink, page_data, self._data_end, "page data")
            self._data_digest.update(np.ascontiguousarray(page_data) if isinstance(page_data, np.ndarray)
                                     else page_data)
            self._data_end += int(sizes.sum())
        if dumped_count:
            self._descriptor_digest.update(descriptors)
            _pwrite_all(self._sink, descriptors,
                        self._layout.descriptor_offset + DESCRIPTOR_BYTES * self._descriptors_written,
                        "page descriptors")
        self._descriptors_written += dumped_count

        if not present_marked:
            self._present_bitmap.set(pfns)
        self._dumped_bitmap.set(pfns[dumped_mask])
        zero_count = count - len(stored)
        self._pages_present += count
        self._pages_stored_raw += int((flags == 0).sum())
        if self._exclude_zero:
            self._zero_pages_excluded += zero_count
        else:
            self._zero_pages_shared += zero_count
        self._stored_through = max(self._stored_through, int(pfns[-1]) + 1)

    def mark_staged(self, pfn: int, count: int) -> None:
        """Pages staged for a later store_batch(present_marked=True): their 1st-bitmap
        bits now, so that mark_present's later pfns need not wait for the batch."""
        self._present_bitmap.set_range(pfn, count)

    def mark_present(self, pfn: int, count: int) -> None:
        """Pages present in memory, not dumped: the 1st bitmap only."""
        # A range, not an array of pfns: a zero-filled segment may span 2**30 pages.
        self._present_bitmap.set_range(pfn, count)
        self._pages_present += count
        self._stored_through = pfn + count

    @property
    def stored_through(self) -> int:
        """If writing stopped now, pages from this pfn on would be missing."""
        return self._stored_through

    @property
    def data_end(self) -> int:
        """Where the page data ends: the file's size."""
        return self._data_end

    def _encode(self, pages: np.ndarray, stored: np.ndarray):
        """(data bytes, per-page stored sizes, per-page flags) for the rows in `stored`."""
        return encode_pages(self._pages_compressor, COMPRESSION_FLAG[self._compress], pages, stored)

    def release(self) -> None:
        """Stop the compressor threads."""
        if self._pages_compressor is not None:
            self._pages_compressor.close()

    def close_bitmaps(self, incomplete_present) -> list[tuple[int, int]]:
        """Write the bitmaps' last windows; every file range a bitmap was written to
        (the rest are holes), merged."""
        layout = self._layout
        written = []
        if incomplete_present is not None:
            # The failed batch may have set no bits, or the staged pages'
            # neighbours some: the 1st bitmap is simply all RAM, rewritten.
            written += self._present_bitmap.written  # overwritten, but still read back
            present = _StreamedBitmap(self._sink, layout.present_bitmap_offset, "1st bitmap")
            for first, count in incomplete_present:
                for start in range(first, first + count, _StreamedBitmap.WINDOW_BYTES * 8):
                    stop = min(first + count, start + _StreamedBitmap.WINDOW_BYTES * 8)
                    present.set(np.arange(start, stop, dtype=np.int64))
            self._present_bitmap = present
        self._present_bitmap.close(layout.bitmap_bytes)
        self._dumped_bitmap.close(layout.bitmap_bytes)
        return _merged_ranges(written + self._present_bitmap.written + self._dumped_bitmap.written)

    def digest_values(self) -> dict[str, str]:
        """The digest lines known once the pages are written; META is hashed last."""
        unused = self._layout.descriptor_capacity - self._descriptors_written
        self._descriptor_digest.update_zeros(DESCRIPTOR_BYTES * unused)
        return {"META_XXH64": PLACEHOLDER, "DESC_XXH64": self._descriptor_digest.hexdigest(),
                "DATA_XXH64": self._data_digest.hexdigest(),
                "DATA_OFFSET": hex_value(self._layout.data_offset)}

    def stats(self) -> KdumpStats:
        return KdumpStats(
            pages_present=self._pages_present,
            pages_dumped=self._descriptors_written,
            zero_pages_excluded=self._zero_pages_excluded,
            pages_stored_raw=self._pages_stored_raw,
            data_bytes=self._data_end - self._layout.data_offset,
            file_bytes=self._data_end,
            zero_pages_shared=self._zero_pages_shared,
        )


class KdumpWriter:
    """Write a kdump-compressed file page by page, in pfn order, with bounded memory.

    The writer checks the order of the pages and stages small chunks into
    batches; KdumpPageStore stores them (data, descriptors, bitmaps) and
    KdumpHead writes the headers and notes at close().

    Memory: a 256 KiB window of each bitmap (see _StreamedBitmap) plus one batch
    of pages and its compressed form, whatever max_mapnr is.

    max_pages_present bounds how many pages write_pages will be given (the
    pfns the source's PT_LOADs cover); it sizes the page-descriptor table that
    precedes the page data, because descriptors are written as pages arrive
    and the data cannot move afterwards. Left as None it is max_mapnr: always
    enough, and the unused part of the table stays a hole in the file.

    sink is a file descriptor opened for writing, or a positional sink with
    pwrite, truncate and rewrite_head: head.KdumpFile (a file), or
    flattened.FlattenedWriter (which turns every write into a record of a
    stream). The header block goes last, through rewrite_head.

    threads: 0 means one per usable CPU, 1 compresses in the calling thread.
    exclude_zero=True (dump level bit 1) clears all-zero pages from the 2nd
    bitmap; otherwise they are dumped as descriptors pointing at one stored
    zero page, as makedumpfile stores them.
    """

    def __init__(self, sink, info: KdumpHeaderInfo, *, max_mapnr: int, compress: str = "zstd",
                 level: int | None = None, threads: int = 0, exclude_zero: bool = False,
                 max_pages_present: int | None = None, dump_level: int | None = None,
                 size_limit: int | None = None):
        if compress not in COMPRESSION_FLAG:
            raise ValueError(f"compress must be one of {sorted(COMPRESSION_FLAG)}, not {compress!r}")
        page_size = info.page_size
        if page_size < _MIN_BLOCK_SIZE or page_size > _MAX_BLOCK_SIZE or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two in "
                             f"[{_MIN_BLOCK_SIZE}, {_MAX_BLOCK_SIZE}]")
        if info.elf_class not in (32, 64):
            raise ValueError(f"elf_class must be 32 or 64, not {info.elf_class}")
        _check_byte_order(info.byte_order)
        if max_mapnr <= 0:
            raise ValueError(f"max_mapnr must be positive, not {max_mapnr}")
        if max_pages_present is None:
            max_pages_present = max_mapnr
        if not 0 <= max_pages_present <= max_mapnr:
            raise ValueError(f"max_pages_present {max_pages_present} is not in [0, max_mapnr={max_mapnr}]")

        self._sink = KdumpFile(sink) if isinstance(sink, int) else sink
        self._max_mapnr = max_mapnr
        self._page_size = page_size
        self._closed = False
        # The dump level recorded in the sub header: what the caller excluded
        # (zero pages here, kernel page classes upstream).
        self._head = KdumpHead(info, max_mapnr=max_mapnr, compress=compress,
                               dump_level=(dump_level if dump_level is not None
                                           else DUMP_LEVEL_EXCLUDE_ZERO if exclude_zero else 0))
        self._layout = plan_layout(page_size, max_mapnr, self._head.sub_header_bytes, max_pages_present)
        workers = _worker_count(threads)
        self._store = KdumpPageStore(self._sink, self._layout, page_size=page_size,
                                     byte_order=info.byte_order, compress=compress, level=level,
                                     workers=workers, exclude_zero=exclude_zero, size_limit=size_limit)

        self._batch_pages = max(1, BATCH_BYTES * workers // page_size)
        self._staged_pages = np.empty((self._batch_pages, page_size), dtype=np.uint8)
        self._staged_pfns = np.empty(self._batch_pages, dtype=np.int64)
        self._staged_count = 0
        self._next_pfn = 0

    @property
    def layout(self) -> KdumpLayout:
        return self._layout

    def __enter__(self) -> "KdumpWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()

    def write_pages(self, pfn: int, data) -> None:
        """Store pages pfn .. pfn+n-1 (data is n whole pages), all present in memory.

        Calls must come in increasing pfn order; skipped pfns are holes (not
        in the 1st bitmap). The data is compressed before this returns, so
        the caller may reuse or unmap its buffer.
        """
        if self._closed:
            raise ValueError("write_pages after close")
        pages = np.frombuffer(data, dtype=np.uint8)
        if len(pages) % self._page_size:
            raise ValueError(f"{len(pages)} bytes at pfn {pfn:#x} is not a whole number of "
                             f"{self._page_size}-byte pages")
        count = len(pages) // self._page_size
        if pfn < self._next_pfn:
            raise ValueError(f"pfn {pfn:#x} comes after pfn {self._next_pfn - 1:#x}: already written "
                             f"or out of order")
        if pfn + count > self._max_mapnr:
            raise ValueError(f"pages {pfn:#x}..{pfn + count - 1:#x} go past max_mapnr {self._max_mapnr:#x}")
        if count == 0:
            return
        pages = pages.reshape(count, self._page_size)
        self._next_pfn = pfn + count

        done = 0
        if self._staged_count:
            if count >= DIRECT_MIN_PAGES:
                self._flush_staged()  # a short batch costs less than copying this chunk
            else:
                while done < count:  # a batch may hold fewer pages than a chunk (big pages)
                    done += self._stage(pfn + done, pages[done:])
        # Chunks of DIRECT_MIN_PAGES or more go straight from the caller's
        # buffer, without a copy; each page is compressed on its own, so
        # where batches start does not change the output.
        while count - done >= DIRECT_MIN_PAGES:
            first = pfn + done
            take = min(count - done, self._batch_pages)
            self._store.store_batch(np.arange(first, first + take, dtype=np.int64), pages[done:done + take])
            done += take
        while done < count:
            done += self._stage(pfn + done, pages[done:])

    def mark_present(self, pfn: int, count: int) -> None:
        """Pages pfn .. pfn+count-1 exist but are not dumped (a dump level excluded them).

        They are set in the 1st bitmap only; readers report them as excluded.
        Same ordering rules as write_pages.
        """
        if self._closed:
            raise ValueError("mark_present after close")
        if pfn < self._next_pfn:
            raise ValueError(f"pfn {pfn:#x} comes after pfn {self._next_pfn - 1:#x}: already written "
                             f"or out of order")
        if pfn + count > self._max_mapnr:
            raise ValueError(f"pages {pfn:#x}..{pfn + count - 1:#x} go past max_mapnr {self._max_mapnr:#x}")
        if count <= 0:
            return
        # Staged pages set their 1st-bitmap bits when staged (_stage), so they
        # may wait for more: at -d 31 excluded runs alternate with short kept
        # ones, and storing the batch here made thousands of batches of a few pages.
        self._store.mark_present(pfn, count)
        self._next_pfn = pfn + count

    def _stage(self, pfn: int, pages: np.ndarray) -> int:
        take = min(len(pages), self._batch_pages - self._staged_count)
        start = self._staged_count
        self._staged_pages[start:start + take] = pages[:take]
        self._staged_pfns[start:start + take] = np.arange(pfn, pfn + take, dtype=np.int64)
        self._staged_count += take
        # Present now, in pfn order with mark_present's ranges (the bitmap is
        # streamed in pfn order); the 2nd bitmap's bits wait for the store.
        self._store.mark_staged(pfn, take)
        if self._staged_count == self._batch_pages:
            self._flush_staged()
        return take

    def _flush_staged(self) -> None:
        count = self._staged_count
        if count:
            self._staged_count = 0
            self._store.store_batch(self._staged_pfns[:count], self._staged_pages[:count], present_marked=True)

    @property
    def stored_through(self) -> int:
        """If writing stopped now, pages from this pfn on would be missing."""
        return int(self._staged_pfns[0]) if self._staged_count else self._store.stored_through

    def _release(self) -> None:
        self._store.release()
        self._closed = True

    def close(self, notes_with_digests=None, *, incomplete_present=None) -> KdumpStats:
        """Write the bitmaps and headers; the sink stays open (the caller owns it).

        ``notes_with_digests(values)``, if given, returns the notes to store
        (as long as the current ones) with the digest lines for ``values``
        (META_XXH64, DESC_XXH64, DATA_XXH64, DATA_OFFSET; see vmcap.formats.digest),
        all "unknown" when the sink cannot be read back (a flattened stream).

        ``incomplete_present`` closes a dump whose writing failed (disk full,
        EIO): (first pfn, count) runs of every RAM page, in increasing order.
        Pages from ``stored_through`` on are dropped (nothing more is
        written but metadata); the 2nd bitmap and the descriptors cover just
        the pages stored, the 1st bitmap all RAM, so readers see the rest as
        excluded, and the header carries DUMP_DH_COMPRESSED_INCOMPLETE.
        """
        if self._closed:
            raise ValueError("KdumpWriter closed twice")
        incomplete = incomplete_present is not None
        try:
            if incomplete:
                self._staged_count = 0
            else:
                self._flush_staged()
        finally:
            self._release()
        layout = self._layout
        store = self._store
        written = store.close_bitmaps(incomplete_present)

        values = {}
        # A stream cannot be read back for the META digest: its note says
        # "unknown" rather than record digests of a file that never existed here.
        digested = notes_with_digests is not None and hasattr(self._sink, "read_back_digest")
        if digested:
            values = store.digest_values()
        elif notes_with_digests is not None:
            values = dict.fromkeys(DIGEST_LINE_KEYS, UNKNOWN)
        if notes_with_digests is not None:
            self._head.replace_notes(notes_with_digests(values))
        self._head.write_sub_header(self._sink, layout)
        header_block = self._head.header_block(layout, incomplete=incomplete)

        if incomplete and not self._sink.can_shrink:
            # A stream cannot shrink: data of a batch whose descriptors
            # were never written may lie past the end, unreferenced.
            self._sink.truncate(max(store.data_end, self._sink.file_bytes))
        else:
            self._sink.truncate(store.data_end)  # drop whatever an old file had past our data
        if digested:
            # META covers the header block (still in memory) and the sub
            # header, notes and bitmaps: those are read back, but of the
            # bitmaps only the windows written (the rest are holes, hashed as
            # zeros), so a huge sparse address space costs no reads.
            meta = StreamDigest()
            meta.update(header_block)
            try:
                rest = self._sink.read_back_digest(
                    self._page_size, layout.descriptor_offset, meta,
                    [(self._page_size, layout.present_bitmap_offset), *written])
            except (OSError, EOFError) as e:
                raise OutputError(f"reading back kdump metadata: {getattr(e, 'strerror', None) or e}") from e
            values["META_XXH64"] = rest
            self._head.replace_notes(notes_with_digests(values))
            self._head.write_sub_header(self._sink, layout)
        # The header block goes last: until it is written, the file does not
        # claim to be a kdump.
        self._sink.rewrite_head(header_block)
        return store.stats()

class KdumpHead:
    """A kdump file's head: the disk_dump_header block, the sub header and the notes after it.

    KdumpWriter stores pages; this encodes what describes them, once they
    are written: the notes (the VMCAP note last, replaced with its digests),
    the sub header, and the header block, which goes last through the sink's
    rewrite_head (formats/head.py).
    """

    def __init__(self, info: KdumpHeaderInfo, *, max_mapnr: int, dump_level: int, compress: str):
        self._info = info
        self._max_mapnr = max_mapnr
        self._dump_level = dump_level
        self._compress = compress
        self._sub_header = _sub_header_layout(info.elf_class, info.machine, info.byte_order)
        self._stored_notes, self._vmcoreinfo_span = self._notes_to_store(info)

    @property
    def sub_header_bytes(self) -> int:
        """The sub header and the notes stored after it: what sub_hdr_size must hold."""
        return self._sub_header.size + len(self._stored_notes)

    @staticmethod
    def _notes_to_store(info: KdumpHeaderInfo) -> tuple[bytes, NoteSpan | None]:
        """The note bytes for the sub header, and where VMCOREINFO's text is in them.

        libkdumpfile (so drgn) reads VMCOREINFO only from the notes when
        header_version >= 4, crash from offset_vmcoreinfo; a VMCOREINFO given
        apart from the notes is appended to them as a note so both find it.
        """
        notes = bytes(info.notes)
        span = _find_vmcoreinfo_note(notes, info.byte_order)
        if span is None and info.vmcoreinfo:
            # As the kernel's crash_save_vmcoreinfo makes it: "VMCOREINFO", type 0.
            notes += build_note(b"VMCOREINFO", 0, bytes(info.vmcoreinfo), info.byte_order)
            span = _find_vmcoreinfo_note(notes, info.byte_order)
        return notes, span

    def replace_notes(self, notes: bytes) -> None:
        """Swap the stored notes for others of the same length before the head is written.

        vmcap's own note records read errors, known only once every page
        has been written; its size is fixed so the layout does not move.
        """
        stored, span = self._notes_to_store(replace(self._info, notes=notes))
        if len(stored) != len(self._stored_notes):
            raise ValueError(f"replacement notes are {len(stored)} bytes, "
                             f"not {len(self._stored_notes)}")
        self._stored_notes, self._vmcoreinfo_span = stored, span

    def _vmcoreinfo_text(self) -> bytes:
        if self._info.vmcoreinfo:
            return bytes(self._info.vmcoreinfo)
        span = self._vmcoreinfo_span
        if span is None:
            return b""
        return self._stored_notes[span.desc_offset:span.desc_offset + span.desc_size]



    def write_sub_header(self, sink, layout: KdumpLayout) -> None:
        """The sub header and the notes, at their offset."""
        info = self._info
        note_offset = layout.sub_header_offset + self._sub_header.size
        sub_header = {
            "phys_base": _vmcoreinfo_number(self._vmcoreinfo_text(), "phys_base") or 0,
            "dump_level": self._dump_level,
            "offset_note": note_offset if self._stored_notes else 0,
            "size_note": len(self._stored_notes),
            "max_mapnr_64": self._max_mapnr,
        }
        long_mask = (1 << info.elf_class) - 1
        sub_header["phys_base"] &= long_mask  # %ld in VMCOREINFO may print a huge base as negative
        if self._vmcoreinfo_span is not None:
            sub_header["offset_vmcoreinfo"] = note_offset + self._vmcoreinfo_span.desc_offset
            sub_header["size_vmcoreinfo"] = self._vmcoreinfo_span.desc_size
        _pwrite_all(sink, self._sub_header.pack(sub_header) + self._stored_notes,
                    layout.sub_header_offset, "sub header and notes")

    def header_block(self, layout: KdumpLayout, *, incomplete: bool) -> bytes:
        """The disk_dump_header, padded to one block."""
        info = self._info
        # timeval.tv_sec is a signed long of the dumped machine.
        crash_seconds = max(0, min(info.crash_time, (1 << (info.elf_class - 1)) - 1))
        header = _header_layout(info.elf_class, info.byte_order).pack({
            "signature": KDUMP_SIGNATURE,
            "header_version": HEADER_VERSION,
            "uts_sysname": b"Linux",
            "uts_release": info.release.encode("utf-8", errors="replace")[:64],
            "uts_version": (info.version or _UNKNOWN_UTS_VERSION).encode("utf-8", errors="replace")[:64],
            "uts_machine": info.machine.encode("ascii")[:64],
            "tv_sec": crash_seconds,
            "status": COMPRESSION_FLAG[self._compress]
                      | (DUMP_DH_COMPRESSED_INCOMPLETE if incomplete else 0),
            "block_size": layout.block_size,
            "sub_hdr_size": layout.sub_header_blocks,
            "bitmap_blocks": layout.bitmap_blocks,
            "max_mapnr": min(self._max_mapnr, 0xFFFFFFFF),  # obsolete 32-bit copy of max_mapnr_64
            "nr_cpus": info.nr_cpus,
        })
        return header.ljust(layout.block_size, b"\0")


# --------------------------------------------------------------------------
# Reader

@dataclass(frozen=True)
class KdumpHeader:
    """The main fields of a kdump file's two headers."""

    header_version: int
    machine: str
    release: str
    page_size: int  # block_size
    max_mapnr: int  # max_mapnr_64 when header_version >= 6
    nr_cpus: int
    compression: str  # "zstd", "zlib", "lzo", "snappy" or "none", from the status bits
    dump_level: int
    status: int
    phys_base: int
    crash_time: int
    elf_class: int
    byte_order: str
    sub_header_blocks: int
    bitmap_blocks: int


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _compression_name(status: int) -> str:
    for flag, name in _COMPRESSION_NAMES:
        if status & flag:
            return name
    return "none"


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_RANK_SECTION_PFNS = 4096  # crash's BITMAP_SECT_LEN: one cumulative count per 512 bitmap bytes
_DESCRIPTOR_CHUNK = 1024


def decode_disk_dump_header(first: bytes, name: str) -> tuple[dict, int, str]:
    """(disk_dump_header fields, ELF class, byte order) of a kdump file's first bytes."""
    if len(first) < _HEADER_BYTES_MIN:
        raise CorruptOutput(f"{name}: kdump header truncated at {len(first)} bytes")
    machine = _cstring(first[12 + 4 * 65:12 + 5 * 65])
    likely_class = 64 if machine.startswith(_64BIT_MACHINES) else 32
    classes = (likely_class, 96 - likely_class)
    # libkdumpfile guesses byte order and class by trying layouts until the
    # block size is sane; the machine name orders the guesses, because a
    # 32-bit header read as 64-bit puts max_mapnr where block_size is.
    for byte_order in ("little", "big"):
        for elf_class in classes:
            layout = _header_layout(elf_class, byte_order)
            if len(first) < layout.size:
                continue
            fields = layout.unpack(first)
            block_size = fields["block_size"]
            if (_MIN_BLOCK_SIZE <= block_size <= _MAX_BLOCK_SIZE and not block_size & (block_size - 1)
                    and 0 < fields["header_version"] < 1000):
                return fields, elf_class, byte_order
    raise CorruptOutput(f"{name}: kdump header has no sane block size / header version")


class KdumpBitmaps:
    """A kdump file's two bitmaps, and a rank index over the 2nd.

    Which pfns are present (1st bitmap) and dumped (2nd), and where a dumped
    pfn's descriptor is: the dumped pfns before it, counted as crash does,
    from one cumulative count per 4096 pfns. Bits past max_mapnr are ignored,
    and a file of a --split set keeps the dumped pfns of its own range.
    """

    def __init__(self, present: np.ndarray, dumped: np.ndarray, max_mapnr: int, name: str,
                 split_range: tuple[int, int] | None = None):
        self._max_mapnr = max_mapnr
        self.present = self._clip_bitmap(present)
        self.dumped = self._clip_bitmap(dumped)
        if split_range is not None:
            self._keep_dumped_within(*split_range)
        if (self.dumped & ~self.present).any():
            first_bad = int(np.flatnonzero(self.dumped & ~self.present)[0]) * 8
            raise CorruptOutput(f"{name}: pfn near {first_bad:#x} is dumped but not present "
                                f"(2nd bitmap not within 1st)")

        section_bytes = _RANK_SECTION_PFNS // 8
        padded = np.zeros(-(-len(self.dumped) // section_bytes) * section_bytes, dtype=np.uint8)
        padded[:len(self.dumped)] = self.dumped
        per_section = _POPCOUNT[padded].reshape(-1, section_bytes).sum(axis=1, dtype=np.int64)
        self._rank_before_section = np.concatenate(([0], np.cumsum(per_section)))
        self.pages_dumped = int(self._rank_before_section[-1])
        self.pages_present = int(_POPCOUNT[self.present].sum(dtype=np.int64))

    def _keep_dumped_within(self, start: int, end: int) -> None:
        """Clear the 2nd bitmap outside [start, end): those pages are in other files."""
        bits = self.dumped
        first_byte, last_byte = start >> 3, -(-end // 8)
        bits[:first_byte] = 0
        bits[last_byte:] = 0
        if start & 7 and first_byte < len(bits):
            bits[first_byte] &= (0xFF << (start & 7)) & 0xFF
        if end & 7 and last_byte - 1 < len(bits) and last_byte > 0:
            bits[last_byte - 1] &= (1 << (end & 7)) - 1

    def _clip_bitmap(self, bitmap: np.ndarray) -> np.ndarray:
        """Bits for pfns < max_mapnr only: padding bits beyond it are ignored."""
        clipped = np.array(bitmap[:-(-self._max_mapnr // 8)], dtype=np.uint8)
        if self._max_mapnr % 8 and len(clipped):
            clipped[-1] &= (1 << (self._max_mapnr % 8)) - 1
        return clipped

    @staticmethod
    def _bit(bitmap: np.ndarray, pfn: int) -> bool:
        byte = pfn >> 3
        return 0 <= byte < len(bitmap) and bool(bitmap[byte] >> (pfn & 7) & 1)

    def is_present(self, pfn: int) -> bool:
        return pfn >= 0 and self._bit(self.present, pfn)

    def is_dumped(self, pfn: int) -> bool:
        return pfn >= 0 and self._bit(self.dumped, pfn)

    def descriptor_index(self, pfn: int) -> int:
        """How many dumped pfns come before pfn (crash's pfn_to_pos)."""
        section = pfn // _RANK_SECTION_PFNS
        section_byte = section * (_RANK_SECTION_PFNS // 8)
        byte = pfn >> 3
        below = int(_POPCOUNT[self.dumped[section_byte:byte]].sum(dtype=np.int64))
        below += bin(int(self.dumped[byte]) & ((1 << (pfn & 7)) - 1)).count("1")
        return int(self._rank_before_section[section]) + below


class KdumpPageData:
    """A kdump file's page descriptors and page data: dumped pages, decoded.

    ``pread(offset, length, what)`` reads the file (CorruptOutput past its
    end); ``bitmaps`` (KdumpBitmaps) say which pfns are dumped and where
    their descriptors are. A few chunks of descriptors are cached.
    """

    def __init__(self, pread, name: str, page_size: int, byte_order: str, bitmaps: KdumpBitmaps,
                 descriptor_offset: int, file_bytes: int):
        self._pread = pread
        self._name = name
        self._page_size = page_size
        self._bitmaps = bitmaps
        self._descriptor_offset = descriptor_offset
        self._file_bytes = file_bytes
        self._pages_dumped = bitmaps.pages_dumped
        self._descriptor_dtype = _descriptor_dtype(byte_order)
        self._descriptor_cache: dict[int, np.ndarray] = {}
        self.decoder = PageDecoder(page_size)  # source/stream.py decodes the pages it reads itself

    def is_dumped(self, pfn: int) -> bool:
        return self._bitmaps.is_dumped(pfn)

    def _descriptor_index(self, pfn: int) -> int:
        return self._bitmaps.descriptor_index(pfn)

    def _descriptor(self, index: int) -> np.void:
        chunk = index // _DESCRIPTOR_CHUNK
        table = self._descriptor_cache.get(chunk)
        if table is None:
            first = chunk * _DESCRIPTOR_CHUNK
            count = min(_DESCRIPTOR_CHUNK, self._pages_dumped - first)
            raw = self._pread(self._descriptor_offset + DESCRIPTOR_BYTES * first, DESCRIPTOR_BYTES * count,
                              "page descriptors")
            table = np.frombuffer(raw, dtype=self._descriptor_dtype)
            if len(self._descriptor_cache) >= 8:
                self._descriptor_cache.pop(next(iter(self._descriptor_cache)))
            self._descriptor_cache[chunk] = table
        return table[index % _DESCRIPTOR_CHUNK]

    def read_page(self, pfn: int) -> bytes | None:
        """The page's contents, or None if the pfn is not dumped (hole or excluded)."""
        if not self.is_dumped(pfn):
            return None
        index = self._descriptor_index(pfn)
        descriptor = self._descriptor(index)
        offset, size, flags = int(descriptor["offset"]), int(descriptor["size"]), int(descriptor["flags"])
        where = f"{self._name}: pfn {pfn:#x} (descriptor {index} at offset " \
                f"{self._descriptor_offset + DESCRIPTOR_BYTES * index:#x})"
        page_size = self._page_size
        if offset == 0:
            # makedumpfile leaves offset 0 for pages lost to ENOSPC.
            raise CorruptOutput(f"{where}: page missing (incomplete dump)")
        if offset < self._descriptor_offset or size <= 0 or offset + size > self._file_bytes:
            raise CorruptOutput(f"{where}: bad page data range offset {offset:#x} size {size}")
        compression = flags & _PAGE_COMPRESSION_FLAGS
        if compression == 0 and size != page_size:
            raise CorruptOutput(f"{where}: raw page of {size} bytes, not {page_size}")
        if size > 2 * page_size:
            raise CorruptOutput(f"{where}: compressed page of {size} bytes")
        stored = self._pread(offset, size, "page data")
        try:
            return self.decoder.decode(compression, stored)
        except PageDataError as e:
            raise CorruptOutput(f"{where}: {e}") from e
        except Unsupported as e:
            raise Unsupported(f"{where}: {e}") from e

    def read_dumped_pages_into(self, first_pfn: int, out: memoryview) -> None:
        """Fill ``out`` (a whole number of pages) with the dumped pages from first_pfn on.

        Every pfn must be dumped (iter_dumped_runs gives such runs). One
        pread takes their descriptors and one (or a few) their stored bytes:
        makedumpfile, QEMU and vmcap store the pages of consecutive
        descriptors one after the other. Each page is then decoded on its
        own, as it was compressed.
        """
        page_size = self._page_size
        count = len(out) // page_size
        if count * page_size != len(out) or first_pfn < 0:
            raise ValueError(f"bad page range: pfn {first_pfn:#x}, {len(out)} bytes")
        if not count:
            return
        first_index = self._descriptor_index(first_pfn)
        last_pfn = first_pfn + count - 1
        if (not self.is_dumped(first_pfn) or not self.is_dumped(last_pfn)
                or self._descriptor_index(last_pfn) != first_index + count - 1):
            raise ValueError(f"pfns {first_pfn:#x}-{last_pfn:#x} are not all dumped")
        table_at = self._descriptor_offset + DESCRIPTOR_BYTES * first_index
        table = np.frombuffer(self._pread(table_at, DESCRIPTOR_BYTES * count, "page descriptors"),
                              dtype=self._descriptor_dtype)
        offsets = table["offset"].astype(np.int64)
        sizes = table["size"].astype(np.int64)
        flags = (table["flags"] & _PAGE_COMPRESSION_FLAGS).astype(np.int64)
        bad = ((offsets < self._descriptor_offset) | (sizes <= 0) | (sizes > 2 * page_size)
               | (offsets + sizes > self._file_bytes) | ((flags == 0) & (sizes != page_size)))
        if bad.any():
            # The page's own reader names what is wrong with it.
            i = int(np.flatnonzero(bad)[0])
            self.read_page(first_pfn + i)
            raise CorruptOutput(f"{self._name}: pfn {first_pfn + i:#x}: bad page data range "
                                f"offset {int(offsets[i]):#x} size {int(sizes[i])}")
        # Stored bytes are read in spans of consecutive pages: a descriptor
        # pointing back (a shared zero page) starts a new span.
        ends = offsets + sizes
        breaks = np.flatnonzero(offsets[1:] != ends[:-1]) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.concatenate((breaks, [count])).tolist()
        decode = self.decoder.decode
        for lo, hi in zip(starts, stops):
            span_at = int(offsets[lo])
            stored = self._pread(span_at, int(ends[hi - 1]) - span_at, "page data")
            if (flags[lo:hi] == 0).all():
                out[lo * page_size:hi * page_size] = stored
                continue
            rel = (offsets[lo:hi] - span_at).tolist()
            for i, (at, size, flag) in enumerate(zip(rel, sizes[lo:hi].tolist(),
                                                     flags[lo:hi].tolist()), start=lo):
                try:
                    out[i * page_size:(i + 1) * page_size] = decode(flag, stored[at:at + size])
                except (PageDataError, Unsupported) as e:
                    kind = CorruptOutput if isinstance(e, PageDataError) else Unsupported
                    raise kind(f"{self._name}: pfn {first_pfn + i:#x} (descriptor "
                               f"{first_index + i} at offset "
                               f"{table_at + DESCRIPTOR_BYTES * i:#x}): {e}") from e


class KdumpReader:
    """Random access to the pages of a kdump-compressed file.

    Keeps both bitmaps in memory and one count of dumped pages per 4096 pfns,
    which turns a pfn into its descriptor's index the way crash does.
    """

    def __init__(self, path_or_fd):
        """path_or_fd: a path, a file descriptor, or an object with pread(length, offset),
        `size` and `name` (a flattened.FlattenedFile); a flattened file given by
        path or fd is read through a FlattenedFile, in place."""
        self._flat = None
        if hasattr(path_or_fd, "pread"):
            self._fd = -1
            self._owns_fd = False
            self._name = path_or_fd.name
            self._flat = path_or_fd
        elif isinstance(path_or_fd, int):
            self._fd = path_or_fd
            self._owns_fd = False
            self._name = f"fd {path_or_fd}"
        else:
            self._name = os.fsdecode(path_or_fd)
            try:
                self._fd = open_source_fd(path_or_fd)
            except OSError as e:
                raise BadSource(f"{self._name}: cannot open: {e.strerror or e}") from e
            self._owns_fd = True
        try:
            if self._flat is None and is_flattened(os.pread(self._fd, FLATTENED_DETECT_BYTES, 0)):
                self._flat = FlattenedFile(self._fd, self._name)
            self._read_at = (self._flat.pread if self._flat is not None
                             else functools.partial(os.pread, self._fd))
            self._file_bytes = self._flat.size if self._flat is not None else os.fstat(self._fd).st_size
            self._open()
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------

    def _open(self) -> None:
        first = self._pread(0, 4096, "header", exact=False)  # both header layouts fit
        signature = first[:8]
        if signature == LEGACY_DISKDUMP_SIGNATURE:
            raise BadSource(f"{self._name}: a legacy DISKDUMP file, not kdump-compressed")
        if signature != KDUMP_SIGNATURE:
            raise BadSource(f"{self._name}: not a kdump-compressed file (no 'KDUMP   ' signature)")
        if len(first) < _HEADER_BYTES_MIN:
            raise CorruptOutput(f"{self._name}: kdump header truncated at {len(first)} bytes")

        header, elf_class, byte_order = self._decode_header(first)
        self._byte_order = byte_order
        block_size = header["block_size"]
        version = header["header_version"]
        machine = _cstring(header["uts_machine"])
        self._page_size = block_size

        sub: dict[str, object] = {}
        if version >= 1:
            sub_layout = _sub_header_layout(elf_class, machine, byte_order)
            raw = self._pread(block_size, sub_layout.size, "sub header")
            sub = sub_layout.unpack(raw)
        max_mapnr = header["max_mapnr"]
        self._header_max_mapnr = max_mapnr
        if version >= 6 and sub["max_mapnr_64"]:
            max_mapnr = int(sub["max_mapnr_64"])
        self._max_mapnr = max_mapnr

        self.header = KdumpHeader(
            header_version=version, machine=machine, release=_cstring(header["uts_release"]),
            page_size=block_size, max_mapnr=max_mapnr, nr_cpus=header["nr_cpus"],
            compression=_compression_name(header["status"]), dump_level=int(sub.get("dump_level", 0)),
            status=header["status"], phys_base=int(sub.get("phys_base", 0)), crash_time=header["tv_sec"],
            elf_class=elf_class, byte_order=byte_order, sub_header_blocks=header["sub_hdr_size"],
            bitmap_blocks=header["bitmap_blocks"])

        self.sub_header = sub
        self._sub_header_bytes = sub_layout.size if version >= 1 else 0
        self.notes = b""
        self.notes_offset = 0
        self.vmcoreinfo = b""
        if version >= 4 and sub.get("offset_note") and sub.get("size_note"):
            self.notes_offset = int(sub["offset_note"])
            self.notes = self._pread(int(sub["offset_note"]), int(sub["size_note"]), "notes")
        if version >= 3 and sub.get("offset_vmcoreinfo") and sub.get("size_vmcoreinfo"):
            self.vmcoreinfo = self._pread(int(sub["offset_vmcoreinfo"]), int(sub["size_vmcoreinfo"]),
                                          "vmcoreinfo")

        self._read_bitmaps(header["sub_hdr_size"], header["bitmap_blocks"])

    def _decode_header(self, first: bytes) -> tuple[dict, int, str]:
        return decode_disk_dump_header(first, self._name)

    def _read_bitmaps(self, sub_header_blocks: int, bitmap_blocks: int) -> None:
        bs = self._page_size
        if sub_header_blocks < 0 or bitmap_blocks <= 0:
            raise CorruptOutput(f"{self._name}: bad sub_hdr_size {sub_header_blocks} or bitmap_blocks "
                                f"{bitmap_blocks}")
        bitmap_offset = (1 + sub_header_blocks) * bs
        bitmap_total = bitmap_blocks * bs
        end = bitmap_offset + bitmap_total
        if end > self._file_bytes:
            raise CorruptOutput(f"{self._name}: bitmaps end at offset {end:#x}, past end of file "
                                f"({self._file_bytes:#x})")
        one_bitmap = _bitmap_bytes(self._max_mapnr, bs)
        needed = -(-self._max_mapnr // 8)
        raw = np.frombuffer(self._pread(bitmap_offset, bitmap_total, "bitmaps"), dtype=np.uint8)
        if bitmap_total >= 2 * one_bitmap:
            half = bitmap_total // 2
            present, dumped = raw[:half], raw[half:]
        elif bitmap_total >= needed:
            # crash's dump_is_partial() test: too small for two bitmaps means
            # one bitmap, used for both RAM and dumped.
            present = dumped = raw
        else:
            raise CorruptOutput(f"{self._name}: bitmap of {bitmap_total} bytes cannot hold "
                                f"max_mapnr {self._max_mapnr} pfns")
        self.split_range = self._split_range()
        self.bitmaps = KdumpBitmaps(present, dumped, self._max_mapnr, self._name, self.split_range)
        self._pages_dumped = self.bitmaps.pages_dumped

        self._descriptor_offset = end
        table_end = end + DESCRIPTOR_BYTES * self._pages_dumped
        if table_end > self._file_bytes:
            raise CorruptOutput(f"{self._name}: {self._pages_dumped} page descriptors end at offset "
                                f"{table_end:#x}, past end of file ({self._file_bytes:#x})")
        self._descriptor_dtype = _descriptor_dtype(self._byte_order)
        self.pages = KdumpPageData(self._pread, self._name, self._page_size, self._byte_order,
                                   self.bitmaps, end, self._file_bytes)

    def _split_range(self) -> tuple[int, int] | None:
        """[start, end) pfns of one file of a makedumpfile --split set, or None.

        Each file of a set has the whole 2nd bitmap but descriptors and
        pages only for its own pfns; crash counts a pfn's descriptor from
        start_pfn (diskdump.c pfn_to_pos).
        """
        sub = self.sub_header
        if not sub.get("split"):
            return None
        wide = self.header.header_version >= 6 and (sub.get("end_pfn_64") or sub.get("start_pfn_64"))
        start = int(sub["start_pfn_64" if wide else "start_pfn"])
        end = int(sub["end_pfn_64" if wide else "end_pfn"])
        if not 0 <= start <= end or end > self._max_mapnr:
            raise CorruptOutput(f"{self._name}: split dump range {start:#x}-{end:#x} is not "
                                f"within max_mapnr {self._max_mapnr:#x}")
        return start, end

    def _pread(self, offset: int, length: int, what: str, exact: bool = True) -> bytes:
        if offset < 0 or (exact and offset + length > self._file_bytes):
            raise CorruptOutput(f"{self._name}: {what} at offset {offset:#x} (+{length}) lies past end of "
                                f"file ({self._file_bytes:#x})")
        chunks = []
        done = 0
        while done < length:
            try:
                chunk = self._read_at(length - done, offset + done)
            except OSError as e:
                raise CorruptOutput(f"{self._name}: reading {what} at offset {offset + done:#x}: "
                                    f"{e.strerror or e}") from e
            if not chunk:
                if exact:
                    raise CorruptOutput(f"{self._name}: {what} at offset {offset + done:#x} "
                                        f"truncated")
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    # -- queries -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def max_mapnr(self) -> int:
        return self._max_mapnr

    @property
    def file_bytes(self) -> int:
        """Size of the kdump file (reassembled, for a flattened one)."""
        return self._file_bytes

    @property
    def descriptor_offset(self) -> int:
        """Where the page descriptor table starts: right after the bitmaps."""
        return self._descriptor_offset

    def check_structure(self, data_offset: int | None = None) -> None:
        """Check every header field and page descriptor against the rest (CorruptOutput).

        ``data_offset``: where the page data starts, when the file records
        it (vmcap's note); otherwise the end of the descriptor table.
        """
        name, header, sub = self._name, self.header, self.sub_header
        bs = self._page_size
        if header.header_version > HEADER_VERSION:
            raise CorruptOutput(f"{name}: kdump header_version {header.header_version} is unknown")
        known_status = (_PAGE_COMPRESSION_FLAGS | DUMP_DH_COMPRESSED_INCOMPLETE
                        | DUMP_DH_EXCLUDED_VMEMMAP)
        compression = header.status & _PAGE_COMPRESSION_FLAGS
        if header.status & ~known_status or compression & (compression - 1):
            raise CorruptOutput(f"{name}: kdump header status {header.status:#x} has unknown or "
                                "conflicting bits (offset 0x1d8 region)")
        if header.status & DUMP_DH_COMPRESSED_INCOMPLETE:
            raise CorruptOutput(f"{name}: the kdump header marks the dump incomplete")
        if header.nr_cpus <= 0:
            raise CorruptOutput(f"{name}: kdump header nr_cpus {header.nr_cpus} is not positive")
        expected_blocks = 2 * _bitmap_bytes(self._max_mapnr, bs) // bs
        if header.bitmap_blocks != expected_blocks:
            raise CorruptOutput(f"{name}: kdump header bitmap_blocks {header.bitmap_blocks} does "
                                f"not match max_mapnr {self._max_mapnr:#x} ({expected_blocks} "
                                "blocks)")
        if header.sub_header_blocks < 1:
            raise CorruptOutput(f"{name}: kdump header sub_hdr_size {header.sub_header_blocks}")
        sub_start, sub_end = bs + self._sub_header_bytes, (1 + header.sub_header_blocks) * bs
        if sub:
            if self._header_max_mapnr != min(self._max_mapnr, 0xFFFFFFFF):
                raise CorruptOutput(f"{name}: kdump header max_mapnr {self._header_max_mapnr:#x} "
                                    f"disagrees with the sub header's {self._max_mapnr:#x}")
            for field in ("note", "vmcoreinfo"):
                offset, size = int(sub.get(f"offset_{field}", 0)), int(sub.get(f"size_{field}", 0))
                if (offset or size) and not sub_start <= offset <= offset + size <= sub_end:
                    raise CorruptOutput(f"{name}: sub header offset_{field} {offset:#x} "
                                        f"(+{size}) is outside the sub header blocks "
                                        f"{sub_start:#x}-{sub_end:#x}")
        table_end = self._descriptor_offset + DESCRIPTOR_BYTES * self._pages_dumped
        data_start = table_end if data_offset is None else data_offset
        if not table_end <= data_start <= self._file_bytes:
            raise CorruptOutput(f"{name}: page data offset {data_start:#x} is not between the end "
                                f"of the descriptor table {table_end:#x} and the end of file")
        allowed = {0, compression}
        for first in range(0, self._pages_dumped, 1 << 16):
            count = min(1 << 16, self._pages_dumped - first)
            at = self._descriptor_offset + DESCRIPTOR_BYTES * first
            table = np.frombuffer(self._pread(at, DESCRIPTOR_BYTES * count, "page descriptors"),
                                  dtype=self._descriptor_dtype)
            offsets = table["offset"].astype(np.int64)
            sizes = table["size"].astype(np.int64)
            flags = table["flags"].astype(np.int64)
            bad = ((sizes <= 0) | (sizes > bs) | ((flags == 0) & (sizes != bs))
                   | ~np.isin(flags, list(allowed)) | (offsets < data_start)
                   | (offsets + sizes > self._file_bytes))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise CorruptOutput(
                    f"{name}: page descriptor {first + i} at offset "
                    f"{at + DESCRIPTOR_BYTES * i:#x} is bad: offset {int(offsets[i]):#x}, size "
                    f"{int(sizes[i])}, flags {int(flags[i]):#x} (page size {bs}, data "
                    f"{data_start:#x}-{self._file_bytes:#x})")

    @property
    def flattened(self) -> bool:
        """True when read in place from makedumpfile's flattened format."""
        return self._flat is not None

    def page_counts(self) -> tuple[int, int]:
        """(pages present in memory, pages dumped)."""
        return self.bitmaps.pages_present, self._pages_dumped

    def is_present(self, pfn: int) -> bool:
        return self.bitmaps.is_present(pfn)

    def is_dumped(self, pfn: int) -> bool:
        return self.bitmaps.is_dumped(pfn)

    def _descriptor_index(self, pfn: int) -> int:
        """How many dumped pfns come before pfn (crash's pfn_to_pos)."""
        return self.bitmaps.descriptor_index(pfn)

    def read_page(self, pfn: int) -> bytes | None:
        """The page's contents, or None if the pfn is not dumped (hole or excluded)."""
        return self.pages.read_page(pfn)

    def read_dumped_pages_into(self, first_pfn: int, out: memoryview) -> None:
        """Fill ``out`` (a whole number of pages) with the dumped pages from first_pfn on
        (every pfn dumped: iter_dumped_runs gives such runs); see KdumpPageData."""
        self.pages.read_dumped_pages_into(first_pfn, out)

    def pread_physical(self, paddr: int, length: int) -> bytes:
        """length bytes of physical memory at paddr; pages not dumped read as zeros."""
        if paddr < 0 or length < 0:
            raise ValueError(f"bad physical range {paddr:#x} (+{length})")
        page_size = self._page_size
        out = bytearray(length)
        done = 0
        while done < length:
            address = paddr + done
            pfn, in_page = divmod(address, page_size)
            take = min(page_size - in_page, length - done)
            page = self.read_page(pfn)
            if page is not None:
                out[done:done + take] = page[in_page:in_page + take]
            done += take
        return bytes(out)

    def iter_dumped_runs(self) -> Iterator[tuple[int, int]]:
        """(first pfn, count) for each run of consecutive dumped pfns, in order."""
        return _iter_runs(self.bitmaps.dumped)

    def iter_present_runs(self) -> Iterator[tuple[int, int]]:
        """(first pfn, count) for each run of consecutive present pfns, in order."""
        return _iter_runs(self.bitmaps.present)

    def close(self) -> None:
        if getattr(self, "_owns_fd", False) and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "KdumpReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _iter_runs(bitmap: np.ndarray, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, int]]:
    """Runs of set bits, unpacking the bitmap a chunk at a time to bound memory."""
    run_start = run_end = -1
    for base in range(0, len(bitmap), chunk_bytes):
        chunk = bitmap[base:base + chunk_bytes]
        first_pfn = base * 8
        # Chunks all clear or all set (holes, a huge zero fill) need no unpacking.
        if not chunk.any():
            continue
        if (chunk == 0xFF).all():
            if run_end == first_pfn:
                run_end += 8 * len(chunk)
                continue
            if run_end > run_start >= 0:
                yield run_start, run_end - run_start
            run_start, run_end = first_pfn, first_pfn + 8 * len(chunk)
            continue
        bits = np.unpackbits(chunk, bitorder="little").astype(np.int8)
        edges = np.diff(np.concatenate(([0], bits, [0])))
        for start, end in zip((np.flatnonzero(edges == 1) + first_pfn).tolist(),
                              (np.flatnonzero(edges == -1) + first_pfn).tolist()):
            if start == run_end:
                run_end = end  # the run continues across a chunk boundary
                continue
            if run_end > run_start >= 0:
                yield run_start, run_end - run_start
            run_start, run_end = start, end
    if run_end > run_start >= 0:
        yield run_start, run_end - run_start


def is_kdump(path_or_fd) -> bool:
    """True if the file starts with the kdump-compressed signature.

    A path is opened as every source is (open_source_fd): a FIFO or a
    character device is refused at once instead of blocking the caller.
    """
    try:
        if isinstance(path_or_fd, int):
            return os.pread(path_or_fd, len(KDUMP_SIGNATURE), 0) == KDUMP_SIGNATURE
        fd = open_source_fd(path_or_fd)
    except (OSError, BadSource):
        return False
    try:
        return os.pread(fd, len(KDUMP_SIGNATURE), 0) == KDUMP_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)
