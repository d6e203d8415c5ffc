"""The zstd seekable format: independent zstd frames followed by a seek table.

Layout (facebook/zstd contrib/seekable_format/zstd_seekable_compression_format.md):

    zstd frame 0 | zstd frame 1 | ... | seek table (a zstd skippable frame)

    seek table = u32 skippable magic 0x184D2A5E, u32 Frame_Size,
                 Number_Of_Frames entries {u32 compressed_size, u32 decompressed_size[, u32 checksum]},
                 footer {u32 Number_Of_Frames, u8 Seek_Table_Descriptor, u32 magic 0x8F92EAB1}

All fields are little-endian. Plain `zstd -d` skips the skippable frame, so a
seekable file decompresses like any other .zst file, while vmcap can seek to
a physical address by decompressing only the frame that holds it.

vmcap sets the Checksum_Flag: each seek table entry carries the low 32 bits
of the XXH64 of its frame's decompressed bytes. Every frame vmcap writes
also carries zstd's content checksum (the raw header frame too), which is
that same value, so the entry is copied from the frame's last 4 bytes rather
than hashed again. `zstd -d` and SeekableReader check the frame checksums;
``iter_frames`` (verify) checks the entries too. Files without checksums
(older vmcap) are still read.
"""

from __future__ import annotations

import bisect
import collections
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import xxhash
import zstandard

from ..cpus import usable_cpus
from ..errors import CorruptOutput, OutputError
from ..fileio.mmapio import open_source_fd

__all__ = [
    "DEFAULT_FRAME_BYTES",
    "STREAMED_FRAME_BYTES",
    "FrameEntry",
    "SeekableReader",
    "SeekableStats",
    "SeekableWriter",
    "is_seekable_zstd",
]

DEFAULT_FRAME_BYTES = 8 << 20
# On one thread frames are compressed as a stream (no frame buffers), so a
# bigger frame costs no memory and compresses better: independent frames
# restart zstd's window, and at 16 MiB that costs about nothing against
# `zstd -3` of the whole file (8 MiB frames: +1.1% on bench_spec's source).
STREAMED_FRAME_BYTES = 16 << 20
# Zeros are fed to compressors from this much, never from a frame-sized buffer.
_ZERO_CHUNK = bytes(1 << 20)
# Frames waiting to be compressed or written, in bytes: the capture kernel
# has ~200 MiB, and "all cores" on a big machine must not multiply that.
MAX_IN_FLIGHT_BYTES = 64 << 20

ZSTD_FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1

# Limits from the reference implementation (contrib/seekable_format/zstd_seekable.h).
# The frame size limit keeps every compressed size within its u32 field.
MAX_FRAMES = 0x8000000
MAX_FRAME_DECOMPRESSED_BYTES = 0x40000000

# The seek table layout, described once.
SKIPPABLE_HEADER = struct.Struct("<II")  # magic, Frame_Size
SEEK_TABLE_FOOTER = struct.Struct("<IBI")  # Number_Of_Frames, Seek_Table_Descriptor, magic
SEEK_ENTRY = struct.Struct("<II")  # compressed_size, decompressed_size
SEEK_ENTRY_WITH_CHECKSUM = struct.Struct("<III")  # ... plus low 32 bits of XXH64
FRAME_MAGIC = struct.Struct("<I")

# zstandard.frame_content_size() returns this (not CONTENTSIZE_UNKNOWN) when a
# frame header leaves out the content size, as streaming writers do.
UNKNOWN_CONTENT_SIZE = -1

CHECKSUM_FLAG = 0x80
RESERVED_DESCRIPTOR_BITS = 0x7C
SMALLEST_SEEK_TABLE_BYTES = SKIPPABLE_HEADER.size + SEEK_TABLE_FOOTER.size

# Skippable frames may use any magic in 0x184D2A50..0x184D2A5F.
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0

# How many decompressed frames SeekableReader keeps: the frame being read
# sequentially plus one neighbour, for reads that straddle a frame boundary.
CACHED_FRAMES = 2


@dataclass(frozen=True)
class SeekableStats:
    """What a SeekableWriter produced.

    compressed_bytes counts everything written to the sink, seek table
    included, so it equals the size of the output file.
    """

    frames: int
    uncompressed_bytes: int
    compressed_bytes: int


@dataclass(frozen=True)
class FrameEntry:
    """One zstd frame of a seekable file: where it is and what it decompresses to."""

    index: int
    compressed_offset: int
    compressed_size: int
    decompressed_offset: int
    decompressed_size: int
    checksum: int | None = None  # low 32 bits of XXH64 of the decompressed bytes, if the table has it


