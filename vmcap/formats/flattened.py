"""makedumpfile's flattened format (`makedumpfile -F`, undone by `makedumpfile -R`).

A kdump file is written with positional writes (headers last, bitmaps and
descriptors at their offsets, page data appended), which a pipe cannot take.
The flattened format turns each positional write into a record on a plain
byte stream (makedumpfile.h, makedumpfile.c write_buffer / rearrange_dumpdata;
every field big-endian, whatever the machine):

    0      struct makedumpfile_header { char signature[16] = "makedumpfile";
                                        int64 type = 1; int64 version = 1; }
           padded with zeros to 4096 bytes (MAX_SIZE_MDF_HEADER)
    4096   records: struct makedumpfile_data_header { int64 offset; int64 buf_size; }
           followed by buf_size bytes that belong at `offset` of the kdump file
    ...    the end record: offset = -1, buf_size = -1 (END_FLAG_FLAT_HEADER)

`makedumpfile -R` writes each record at its offset in stream order, so where
records overlap the later one wins, and bytes no record covers are holes
(zeros). It stops at the first record whose offset is negative or whose size
is not positive, and fails unless that record is the end record.

This module writes such a stream (FlattenedWriter, a sink for KdumpWriter),
reads a flattened file in place (FlattenedFile: pread over an index of its
records) and reassembles a stream into the kdump file (reassemble).
"""

from __future__ import annotations

import os
import struct
from array import array
from bisect import bisect_left, bisect_right

import numpy as np

from ..errors import BadSource, CorruptOutput, SourceIOError
from ..fileio.output import OutputFile

SIGNATURE = b"makedumpfile"
HEADER_BYTES = 4096  # MAX_SIZE_MDF_HEADER
TYPE_FLAT_HEADER = 1
VERSION_FLAT_HEADER = 1
END_FLAG = -1
_HEADER = struct.Struct(">16sqq")  # struct makedumpfile_header
_RECORD = struct.Struct(">qq")  # struct makedumpfile_data_header
RECORD_HEADER_BYTES = _RECORD.size
DETECT_BYTES = _HEADER.size

# How much of the stream is read at a time while scanning record headers:
# enough to take many small records in one read, little waste per large one.
_SCAN_WINDOW_BYTES = 64 << 10
# Buffer for copying record data when reassembling.
_COPY_BYTES = 1 << 20


def is_flattened(head: bytes) -> bool:
    """True if `head` (at least DETECT_BYTES of a file) starts a flattened stream.

    makedumpfile checks the signature with strcmp (so byte 12 is its NUL) and
    the type; it does not check the version.
    """
    if len(head) < DETECT_BYTES:
        return False
    signature, header_type, _ = _HEADER.unpack_from(head)
    return signature[:len(SIGNATURE) + 1] == SIGNATURE + b"\0" and header_type == TYPE_FLAT_HEADER


def stream_header() -> bytes:
    return _HEADER.pack(SIGNATURE, TYPE_FLAT_HEADER, VERSION_FLAT_HEADER).ljust(HEADER_BYTES, b"\0")


def _check_record(offset: int, size: int, where: str) -> None:
    if offset < 0 or size <= 0:
        # makedumpfile -R stops at such a record and fails: it is not data.
        raise CorruptOutput(f"{where}: bad flattened record (offset {offset}, size {size})")


# --------------------------------------------------------------------------
# Writer

class FlattenedWriter:
    """A positional sink (pwrite / truncate / rewrite_head) that emits flattened records on a stream.

    Every pwrite becomes one record, written through at once: memory does not
    grow with the dump, and records may come in any offset order. `out` needs
    only write() (an OutputFile, so standard output works).
    """

    can_shrink = False  # a record written stays in the stream

    def __init__(self, out):
        self._out = out
        self._end = 0  # the reassembled file's size so far
        self._closed = False
        out.write(stream_header())
        # Where the last whole record ends in the stream: a write that failed
        # part-way through a record is cut back to here (an incomplete dump).
        self.record_end = getattr(out, "position", 0)

    def pwrite(self, data, offset: int, what: str = "") -> None:
        """One record: ``data`` at ``offset`` of the kdump file (``what`` it is, unused)."""
        view = memoryview(data).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if not len(view):
            return  # a record of size 0 would end makedumpfile -R's reading
        self._out.write(_RECORD.pack(offset, len(view)))
        self._out.write(view)
        self._end = max(self._end, offset + len(view))
        self.record_end = getattr(self._out, "position", 0)

    def cut_to_whole_records(self) -> None:
        """After a failed write: drop a record written part-way (an incomplete dump)."""
        self._out.truncate(self.record_end)

    def rewrite_head(self, head) -> None:
        """The head (the kdump header block) at offset 0: the last record for it wins."""
        self.pwrite(head, 0)

    def truncate(self, size: int) -> None:
        """Make the reassembled file `size` bytes long; it can grow, not shrink."""
        if size > self._end:
            # The reassembled file ends where its last record ends: one zero
            # byte at the end gives the size, the rest stays a hole.
            self.pwrite(b"\0", size - 1)
        elif size < self._end:
            raise ValueError(f"a flattened stream cannot shrink its file from {self._end} to {size} "
                             f"bytes")

    @property
    def file_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        """Write the end record; the stream is then complete."""
        if not self._closed:
            self._out.write(_RECORD.pack(END_FLAG, END_FLAG))
            self._closed = True


