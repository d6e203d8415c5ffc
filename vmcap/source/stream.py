"""A flattened kdump stream wrapped in gzip, xz, lz4 or zstd, read once, in order.

Debian's kdump-tools can leave makedumpfile's flattened stream compressed
as a whole (dump.<stamp>.gz and the like). Such a file has no random
access: ``StreamKdumpMemory`` decompresses it in one sequential pass and
serves the pages of the kdump file it describes in ascending pfn order,
which is the order in which `vmcap save` copies them through the ELF view
(elfview.ElfCoreView). Nothing is written besides the output.

This works for streams written the way makedumpfile (-F) and QEMU
(dump-guest-memory kdump-*) write them: the kdump header first, the
bitmaps before any page descriptor, then descriptors and page data, each
in ascending offset order, the data of a shared zero page at the start of
the page data. A stream that does otherwise (vmcap's own kdump-flat writes
its headers last; makedumpfile's cyclic mode interleaves bitmaps with
pages) is refused with a message that says how to read it instead. Memory:
the bitmaps (as for any kdump file) and the records read ahead of the page
being copied (bounded by MAX_READ_AHEAD_BYTES).
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib

import numpy as np

from ..errors import BadSource, CorruptOutput, SourceIOError, Unsupported
from ..formats.flattened import END_FLAG, HEADER_BYTES, RECORD_HEADER_BYTES, is_flattened
from ..formats.kdump import DESCRIPTOR_BYTES, KDUMP_SIGNATURE, KdumpReader, decode_disk_dump_header
from ..formats.pagecodecs import PAGE_COMPRESSION_FLAGS
from ..kernel.arch import make_platform
from .elfview import ElfCoreView, ElfIdentity, view_notes

WRAPPERS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
# Records read ahead of the page being copied, at most; makedumpfile and
# QEMU flush descriptors and page data a few MiB apart.
MAX_READ_AHEAD_BYTES = 256 << 20
# Headers and bitmaps: two 1 GiB bitmaps cover 2**33 pfns (kdumpsave.MAX_KDUMP_PFNS).
MAX_METADATA_BYTES = (2 << 30) + (16 << 20)
# makedumpfile and QEMU write records of at most a few MiB.
MAX_RECORD_BYTES = 64 << 20
_RECORD = struct.Struct(">qq")
_SHARED_PAGES = 2  # pages of the data start kept for descriptors pointing back to them


def wrapper_of(head: bytes) -> str | None:
    """The compressor whose magic ``head`` starts with, or None."""
    return next((name for magic, name in WRAPPERS if head.startswith(magic)), None)


def open_decompressed(path: str, wrapper: str):
    """A binary reader of the decompressed bytes (read(n) until b"")."""
    raw = open(path, "rb")
    try:
        if wrapper == "gzip":
            return gzip.GzipFile(fileobj=raw, mode="rb")
        if wrapper == "xz":
            return lzma.LZMAFile(raw, "rb")
        if wrapper == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                              closefd=True)
        if wrapper == "lz4":
            try:
                import lz4.frame
            except ImportError:
                raise Unsupported(f"{path}: lz4-compressed; reading it needs the lz4 Python "
                                  "package (pip install lz4), or `lz4 -d` it first") from None
            return lz4.frame.LZ4FrameFile(raw, "rb")
    except BaseException:
        raw.close()
        raise
    raise ValueError(f"unknown wrapper {wrapper!r}")


_DECOMPRESS_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


class _RecordStream:
    """The records of a flattened stream, read in order from a decompressing reader."""

    def __init__(self, reader, name: str, wrapper: str):
        self._reader = reader
        self.name = name
        self.position = 0  # in the decompressed stream
        head = self._read_upto(HEADER_BYTES)
        if head.startswith(b"\x7fELF"):
            raise BadSource(f"{name}: " + (
                "zstd-compressed without a seek table (a zelf file cut short loses it; "
                "`zstd -d` restores whatever frames are whole)" if wrapper == "zstd" else
                f"an ELF core compressed whole with {wrapper}: decompress it first"))
        if not is_flattened(head):
            raise BadSource(f"{name}: the {wrapper}-compressed data is not a flattened kdump "
                            "stream (makedumpfile -F); decompress it and give vmcap the file")
        if len(head) < HEADER_BYTES:
            raise CorruptOutput(f"{name}: flattened header truncated at {len(head)} bytes")

    def _read_upto(self, length: int) -> bytes:
        """Up to length bytes: fewer only at the end of the stream."""
        parts, got = [], 0
        while got < length:
            try:
                part = self._reader.read(length - got)
            except _DECOMPRESS_ERRORS as e:
                if isinstance(e, OSError) and not isinstance(e, (gzip.BadGzipFile, EOFError)) \
                        and e.errno is not None:
                    raise SourceIOError(f"{self.name}: {e.strerror or e}") from e
                raise CorruptOutput(f"{self.name}: compressed data damaged near decompressed "
                                    f"offset {self.position + got:#x}: {e}") from None
            except Exception as e:  # zstandard.ZstdError and lz4's RuntimeError
                raise CorruptOutput(f"{self.name}: compressed data damaged near decompressed "
                                    f"offset {self.position + got:#x}: {e}") from None
            if not part:
                break
            parts.append(part)
            got += len(part)
        self.position += got
        return b"".join(parts)

    def read_exact(self, length: int, what: str) -> bytes:
        data = self._read_upto(length)
        if len(data) < length:
            raise CorruptOutput(f"{self.name}: the stream ends at decompressed offset "
                                f"{self.position:#x}, inside {what} (cut short?)")
        return data

    def next_record(self) -> tuple[int, int] | None:
        """(offset, size) of the next record, or None at the end record."""
        offset, size = _RECORD.unpack(self.read_exact(RECORD_HEADER_BYTES, "a record header"))
        if offset == END_FLAG and size == END_FLAG:
            return None
        if offset < 0 or size <= 0 or size > MAX_RECORD_BYTES:
            raise CorruptOutput(f"{self.name}: bad flattened record at decompressed offset "
                                f"{self.position - RECORD_HEADER_BYTES:#x} (offset {offset}, "
                                f"size {size})")
        return offset, size

    def close(self) -> None:
        self._reader.close()


class _MetadataFile:
    """The kdump file's head (headers, notes, bitmaps) as KdumpReader's file object."""

    def __init__(self, name: str, head: bytearray):
        self.name = name
        self._head = head
        # The rest of the file is still in the stream: sizes are checked
        # there, as pages are read.
        self.size = 1 << 62

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self._head[offset:offset + length])


class StreamKdumpMemory:
    """The pages of a wrapped flattened stream, in ascending pfn order (elfview.PhysicalMemory)."""

    sequential = True

    def __init__(self, path: str, wrapper: str):
        self.name = str(path)
        self._records = _RecordStream(open_decompressed(path, wrapper), self.name, wrapper)
        try:
            self._open()
        except BaseException:
            self._records.close()
            raise

    def _refuse(self, why: str):
        raise Unsupported(f"{self.name}: {why}; a compressed flattened stream is read once, in "
                          "order: decompress it and run `makedumpfile -R` (or `vmcap makedumpfile "
                          "-R`) on it, then give vmcap the kdump file")

    def _open(self) -> None:
        first = self._records.next_record()
        if first is None or first[0] != 0:
            self._refuse("its kdump header is not its first record (vmcap's kdump-flat writes "
                         "it last)")
        first_bytes = self._records.read_exact(first[1], "the kdump header")
        if not first_bytes.startswith(KDUMP_SIGNATURE):
            raise BadSource(f"{self.name}: the flattened stream holds no kdump file (no "
                            "'KDUMP   ' signature at offset 0)")
        fields, _, _ = decode_disk_dump_header(first_bytes, self.name)
        if fields["sub_hdr_size"] < 0 or fields["bitmap_blocks"] <= 0:
            raise CorruptOutput(f"{self.name}: bad sub_hdr_size {fields['sub_hdr_size']} or "
                                f"bitmap_blocks {fields['bitmap_blocks']}")
        # Header, sub header, notes and bitmaps, up to the page descriptors:
        # every record until the first one past them goes here.
        limit = (1 + fields["sub_hdr_size"] + fields["bitmap_blocks"]) * fields["block_size"]
        if limit > MAX_METADATA_BYTES:
            raise CorruptOutput(f"{self.name}: the kdump header puts the page descriptors at "
                                f"offset {limit:#x}, past the {MAX_METADATA_BYTES >> 30} GiB "
                                "of bitmaps vmcap reads")
        head = bytearray(limit)
        # The part of a record past the bitmaps is routed once the index is known.
        self._pending: tuple[int, bytes] | None = None
        offset, data = 0, first_bytes
        while True:
            head[offset:min(offset + len(data), limit)] = data[:max(0, limit - offset)]
            if offset + len(data) > limit:
                self._pending = (max(offset, limit), data[max(0, limit - offset):])
                break
            record = self._records.next_record()
            if record is None:
                raise CorruptOutput(f"{self.name}: the stream ends before any page")
            offset, size = record
            data = self._records.read_exact(size, "kdump metadata")
        probe = KdumpReader(_MetadataFile(self.name, head))
        self.reader = probe
        self.header = probe.header
        self.granule = probe.page_size
        self._descriptors_at = probe.descriptor_offset
        present, dumped = probe.page_counts()
        self._data_from = self._descriptors_at + DESCRIPTOR_BYTES * dumped
        self._descriptors = bytearray()  # descriptor bytes from _descriptors_base on
        self._descriptors_base = self._descriptors_at
        self._data = bytearray()  # page data bytes from _data_base on
        self._data_base = None
        self._shared = b""  # the first pages of the page data (makedumpfile's zero page)
        self._shared_at = self._data_from
        self._ended = False

    def present_runs(self):
        return list(self.reader.iter_present_runs())

    def dumped_runs(self):
        return list(self.reader.iter_dumped_runs())

    def _take_record(self) -> None:
        if self._ended:
            raise CorruptOutput(f"{self.name}: the stream ends before the pages it indexes")
        if self._pending is not None:
            (offset, data), self._pending = self._pending, None
        else:
            record = self._records.next_record()
            if record is None:
                self._ended = True
                return
            offset, size = record
            data = self._records.read_exact(size, "a record")
        if offset < self._descriptors_at:
            self._refuse("it writes bitmaps or headers after pages (makedumpfile's cyclic "
                         "mode)")
        size = len(data)
        if offset < self._data_from:
            # A record may hold the end of the descriptors and the start of the data.
            split = min(size, self._data_from - offset)
            self._append(offset, data[:split], self._descriptors_base, self._descriptors,
                         "descriptor")
            if split == size:
                return
            offset, data = offset + split, data[split:]
        size = len(data)
        if self._data_base is None:
            self._data_base = self._shared_at = offset
            self._shared = bytes(data[:_SHARED_PAGES * self.granule])
        self._append(offset, data, self._data_base, self._data, "page data")

    def _append(self, offset: int, data: bytes, base: int, buffer: bytearray, what: str) -> None:
        end = base + len(buffer)
        if offset < end:
            self._refuse(f"it writes {what} at offset {offset:#x} again or out of order")
        if len(self._descriptors) + len(self._data) + offset - end + len(data) > \
                MAX_READ_AHEAD_BYTES:
            self._refuse(f"its page descriptors and page data are more than "
                         f"{MAX_READ_AHEAD_BYTES >> 20} MiB apart (or a record at offset "
                         f"{offset:#x} is damaged)")
        if offset > end:
            buffer.extend(bytes(offset - end))  # a hole: zeros, as in the reassembled file
        buffer.extend(data)

    def _descriptor_bytes(self, first_index: int, count: int) -> bytes:
        start = self._descriptors_at + DESCRIPTOR_BYTES * first_index
        end = start + DESCRIPTOR_BYTES * count
        if start < self._descriptors_base:
            raise ValueError("pages must be read in ascending order")
        # Descriptors before the first one asked for are not needed again.
        del self._descriptors[:start - self._descriptors_base]
        self._descriptors_base = start
        while self._descriptors_base + len(self._descriptors) < end:
            self._take_record()
        return bytes(self._descriptors[:end - start])

    def _stored(self, offset: int, size: int) -> bytes:
        while self._data_base is None or self._data_base + len(self._data) < offset + size:
            self._take_record()
        if offset >= self._data_base:
            return bytes(self._data[offset - self._data_base:offset - self._data_base + size])
        shared_at = offset - self._shared_at
        if 0 <= shared_at and shared_at + size <= len(self._shared):
            return self._shared[shared_at:shared_at + size]
        self._refuse(f"a page descriptor points back to page data at offset {offset:#x}")

    def read_dumped_into(self, first: int, out: memoryview) -> None:
        reader, granule = self.reader, self.granule
        count = len(out) // granule
        first_index = reader._descriptor_index(first)
        table = np.frombuffer(self._descriptor_bytes(first_index, count),
                              dtype=reader._descriptor_dtype)
        decode = reader.pages.decoder.decode
        for i, (offset, size, flags) in enumerate(zip(table["offset"].tolist(),
                                                      table["size"].tolist(),
                                                      table["flags"].tolist())):
            where = f"{self.name}: pfn {first + i:#x} (descriptor {first_index + i})"
            if offset < self._data_from or size <= 0 or size > 2 * granule:
                raise CorruptOutput(f"{where}: bad page data range offset {offset:#x} size {size}")
            stored = self._stored(offset, size)
            # Page data before the lowest offset still needed is done with.
            self._trim_data(offset)
            try:
                out[i * granule:(i + 1) * granule] = decode(flags & PAGE_COMPRESSION_FLAGS, stored)
            except ValueError as e:
                raise CorruptOutput(f"{where}: {e}") from None

    def _trim_data(self, offset: int) -> None:
        if self._data_base is not None and offset > self._data_base:
            del self._data[:offset - self._data_base]
            self._data_base = offset

    def close(self) -> None:
        self._records.close()


def open_stream_view(path: str, wrapper: str) -> tuple[ElfCoreView, int]:
    """(the ELF view of a wrapped flattened stream, read once in order; its dump level)."""
    memory = StreamKdumpMemory(path, wrapper)
    try:
        header, reader = memory.header, memory.reader
        platform = make_platform(elf_class=header.elf_class, byte_order=header.byte_order,
                                 utsname=header.machine)
        identity = ElfIdentity(elf_class=header.elf_class, byte_order=header.byte_order,
                               e_machine=platform.e_machine, source_name=str(path))
        view = ElfCoreView(memory, identity,
                           view_notes(reader.notes, reader.vmcoreinfo.rstrip(b"\0"),
                                      header.byte_order), closer=memory.close)
    except BaseException:
        memory.close()
        raise
    return view, header.dump_level
