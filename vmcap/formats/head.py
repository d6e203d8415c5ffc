"""One way to finish a dump's head: ``rewrite_head(head)`` on every sink.

A dump's head (ELF header, program headers and notes; kdump header block)
is written, or its room reserved, before the page data, but its VMCAP note
(formats/note.py) can only be finished once the data is written: read errors
and digests are known then, and a dump cut short learns only then where its
data stops. Each sink vmcap writes through therefore offers the same
operation, called after the data:

    rewrite_head(head)   put ``head`` at the start of the output, in place

* SparseElfSink (here): the plain ELF, a pwrite at the start of the file.
* seekable.SeekableWriter: zelf, whose head is an uncompressed frame of
  fixed size; the frame is replaced and its seek table entry follows.
* KdumpFile (here): the kdump writer's file, a pwrite at offset 0 (the
  header block, written last so the file claims to be a kdump only then).
* flattened.FlattenedWriter: kdump-flat, one more record for offset 0.

The ELF sinks also take the head first (``write_head``), in a region they
are able to rewrite. Callers never reach past a sink into the output file.
"""

from __future__ import annotations

import os
from typing import Protocol

from ..errors import OutputError
from ..fileio.output import OutputFile, SparseSink, write_error
from .digest import StreamDigest, sparse_file_digest


class HeadSink(Protocol):
    def rewrite_head(self, head) -> None:
        """Put ``head`` at the start of the output, once the data is written."""


class ElfSink(HeadSink, Protocol):
    """A sink for an ELF byte stream (elfwriter.ElfStreamWriter)."""

    def write_head(self, head) -> None: ...

    def write(self, data) -> None: ...

    def write_zeros(self, n: int) -> None: ...


class SparseElfSink:
    """The plain ELF output: all-zero blocks become holes, the data is digested.

    The head goes to an allocated region (the zeros in the VMCAP note's
    padding would otherwise be holes), so it can be rewritten in place when
    the disk is full. ``data_digest`` hashes every byte after the head.
    """

    def __init__(self, out: OutputFile):
        self._out = out
        self._sparse = SparseSink(out)
        self.data_digest = StreamDigest()
        self._head: tuple[int, int] | None = None  # (offset, length)

    def write_head(self, head) -> None:
        if self._head is not None:
            raise ValueError("the head is written once")
        offset = self._out.position
        self._out.reserve_range(offset, len(head))
        self._sparse.write(head)
        self._head = (offset, len(head))

    def write(self, data) -> None:
        self.data_digest.update(data)
        self._sparse.write(data)

    def write_zeros(self, n: int) -> None:
        self.data_digest.update_zeros(n)
        self._sparse.write_zeros(n)

    @property
    def position(self) -> int:
        """Bytes of the ELF written so far (the head included)."""
        return self._out.position

    def rewrite_head(self, head) -> None:
        _check_same_length(self._head, head)
        self._out.pwrite(head, self._head[0])

    def close(self) -> int:
        return self._sparse.close()


def _check_same_length(written: tuple[int, int] | None, head) -> None:
    if written is None:
        raise ValueError("no head to rewrite")
    if len(head) != written[1]:
        raise ValueError(f"the new head is {len(head)} bytes, the head written {written[1]}")


class KdumpFile:
    """The kdump writer's positional sink on a file: an OutputFile, or a bare fd.

    pwrite and truncate turn OSError into OutputError (OutputFull for a full
    disk); read_back_digest hashes what was written, for the META digest.
    """

    can_shrink = True

    def __init__(self, target: OutputFile | int):
        self._out = None if isinstance(target, int) else target
        self._fd = target if isinstance(target, int) else target.fd

    def pwrite(self, data, offset: int, what: str = "data") -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                written = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as e:
                raise write_error(f"writing kdump {what} at offset {offset + done:#x}: "
                                  f"{e.strerror or e}", e) from e
            if written == 0:
                raise OutputError(f"writing kdump {what} at offset {offset + done:#x}: no progress")
            done += written
        if self._out is not None:
            self._out.wrote_through(offset + done)

    def rewrite_head(self, head) -> None:
        self.pwrite(head, 0, "header")

    def truncate(self, size: int) -> None:
        """The file ends at ``size`` (what an older file had past it is dropped)."""
        if self._out is not None:
            self._out.truncate(size)  # the output's own size follows
            return
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise OutputError(f"setting kdump file size to {size}: {e.strerror or e}") from e

    def read_back_digest(self, start: int, end: int, digest: StreamDigest,
                         written: list[tuple[int, int]]) -> str:
        """sparse_file_digest of bytes written, through a read-only fd of its own.

        The output may be open write-only (OutputFile); Linux reopens the same
        file, even renamed, through /proc/self/fd.
        """
        try:
            read_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            read_fd = os.dup(self._fd)  # readable already, or the read fails with its own error
        try:
            return sparse_file_digest(read_fd, start, end, written, what="kdump metadata",
                                      continue_from=digest)
        finally:
            os.close(read_fd)