# --------------------------------------------------------------------------
# Reader

def _resolve_overlaps(starts: np.ndarray, sizes: np.ndarray, positions: np.ndarray):
    """Disjoint (start, end, position) pieces where each byte comes from the last record covering it.

    Records are taken latest first; each contributes the parts no later record
    covered. Runs only when records overlap, which vmcap's writer never makes.
    """
    covered_starts: list[int] = []  # disjoint, sorted, merged intervals already taken
    covered_ends: list[int] = []
    pieces: list[tuple[int, int, int]] = []
    for start, size, position in zip(starts.tolist()[::-1], sizes.tolist()[::-1],
                                     positions.tolist()[::-1]):
        end = start + size
        # Covered intervals that touch [start, end).
        first = bisect_left(covered_ends, start)
        last = bisect_right(covered_starts, end)
        cursor = start
        for i in range(first, last):
            gap_end = min(covered_starts[i], end)
            if gap_end > cursor:
                pieces.append((cursor, gap_end, position + cursor - start))
            cursor = max(cursor, covered_ends[i])
        if cursor < end:
            pieces.append((cursor, end, position + cursor - start))
        merged_start = min(start, covered_starts[first]) if first < last else start
        merged_end = max(end, covered_ends[last - 1]) if first < last else end
        covered_starts[first:last] = [merged_start]
        covered_ends[first:last] = [merged_end]
    pieces.sort()
    table = np.array(pieces, dtype=np.int64).reshape(-1, 3)
    return table[:, 0], table[:, 1], table[:, 2]