# ---------------------------------------------------------------------------
# Writing


RAW_BLOCK_BYTES = 128 << 10  # the largest block zstd allows


def seek_table_bound(frames: int) -> int:
    """Most bytes the seek table of ``frames`` frames takes (with checksums)."""
    return SMALLEST_SEEK_TABLE_BYTES + SEEK_ENTRY_WITH_CHECKSUM.size * frames


def raw_frame(data) -> bytes:
    """A zstd frame that stores ``data`` uncompressed, in raw blocks.

    Its size depends only on len(data), so a writer can later replace it in
    place with another frame of the same content length (vmcap rewrites the
    ELF notes this way once the copy's read errors are known). The frame
    declares its content size and, being single-segment, needs no window
    descriptor; it ends with a content checksum (low 32 bits of XXH64), so a
    flipped header byte fails `zstd -d` and verify like any other frame.
    """
    view = memoryview(data).cast("B")
    # Frame header descriptor: 8-byte content size (0b11 << 6), single
    # segment (1 << 5), content checksum (1 << 2).
    parts = [FRAME_MAGIC.pack(ZSTD_FRAME_MAGIC), bytes([0xE4]),
             struct.pack("<Q", len(view))]
    starts = range(0, len(view), RAW_BLOCK_BYTES) if len(view) else [0]
    for start in starts:
        block = view[start:start + RAW_BLOCK_BYTES]
        last = start + RAW_BLOCK_BYTES >= len(view)
        # Block header: last-block bit, type 0 (raw) in bits 1-2, size in bits 3-23.
        parts.append((int(last) | (len(block) << 3)).to_bytes(3, "little"))
        parts.append(bytes(block))
    parts.append(FRAME_MAGIC.pack(xxhash.xxh64_intdigest(view) & 0xFFFFFFFF))
    return b"".join(parts)


def _frame_checksum(compressed: bytes) -> int:
    """The content checksum a vmcap frame ends with: the seek table entry's checksum."""
    return FRAME_MAGIC.unpack_from(compressed, len(compressed) - FRAME_MAGIC.size)[0]


class FrameFile:
    """The file side of a seekable zstd output: frames written in order, their seek table,
    the head frame, and the cut after a failed write.

    SeekableWriter decides what the frames hold and compresses them; this
    records where each went. ``sink`` needs write(); rewrite_head also needs
    pwrite(data, offset), and cut truncate(size) (an OutputFile has all three).
    """

    def __init__(self, sink):
        self._sink = sink
        # Where the first frame goes in the sink: the head and a cut count from there.
        self._base = getattr(sink, "position", 0)
        self._table = bytearray()
        self.frames = 0  # frames wholly written
        self.compressed_bytes = 0  # bytes written to the sink
        # (index, offset, size, decompressed size) of the head's raw frame
        self._head: tuple[int, int, int, int] | None = None

    def check_frame_count(self) -> None:
        """Before any byte of a new frame goes out."""
        if self.frames >= MAX_FRAMES:
            raise OutputError(
                f"seekable zstd output would exceed {MAX_FRAMES} frames; use a larger frame size"
            )

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = self._sink.write(view)
                # Buffered files return len(data) or None; raw files may write less.
                if written is None or written >= len(view):
                    break
                if written <= 0:
                    raise OutputError(f"output accepted no bytes at offset {self.compressed_bytes}")
                view = view[written:]
        except OSError as error:
            raise OutputError(
                f"writing seekable zstd output at offset {self.compressed_bytes}: {error.strerror or error}"
            ) from error
        self.compressed_bytes += len(data)

    def record(self, compressed_size: int, decompressed_size: int, checksum: int) -> None:
        """A frame wholly written: its seek table entry (the count was checked before it was)."""
        self._table += SEEK_ENTRY_WITH_CHECKSUM.pack(compressed_size, decompressed_size, checksum)
        self.frames += 1

    def write_frame(self, compressed: bytes, decompressed_size: int) -> None:
        self.check_frame_count()
        self.write(compressed)
        self.record(len(compressed), decompressed_size, _frame_checksum(compressed))

    def write_head_frame(self, head: memoryview) -> None:
        """The head as a raw frame, to be rewritten later (every frame before it is written)."""
        frame = raw_frame(head)
        self._head = (self.frames, self.compressed_bytes, len(frame), len(head))
        self.write_frame(frame, len(head))

    @property
    def head_index(self) -> int | None:
        return None if self._head is None else self._head[0]

    def check_head(self, head) -> None:
        """ValueError unless ``head`` can replace the head frame."""
        if self._head is None:
            raise ValueError("no head frame to rewrite (none written, or not among the frames kept)")
        size = len(_byte_view(head))
        if size != self._head[3]:
            raise ValueError(f"the new head is {size} bytes, the head written {self._head[3]}")

    def rewrite_head(self, head) -> None:
        """Replace the head frame in the sink (its frame is written) and its seek table entry."""
        self.check_head(head)
        index, offset, size, _ = self._head
        frame = raw_frame(head)
        try:
            self._sink.pwrite(frame, self._base + offset)
        except OSError as error:
            raise OutputError(f"rewriting the seekable zstd head frame at offset {offset}: "
                              f"{error.strerror or error}") from error
        entry = index * SEEK_ENTRY_WITH_CHECKSUM.size
        self._table[entry:entry + SEEK_ENTRY_WITH_CHECKSUM.size] = \
            SEEK_ENTRY_WITH_CHECKSUM.pack(size, len(_byte_view(head)), _frame_checksum(frame))

    def cut(self) -> int:
        """Keep the frames wholly written, cut the sink after them; their decompressed size."""
        entries = np.frombuffer(bytes(self._table), dtype="<u4").reshape(-1, 3)
        ends = np.cumsum(entries[:, 0], dtype=np.int64)
        kept = int(np.searchsorted(ends, self.compressed_bytes, side="right"))
        self._table = self._table[:kept * SEEK_ENTRY_WITH_CHECKSUM.size]
        self.frames = kept
        self.compressed_bytes = int(ends[kept - 1]) if kept else 0
        if self._head is not None and self._head[0] >= kept:
            self._head = None
        try:
            self._sink.truncate(self._base + self.compressed_bytes)
        except OSError as error:
            raise OutputError(f"cutting seekable zstd output at offset {self.compressed_bytes}: "
                              f"{error.strerror or error}") from error
        return int(entries[:kept, 1].sum(dtype=np.int64))

    def seek_table_bytes(self) -> bytes:
        """The seek table (a skippable frame) for the frames written so far."""
        footer = SEEK_TABLE_FOOTER.pack(self.frames, CHECKSUM_FLAG, SEEKABLE_MAGIC)
        header = SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC, len(self._table) + len(footer))
        return header + bytes(self._table) + footer


