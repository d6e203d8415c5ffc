"""Reading the source: the one small interface every source byte passes through.

A source offers two ways in:

* ``pread(offset, length)`` — an exact positional read, used for the ELF
  headers, the notes and the RAM bytes of fractional pages. It never reads a
  byte more than asked (no read-ahead buffer that could spill into the
  non-RAM bytes around a segment).
* ``map(offset, length)`` — a read-only mmap window over whole file pages
  that lie inside one segment. /proc/vmcore is much faster through mmap
  than through read() (no per-page copy_oldmem_page), but the kernel refuses
  to map a page that mixes RAM and reserved memory, and other sources (pipes,
  char devices, some filesystems) refuse mmap altogether; the caller falls
  back to ``pread`` when ``MmapRefused`` is raised.

Tests wrap a source to record every call (see ``RecordingSource``); that is
how "each fractional piece read exactly once, never mapped" is asserted.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import BadSource, SourceIOError

# Python's mmap needs offsets that are multiples of this (the host's page
# size on Linux; 64 KiB on some arm64/ppc64 kernels).
ALLOCATION_GRANULARITY = mmap.ALLOCATIONGRANULARITY


class MmapRefused(Exception):
    """The source would not be mapped at this offset; read it instead."""


class MappedBytes:
    """``with`` gives a memoryview of part of an mmap window; leaving unmaps the window,
    once no view of it is left: a consumer that failed mid-write (disk full) or an
    exception's frame may still hold a slice or an array of it, and then the mapping
    goes when that does."""

    def __init__(self, window: mmap.mmap, start: int, size: int):
        self._window = window
        self._view = memoryview(window)[start:start + size]

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, *exc) -> None:
        try:
            self._view.release()
            self._window.close()
        except BufferError:
            pass


class Source(Protocol):
    """What the rest of vmcap needs from a source file."""

    name: str
    size: int | None  # None when the size is unknown (a character device)

    def pread(self, offset: int, length: int) -> bytes: ...

    def pread_into(self, buffer: memoryview, offset: int) -> None: ...

    def map(self, offset: int, length: int) -> mmap.mmap: ...

    def close(self) -> None: ...


def open_source_fd(path) -> int:
    """A read-only fd for a dump or source path, refusing what cannot be one without blocking.

    Opening a FIFO for reading blocks until a writer appears, so the open is
    non-blocking and the file type is checked before anything reads. Regular
    files (saved dumps, /proc/vmcore) and block devices are accepted; a
    directory, FIFO, socket or character device (/dev/null, /dev/zero, a tty)
    is BadSource. The fd is returned in blocking mode again.
    """
    name = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except IsADirectoryError:
        raise BadSource(f"{name}: is a directory, not a vmcore") from None
    except OSError as e:
        raise BadSource(f"{name}: cannot open: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise BadSource(f"{name}: is a directory, not a vmcore")
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise BadSource(f"{name}: is a pipe or socket; vmcap needs positional reads "
                            "(save it to a file first)")
        if stat.S_ISCHR(mode):
            raise BadSource(f"{name}: is a character device, not a vmcore "
                            "(vmcap reads regular files, /proc/vmcore and block devices)")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise BadSource(f"{name}: is not a regular file or block device")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileSource:
    """A vmcore on disk, /proc/vmcore, or a block device."""

    def __init__(self, path: str, *, allow_mmap: bool = True):
        self.name = str(path)
        self.allow_mmap = allow_mmap
        self._fd = open_source_fd(path)
        st = os.fstat(self._fd)
        if stat.S_ISREG(st.st_mode):
            self.size: int | None = st.st_size
        else:  # a block device (open_source_fd refused everything else)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)

    def pread(self, offset: int, length: int) -> bytes:
        # os.pread's bytes is the result itself (one allocation, no copy); a short
        # read, or an error, goes the careful way.
        try:
            data = os.pread(self._fd, length, offset)
        except OSError:
            data = b""
        if len(data) == length:
            return data
        buffer = bytearray(length)
        buffer[:len(data)] = data
        self.pread_into(memoryview(buffer)[len(data):], offset + len(data))
        return bytes(buffer)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        length = len(buffer)
        while done < length:
            try:
                n = os.preadv(self._fd, [buffer[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise SourceIOError(
                    f"{self.name}: read error at file offset {offset + done:#x}: "
                    f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}",
                    offset=offset + done) from None
            if n == 0:
                raise SourceIOError(
                    f"{self.name}: unexpected end of file at offset {offset + done:#x} "
                    f"(wanted {length} bytes from {offset:#x})", offset=offset + done)
            done += n

    def map(self, offset: int, length: int) -> mmap.mmap:
        if not self.allow_mmap:
            raise MmapRefused("mmap disabled")
        try:
            mapping = mmap.mmap(self._fd, length, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise MmapRefused(str(e)) from None
        try:
            mapping.madvise(mmap.MADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass  # advice only
        return mapping

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class SourceCall:
    kind: str  # "pread" or "map"
    offset: int
    length: int


@dataclass
class RecordingSource:
    """Wraps a source and records every read and map; for tests and debugging."""

    inner: Source
    calls: list[SourceCall] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def size(self) -> int | None:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        self.calls.append(SourceCall("pread", offset, length))
        return self.inner.pread(offset, length)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.calls.append(SourceCall("pread", offset, len(buffer)))
        self.inner.pread_into(buffer, offset)

    def map(self, offset: int, length: int) -> mmap.mmap:
        mapping = self.inner.map(offset, length)
        self.calls.append(SourceCall("map", offset, length))
        return mapping

    def close(self) -> None:
        self.inner.close()