class FlattenedFile:
    """Random access to the kdump file a flattened file describes, without reassembling it.

    Opening scans the record headers once (reading past the data) into three
    int64 arrays: where each piece of the kdump file starts and ends, and where
    its bytes are in the flattened file; later records override earlier ones.
    Memory: 24 bytes per record (makedumpfile writes one per buffer flush, a
    few per MiB of dump). pread has os.pread's arguments and short read at
    the end; holes read as zeros.
    """

    def __init__(self, fd: int, name: str):
        self.name = name
        self._fd = fd
        try:
            self._stream_bytes = os.fstat(fd).st_size
        except OSError as e:
            raise SourceIOError(f"{name}: {e.strerror or e}") from e
        head = self._read(0, HEADER_BYTES)
        if not is_flattened(head):
            raise BadSource(f"{name}: not a flattened makedumpfile stream (no 'makedumpfile' header)")
        if len(head) < HEADER_BYTES:
            raise CorruptOutput(f"{name}: flattened header truncated at {len(head)} bytes")
        starts, sizes, positions = self._scan()
        order = np.argsort(starts, kind="stable")
        starts, sizes, positions = starts[order], sizes[order], positions[order]
        ends = starts + sizes
        if len(starts) > 1 and (starts[1:] < np.maximum.accumulate(ends)[:-1]).any():
            # Overlaps: let stream order decide, as makedumpfile -R does.
            stream_order = np.argsort(positions, kind="stable")
            starts, ends, positions = _resolve_overlaps(starts[stream_order], sizes[stream_order],
                                                        positions[stream_order])
        self._starts, self._ends, self._positions = starts, ends, positions
        self.records = len(order)
        self.size = int(ends.max()) if len(ends) else 0

    def _read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise SourceIOError(f"{self.name}: reading at offset {offset:#x}: {e.strerror or e}",
                                offset=offset) from e

    def _scan(self):
        starts, sizes, positions = array("q"), array("q"), array("q")
        window = b""
        window_at = 0
        position = HEADER_BYTES
        while True:
            if position + RECORD_HEADER_BYTES > window_at + len(window):
                window_at = position
                window = self._read(position, _SCAN_WINDOW_BYTES)
            if position + RECORD_HEADER_BYTES > window_at + len(window):
                raise CorruptOutput(f"{self.name}: flattened stream ends at offset {position:#x} "
                                    f"without its end record (cut short?)")
            offset, size = _RECORD.unpack_from(window, position - window_at)
            if offset == END_FLAG and size == END_FLAG:
                break
            _check_record(offset, size, f"{self.name}: at offset {position:#x}")
            data_at = position + RECORD_HEADER_BYTES
            if data_at + size > self._stream_bytes:
                raise CorruptOutput(f"{self.name}: flattened record at offset {position:#x} "
                                    f"({size} bytes) goes past the end of the file")
            starts.append(offset)
            sizes.append(size)
            positions.append(data_at)
            position = data_at + size
        return (np.frombuffer(starts, dtype=np.int64), np.frombuffer(sizes, dtype=np.int64),
                np.frombuffer(positions, dtype=np.int64))

    def pread(self, length: int, offset: int) -> bytes:
        """Bytes [offset, offset+length) of the reassembled file (short at its end)."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset:#x} (+{length})")
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        end = offset + length
        i = int(np.searchsorted(self._ends, offset, side="right"))
        while i < len(self._starts) and length and self._starts[i] < end:
            piece_start, piece_end = int(self._starts[i]), int(self._ends[i])
            lo, hi = max(piece_start, offset), min(piece_end, end)
            source_at = int(self._positions[i]) + lo - piece_start
            data = self._read(source_at, hi - lo)
            if len(data) != hi - lo:
                raise CorruptOutput(f"{self.name}: record data at offset {source_at:#x} truncated")
            out[lo - offset:hi - offset] = data
            i += 1
        return bytes(out)


# --------------------------------------------------------------------------
# Reassembly

def _read_exact(stream, view: memoryview, name: str, what: str) -> int:
    """Fill view from stream; returns how many bytes came (less only at end of stream)."""
    done = 0
    while done < len(view):
        try:
            n = stream.readinto(view[done:])
        except OSError as e:
            raise SourceIOError(f"{name}: reading {what}: {e.strerror or e}") from e
        if not n:
            break
        done += n
    return done


def reassemble(stream, out_path: str, *, force: bool = False, name: str = "standard input") -> int:
    """Write the kdump file a flattened stream describes (what `makedumpfile -R OUT < stream` does).

    stream is read once, sequentially (a pipe is fine), through a 1 MiB
    buffer; out_path is written atomically with mode 0600 (vmcap.fileio.output).
    Returns the size of the file written.
    """
    if out_path == "-":
        from ..errors import OutputError

        raise OutputError("reassembling a flattened stream needs an output file, not standard output")
    head = bytearray(HEADER_BYTES)
    got = _read_exact(stream, memoryview(head), name, "flattened header")
    if not is_flattened(bytes(head[:got])):
        raise BadSource(f"{name}: not a flattened makedumpfile stream (no 'makedumpfile' header)")
    if got < HEADER_BYTES:
        raise CorruptOutput(f"{name}: flattened header truncated at {got} bytes")
    out = OutputFile(out_path, force=force, mode=0o600)
    try:
        buffer = memoryview(bytearray(_COPY_BYTES))
        record = bytearray(RECORD_HEADER_BYTES)
        position = HEADER_BYTES
        file_end = 0
        while True:
            got = _read_exact(stream, memoryview(record), name, "a flattened record header")
            if got < RECORD_HEADER_BYTES:
                raise CorruptOutput(f"{name}: flattened stream ends at offset {position + got:#x} "
                                    f"without its end record (cut short?)")
            offset, size = _RECORD.unpack(record)
            if offset == END_FLAG and size == END_FLAG:
                break
            _check_record(offset, size, f"{name}: at offset {position:#x}")
            position += RECORD_HEADER_BYTES
            done = 0
            while done < size:
                want = min(size - done, len(buffer))
                got = _read_exact(stream, buffer[:want], name, "flattened record data")
                if got < want:
                    raise CorruptOutput(f"{name}: flattened stream ends at offset {position + got:#x} "
                                        f"inside a record")
                out.pwrite(buffer[:want], offset + done)
                done += want
                position += want
            file_end = max(file_end, offset + size)
        out.position = file_end
        out.commit()
    except BaseException:
        out.abort()
        raise
    return file_end