class FramePool:
    """Frames compressed on worker threads and written in their order (to a FrameFile).

    At most ``max_in_flight`` frames wait, being compressed or compressed
    and not yet written: about 2 * threads frame buffers, whatever the
    input size, and never past MAX_IN_FLIGHT_BYTES. A frame's buffer is the
    worker's until its frame is written, then it is reused.
    """

    def __init__(self, threads: int, frame_bytes: int, compress, frame_file: FrameFile):
        self._compress = compress  # plain -> one compressed frame; runs on the workers
        self._file = frame_file
        self._frame_bytes = frame_bytes
        import concurrent.futures  # here: one thread (a capture kernel's nr_cpus=1) starts no pool

        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="vmcap-zstd"
        )
        self._max_in_flight = max(1, min(2 * threads, MAX_IN_FLIGHT_BYTES // frame_bytes))
        # (future compressed bytes, decompressed size, frame buffer to recycle or None), in output order.
        self._in_flight: collections.deque = collections.deque()
        self._spare_frames: list[bytearray] = []

    def submit(self, frame: bytearray, filled: int) -> bytearray:
        """Compress frame[:filled] as the next frame; returns a buffer for the frame after it."""
        self._make_room_in_flight()
        future = self._executor.submit(self._compress, memoryview(frame)[:filled])
        self._in_flight.append((future, filled, frame))
        spare = self._spare_frames.pop() if self._spare_frames else bytearray(self._frame_bytes)
        self._write_finished_frames()
        return spare

    def queue(self, compressed: bytes, decompressed_size: int) -> None:
        """A frame compressed already, written after those still being compressed."""
        self._make_room_in_flight()
        import concurrent.futures

        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(compressed)
        self._in_flight.append((done, decompressed_size, None))
        self._write_finished_frames()

    def drain(self) -> None:
        """Write every frame submitted (waiting for its compression)."""
        while self._in_flight:
            self._write_oldest_in_flight()

    def stop(self, *, cancel: bool) -> None:
        """Stop the workers; frames not written are forgotten."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        self._in_flight.clear()

    def _make_room_in_flight(self) -> None:
        while len(self._in_flight) >= self._max_in_flight:
            self._write_oldest_in_flight()

    def _write_finished_frames(self) -> None:
        """Write frames at the head of the queue that are already compressed, keeping output flowing."""
        while self._in_flight and self._in_flight[0][0].done():
            self._write_oldest_in_flight()

    def _write_oldest_in_flight(self) -> None:
        future, decompressed_size, frame_buffer = self._in_flight.popleft()
        compressed = future.result()
        self._file.write_frame(compressed, decompressed_size)
        if frame_buffer is not None:
            self._spare_frames.append(frame_buffer)


class SeekableWriter:
    """Compresses a byte stream into independent zstd frames + seek table, written to `sink`.

    `sink` is anything with .write(bytes-like); it is never seeked, so a pipe
    works. With threads > 1, frames are compressed in parallel and written in
    order; at most 2 * threads frames are in flight, which bounds memory to
    about 2 * threads * frame_bytes. With one thread each frame is compressed
    as a stream, its bytes written as zstd produces them: memory is zstd's
    own context whatever frame_bytes is, and such frame headers carry no
    content size (the seek table has it). Where the frames go, their seek
    table and the head frame are the FrameFile's; the pool of compressing
    threads is the FramePool's.
    """

    def __init__(self, sink, *, level: int = 3, threads: int = 0, frame_bytes: int = DEFAULT_FRAME_BYTES):
        """``sink`` needs write(); rewrite_head also needs pwrite(data, offset), and
        cut_to_written_frames truncate(size) (an OutputFile has both)."""
        if not 1 <= frame_bytes <= MAX_FRAME_DECOMPRESSED_BYTES:
            raise ValueError(f"frame_bytes must be 1..{MAX_FRAME_DECOMPRESSED_BYTES}, not {frame_bytes}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, not {threads}")
        self._file = FrameFile(sink)
        self._level = level
        self._frame_bytes = frame_bytes
        self._threads = threads or usable_cpus()

        # With a pool: the frame being filled, allocated once and filled by slice
        # assignment, so each input byte is copied once and never reallocated.
        # On one thread (streamed): the open frame's compressor, what it has been
        # given, and the compressed bytes written for it so far.
        self._frame = bytearray(frame_bytes) if self._threads > 1 else bytearray(0)
        self._frame_filled = 0
        self._stream = None
        self._stream_compressed = 0
        self._stream_tail = b""  # the frame's last bytes written: its checksum ends them

        self._uncompressed_bytes = 0
        self._compressed_zero_frame: bytes | None = None
        self._stats: SeekableStats | None = None
        self._failed = False
        self._cut = False  # cut_to_written_frames() was called: only the head and the seek table remain

        # Compressors are not thread-safe: one per thread.
        self._per_thread = threading.local()
        # None: one thread (frames streamed), or the workers are stopped.
        self._pool = (FramePool(self._threads, frame_bytes, self._compress, self._file)
                      if self._threads > 1 else None)

    # -- public API --------------------------------------------------------

    def write(self, data) -> None:
        """Append bytes (bytes, bytearray, memoryview).

        `data` may be a view of memory the caller reuses, such as an mmap
        window: it is copied or compressed before write() returns.
        """
        self._check_open()
        view = _byte_view(data)
        size = len(view)
        if size == 0:
            return
        self._uncompressed_bytes += size
        if self._pool is None:
            self._guarded(self._stream_view, view)
            return
        # Fast path for the common small write (a page or a run of pages).
        if size < self._frame_bytes - self._frame_filled:
            self._frame[self._frame_filled : self._frame_filled + size] = view
            self._frame_filled += size
            return
        self._guarded(self._write_view, view)

    def write_zeros(self, n: int) -> None:
        """Append n zero bytes without allocating n bytes."""
        self._check_open()
        if n < 0:
            raise ValueError(f"cannot write {n} zero bytes")
        self._uncompressed_bytes += n
        self._guarded(self._write_zeros, n)

    def write_raw_frame(self, data) -> None:
        """End the current frame and store ``data`` as one uncompressed frame (see raw_frame)."""
        self._store_raw_frame(data, is_head=False)

    def write_head(self, head) -> None:
        """write_raw_frame for the dump's head, which rewrite_head can replace later."""
        if self._file.head_index is not None:
            raise ValueError("the head is written once")
        self._store_raw_frame(head, is_head=True)

    def _store_raw_frame(self, data, *, is_head: bool) -> None:
        self._check_open()
        view = _byte_view(data)
        self._uncompressed_bytes += len(view)

        def store() -> None:
            self._end_frame()
            # Write what is queued first, so the frame's offset is known.
            if self._pool is not None:
                self._pool.drain()
            if is_head:
                self._file.write_head_frame(view)
            else:
                self._file.write_frame(raw_frame(view), len(view))

        self._guarded(store)

    def rewrite_head(self, head) -> None:
        """Replace the head's frame with one holding ``head`` (the same length), in place.

        Before close(), or after cut_to_written_frames() if the head's frame
        was kept. The seek table, written by close(), gets the new checksum.
        """
        self._file.check_head(head)  # first: a wrong call must not abandon the output
        if self._cut:
            self._file.rewrite_head(head)
            return
        self._check_open()
        self._guarded(self._file.rewrite_head, head)

    # -- a dump cut short ----------------------------------------------------

    def cut_to_written_frames(self) -> int:
        """After a failed write: keep the frames wholly written, forget the rest.

        Stops the workers and cuts the sink after the frames kept (a frame
        written part-way is dropped). Returns their decompressed size; the
        head may then be rewritten (rewrite_head), and close() writes the
        seek table of the frames kept.
        """
        self._failed = True
        self._cut = True
        self._stop_threads(cancel=True)
        self._uncompressed_bytes = self._file.cut()
        return self._uncompressed_bytes

    def close(self) -> SeekableStats:
        """Flush the last frame and write the seek table. Does not close the sink.

        Calling close() again returns the same stats.
        """
        if self._stats is not None:
            return self._stats
        if self._cut:
            # The frames kept after a failed write: their seek table is all that is left.
            self._file.write(self._file.seek_table_bytes())
        else:
            self._check_open()
            self._guarded(self._finish)
        self._stats = SeekableStats(
            frames=self._file.frames,
            uncompressed_bytes=self._uncompressed_bytes,
            compressed_bytes=self._file.compressed_bytes,
        )
        return self._stats

    def __enter__(self) -> SeekableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._stats is None:
            # Leave the output without a seek table: a truncated stream must
            # not look like a complete, valid seekable file.
            self._failed = True
            self._stop_threads(cancel=True)

    # -- one thread: frames compressed as a stream --------------------------

    def _stream_view(self, view: memoryview) -> None:
        position, size = 0, len(view)
        while position < size:
            take = min(size - position, self._frame_bytes - self._frame_filled)
            self._stream_feed(view[position:position + take])
            position += take
            if self._frame_filled == self._frame_bytes:
                self._end_frame()

    def _stream_feed(self, piece) -> None:
        if self._stream is None:
            self._file.check_frame_count()  # before any of the frame's bytes go out
            self._stream = self._compressor().compressobj()
            self._stream_compressed = 0
            self._stream_tail = b""
        self._stream_write(self._stream.compress(piece))
        self._frame_filled += len(piece)

    def _stream_write(self, compressed: bytes) -> None:
        if compressed:
            self._file.write(compressed)
            self._stream_compressed += len(compressed)
            self._stream_tail = (self._stream_tail + compressed[-FRAME_MAGIC.size:])[-FRAME_MAGIC.size:]

    def _stream_end_frame(self) -> None:
        self._stream_write(self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        self._stream = None
        self._file.record(self._stream_compressed, self._frame_filled,
                           FRAME_MAGIC.unpack(self._stream_tail)[0])

    # -- filling frames ----------------------------------------------------

    def _write_view(self, view: memoryview) -> None:
        position = 0
        size = len(view)
        while position < size:
            if self._frame_filled == 0 and self._pool is None and size - position >= self._frame_bytes:
                # Single-threaded: compress straight from the caller's memory,
                # which is only needed until compress() returns.
                plain = view[position : position + self._frame_bytes]
                self._file.write_frame(self._compress(plain), len(plain))
                position += self._frame_bytes
                continue
            take = min(size - position, self._frame_bytes - self._frame_filled)
            self._frame[self._frame_filled : self._frame_filled + take] = view[position : position + take]
            self._frame_filled += take
            position += take
            if self._frame_filled == self._frame_bytes:
                self._end_frame()

    def _write_zeros(self, n: int) -> None:
        while n > 0:
            if self._frame_filled == 0 and n >= self._frame_bytes:
                # Whole zero frames compress to identical bytes: compress one, reuse it.
                self._queue_compressed(self._zero_frame(), self._frame_bytes)
                n -= self._frame_bytes
                continue
            take = min(n, self._frame_bytes - self._frame_filled, len(_ZERO_CHUNK))
            if self._pool is None:
                self._stream_feed(memoryview(_ZERO_CHUNK)[:take])
            else:
                self._frame[self._frame_filled : self._frame_filled + take] = memoryview(_ZERO_CHUNK)[:take]
                self._frame_filled += take
            n -= take
            if self._frame_filled == self._frame_bytes:
                self._end_frame()

    def _end_frame(self) -> None:
        """Compress the filled part of the frame buffer as one frame."""
        if self._frame_filled == 0:
            return
        if self._stream is not None:
            self._stream_end_frame()
            self._frame_filled = 0
            return
        if self._pool is None:
            plain = memoryview(self._frame)[: self._frame_filled]
            self._file.write_frame(self._compress(plain), len(plain))
        else:
            # The old buffer now belongs to the worker until its frame is written.
            self._frame = self._pool.submit(self._frame, self._frame_filled)
        self._frame_filled = 0

    def _queue_compressed(self, compressed: bytes, decompressed_size: int) -> None:
        """Write an already-compressed frame, after any frames still being compressed."""
        if self._pool is None:
            self._file.write_frame(compressed, decompressed_size)
        else:
            self._pool.queue(compressed, decompressed_size)

    def _zero_frame(self) -> bytes:
        if self._compressed_zero_frame is None:
            # Byte for byte what writing the zeros would give: a pool's frames
            # declare their size, streamed ones do not.
            stream = self._compressor().compressobj(
                size=self._frame_bytes if self._pool is not None else -1)
            parts = []
            for start in range(0, self._frame_bytes, len(_ZERO_CHUNK)):
                parts.append(stream.compress(memoryview(_ZERO_CHUNK)[:min(len(_ZERO_CHUNK),
                                                                          self._frame_bytes - start)]))
            parts.append(stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
            self._compressed_zero_frame = b"".join(parts)
        return self._compressed_zero_frame

    # -- compressing and writing frames ------------------------------------

    def _compress(self, plain) -> bytes:
        """Compress one independent frame; runs on worker threads."""
        return self._compressor().compress(plain)

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This thread's compressor (they are not thread-safe)."""
        compressor = getattr(self._per_thread, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=True, write_content_size=True)
            self._per_thread.compressor = compressor
        return compressor

    def _finish(self) -> None:
        self._end_frame()
        if self._pool is not None:
            self._pool.drain()
        self._stop_threads(cancel=False)
        # Empty input gives a file that is only the seek table. zstd 1.5.4
        # `zstd -d` accepts a file holding only a skippable frame (0 bytes
        # out, exit 0), so no empty zstd frame is needed.
        self._file.write(self._file.seek_table_bytes())

    # -- state ---------------------------------------------------------------

    def _guarded(self, step, *args) -> None:
        """Run a step; if it fails, stop the workers and refuse further use."""
        try:
            step(*args)
        except zstandard.ZstdError as error:
            self._abandon()
            raise OutputError(f"zstd compression failed in frame {self._file.frames}: {error}") from error
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        self._failed = True
        self._stop_threads(cancel=True)

    def _stop_threads(self, *, cancel: bool) -> None:
        if self._pool is not None:
            self._pool.stop(cancel=cancel)
            self._pool = None

    def _check_open(self) -> None:
        if self._failed:
            raise OutputError("seekable zstd output is incomplete: an earlier write failed")
        if self._stats is not None:
            raise ValueError("write to a closed SeekableWriter")


def _byte_view(data) -> memoryview:
    """A flat byte view of any bytes-like object, whatever its item format."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# ---------------------------------------------------------------------------
# Reading


class SeekableReader:
    """Random access to a seekable zstd file.

    Opening reads and validates the seek table; frames are decompressed only
    when read. Not thread-safe (one decompressor, one small frame cache).
    A path is opened and closed by the reader; a passed fd stays the caller's.
    """

    def __init__(self, fd_or_path):
        self._fd, self._owns_fd = _open_for_reading(fd_or_path)
        try:
            self.frames: tuple[FrameEntry, ...] = _read_seek_table(self._fd)
        except BaseException:
            self.close()
            raise
        last = self.frames[-1] if self.frames else None
        self.size: int = last.decompressed_offset + last.decompressed_size if last else 0
        # End offset of each frame: the frame holding offset x is the first whose end exceeds x,
        # which also steps over frames that decompress to nothing.
        self._decompressed_ends = [frame.decompressed_offset + frame.decompressed_size for frame in self.frames]
        self._decompressor = zstandard.ZstdDecompressor()
        self._cache: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def pread(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at decompressed `offset`; short only at the end of the data, like os.pread."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad read range: offset {offset}, length {length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        pieces = []
        index = bisect.bisect_right(self._decompressed_ends, offset)
        position = offset
        while position < end:
            frame = self.frames[index]
            plain = self._cached_frame(frame)
            piece_end = min(end, self._decompressed_ends[index])
            if piece_end - position == len(plain):
                pieces.append(plain)  # the whole frame: no copy
            else:
                pieces.append(plain[position - frame.decompressed_offset : piece_end - frame.decompressed_offset])
            position = piece_end
            index += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def has_checksums(self) -> bool:
        """Whether the seek table carries a checksum per frame (vmcap since checksums)."""
        return bool(self.frames) and self.frames[0].checksum is not None

    def iter_frames(self) -> Iterator[tuple[FrameEntry, bytes]]:
        """Decompress every frame in order, verifying each; for verify and decompress.

        Besides zstd's own checks, each frame's XXH64 must match its seek
        table entry when the table has checksums.
        """
        for frame in self.frames:
            plain = self._decompress_frame(frame)
            if frame.checksum is not None and xxhash.xxh64_intdigest(plain) & 0xFFFFFFFF != frame.checksum:
                raise CorruptOutput(
                    f"seekable zstd frame {frame.index} at offset {frame.compressed_offset}: "
                    f"its bytes do not match the seek table checksum {frame.checksum:#010x}")
            yield frame, plain

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._cache = collections.OrderedDict()

    def __enter__(self) -> SeekableReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _cached_frame(self, frame: FrameEntry) -> bytes:
        plain = self._cache.get(frame.index)
        if plain is not None:
            self._cache.move_to_end(frame.index)
            return plain
        plain = self._decompress_frame(frame)
        self._cache[frame.index] = plain
        if len(self._cache) > CACHED_FRAMES:
            self._cache.popitem(last=False)
        return plain

    def _decompress_frame(self, frame: FrameEntry) -> bytes:
        """Decompress one frame, checking it is exactly one zstd frame of the size the seek table says."""
        where = f"frame {frame.index} at offset {frame.compressed_offset}"
        compressed = _pread_exact(self._fd, frame.compressed_offset, frame.compressed_size, where)
        if _is_skippable_frame(compressed):
            # Other writers may interleave skippable frames; they hold no data.
            # Checked rather than trusted, so a damaged decompressed_size of 0
            # cannot silently drop a frame of data.
            if frame.decompressed_size != 0 or _skippable_frame_length(compressed) != len(compressed):
                raise CorruptOutput(f"seekable zstd {where}: skippable frame does not match the seek table")
            return b""
        try:
            declared_size = zstandard.frame_content_size(compressed)
        except zstandard.ZstdError as error:
            raise CorruptOutput(f"seekable zstd {where}: bad frame header: {error}") from error
        if declared_size not in (frame.decompressed_size, UNKNOWN_CONTENT_SIZE):
            raise CorruptOutput(
                f"seekable zstd {where}: frame header says {declared_size} bytes, "
                f"seek table says {frame.decompressed_size}"
            )
        try:
            # max_output_size matters only when the header has no content size;
            # 0 would mean "no limit", so an empty frame is allowed 1.
            plain = self._decompressor.decompress(
                compressed, max_output_size=max(frame.decompressed_size, 1), allow_extra_data=False
            )
        except zstandard.ZstdError as error:
            raise CorruptOutput(f"seekable zstd {where}: {error}") from error
        if len(plain) != frame.decompressed_size:
            raise CorruptOutput(
                f"seekable zstd {where}: decompressed to {len(plain)} bytes, "
                f"seek table says {frame.decompressed_size}"
            )
        return plain


def _is_skippable_frame(compressed: bytes) -> bool:
    if len(compressed) < FRAME_MAGIC.size:
        return False
    (magic,) = FRAME_MAGIC.unpack_from(compressed)
    return magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC & SKIPPABLE_MAGIC_MASK


def _skippable_frame_length(frame: bytes) -> int:
    """Total bytes of a skippable frame according to its header; -1 if the header is cut short."""
    if len(frame) < SKIPPABLE_HEADER.size:
        return -1
    _magic, content_bytes = SKIPPABLE_HEADER.unpack_from(frame)
    return SKIPPABLE_HEADER.size + content_bytes


def _open_for_reading(fd_or_path) -> tuple[int, bool]:
    """(fd, whether we opened it)."""
    if isinstance(fd_or_path, int):
        return fd_or_path, False
    return open_source_fd(fd_or_path), True


def _read_seek_table(fd: int) -> tuple[FrameEntry, ...]:
    """Parse and cross-check the seek table at the end of the file."""
    file_size = os.fstat(fd).st_size
    if file_size < SMALLEST_SEEK_TABLE_BYTES:
        raise CorruptOutput(f"not a seekable zstd file: {file_size} bytes is too short for a seek table")
    footer_offset = file_size - SEEK_TABLE_FOOTER.size
    footer = _pread_exact(fd, footer_offset, SEEK_TABLE_FOOTER.size, "seek table footer")
    frame_count, descriptor, magic = SEEK_TABLE_FOOTER.unpack(footer)
    if magic != SEEKABLE_MAGIC:
        raise CorruptOutput(f"not a seekable zstd file: no seek table magic at offset {footer_offset + 5}")
    if descriptor & RESERVED_DESCRIPTOR_BITS:
        raise CorruptOutput(
            f"seek table descriptor 0x{descriptor:02x} at offset {footer_offset + 4} sets reserved bits"
        )
    entry_format = SEEK_ENTRY_WITH_CHECKSUM if descriptor & CHECKSUM_FLAG else SEEK_ENTRY
    table_bytes = frame_count * entry_format.size
    seek_frame_bytes = SKIPPABLE_HEADER.size + table_bytes + SEEK_TABLE_FOOTER.size
    if frame_count > MAX_FRAMES or seek_frame_bytes > file_size:
        raise CorruptOutput(
            f"seek table claims {frame_count} frames, impossible in a file of {file_size} bytes"
        )
    seek_frame_offset = file_size - seek_frame_bytes
    header = _pread_exact(fd, seek_frame_offset, SKIPPABLE_HEADER.size, "seek table header")
    skippable_magic, skippable_size = SKIPPABLE_HEADER.unpack(header)
    if skippable_magic != SKIPPABLE_MAGIC or skippable_size != table_bytes + SEEK_TABLE_FOOTER.size:
        raise CorruptOutput(
            f"seek table skippable frame header at offset {seek_frame_offset} does not match its footer "
            f"(magic 0x{skippable_magic:08x}, size {skippable_size})"
        )
    table = _pread_exact(fd, seek_frame_offset + SKIPPABLE_HEADER.size, table_bytes, "seek table")
    frames = _frame_entries(table, entry_format)
    compressed_total = frames[-1].compressed_offset + frames[-1].compressed_size if frames else 0
    if compressed_total != seek_frame_offset:
        raise CorruptOutput(
            f"seek table frames add up to {compressed_total} compressed bytes, "
            f"but the seek table starts at offset {seek_frame_offset}"
        )
    return frames


def _frame_entries(table: bytes, entry_format: struct.Struct) -> tuple[FrameEntry, ...]:
    frames = []
    compressed_offset = 0
    decompressed_offset = 0
    for index, entry in enumerate(entry_format.iter_unpack(table)):
        compressed_size, decompressed_size = entry[0], entry[1]
        checksum = entry[2] if len(entry) > 2 else None
        if decompressed_size > MAX_FRAME_DECOMPRESSED_BYTES or (compressed_size == 0 and decompressed_size != 0):
            # Also refuses to allocate gigabytes on the word of a damaged table.
            raise CorruptOutput(
                f"seek table entry {index} claims {decompressed_size} decompressed bytes "
                f"in a {compressed_size}-byte frame"
            )
        frames.append(
            FrameEntry(index, compressed_offset, compressed_size, decompressed_offset, decompressed_size,
                       checksum)
        )
        compressed_offset += compressed_size
        decompressed_offset += decompressed_size
    return tuple(frames)


def _pread_exact(fd: int, offset: int, length: int, what: str) -> bytes:
    pieces = []
    position = offset
    remaining = length
    while remaining > 0:
        piece = os.pread(fd, remaining, position)
        if not piece:
            raise CorruptOutput(
                f"seekable zstd {what}: file ends at offset {position}, expected {length} bytes from {offset}"
            )
        pieces.append(piece)
        position += len(piece)
        remaining -= len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def is_seekable_zstd(fd_or_path) -> bool:
    """Cheap check: a zstd frame at offset 0 and the seekable magic in the last 4 bytes.

    A file holding only a seek table (vmcap's output for empty input) starts
    with the skippable-frame magic instead, and is also seekable zstd.
    Errors opening a path propagate as OSError.
    """
    fd, owns_fd = _open_for_reading(fd_or_path)
    try:
        return _has_seekable_magics(fd)
    finally:
        if owns_fd:
            os.close(fd)


def _has_seekable_magics(fd: int) -> bool:
    file_size = os.fstat(fd).st_size
    if file_size < SMALLEST_SEEK_TABLE_BYTES:
        return False
    first = os.pread(fd, FRAME_MAGIC.size, 0)
    last = os.pread(fd, FRAME_MAGIC.size, file_size - FRAME_MAGIC.size)
    if len(first) != FRAME_MAGIC.size or len(last) != FRAME_MAGIC.size:
        return False
    (first_magic,) = FRAME_MAGIC.unpack(first)
    (last_magic,) = FRAME_MAGIC.unpack(last)
    starts_with_frame = first_magic == ZSTD_FRAME_MAGIC or _is_skippable_frame(first)
    return starts_with_frame and last_magic == SEEKABLE_MAGIC
