"""Where output bytes go: an atomic file (OUT.part, fsync, rename) or stdout.

A dump that is half written under its final name looks like a dump; a
script that finds it later cannot tell. So the bytes go to ``OUT.part``,
which is fsynced and renamed over ``OUT`` only when everything succeeded,
and removed on any failure (disk full, EIO, Ctrl-C).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import numpy as np

from .errors import OutputError

SPARSE_BLOCK = 4096


class OutputFile:
    """A byte sink on a file descriptor that turns OSError into one-line OutputErrors."""

    def __init__(self, path: str, *, force: bool = False, mode: int = 0o600):
        self.path = path
        self.to_stdout = path == "-"
        self.position = 0
        self._closed = False
        if self.to_stdout:
            self.part_path = None
            self.fd = sys.stdout.buffer.fileno()
            sys.stdout.flush()
            st = os.fstat(self.fd)
            self.seekable = stat.S_ISREG(st.st_mode) and os.lseek(self.fd, 0, os.SEEK_CUR) == 0
            return
        if os.path.isdir(path):
            raise OutputError(f"{path}: is a directory")
        if os.path.lexists(path) and not force:
            raise OutputError(f"{path}: already exists (use --force to overwrite)")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise OutputError(f"{path}: directory {parent} does not exist")
        self.part_path = path + ".part"
        try:
            # Kernel memory holds keys and passwords: owner-only by default.
            self.fd = os.open(self.part_path,
                              os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        except OSError as e:
            raise OutputError(f"{self.part_path}: cannot create: {e.strerror}") from None
        self.seekable = True

    def _fail(self, what: str, error: OSError) -> OutputError:
        name = "standard output" if self.to_stdout else self.part_path
        reason = error.strerror or errno.errorcode.get(error.errno, str(error))
        return OutputError(f"{name}: {what} failed at offset {self.position:#x}: {reason}")

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.write(self.fd, view[done:])
            except InterruptedError:
                continue
            except OSError as e:
                raise self._fail("write", e) from None
            if n == 0:
                raise self._fail("write", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            done += n
        self.position += len(view)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise self._fail("write", e) from None

    def skip(self, n: int) -> None:
        """Leave a hole of n bytes (a sparse region) — or write zeros where we cannot seek."""
        if not self.seekable:
            self.write_zeros(n)
            return
        try:
            os.lseek(self.fd, n, os.SEEK_CUR)
        except OSError as e:
            raise self._fail("seek", e) from None
        self.position += n

    def write_zeros(self, n: int) -> None:
        zeros = bytes(min(n, 1 << 20))
        while n > 0:
            step = min(n, len(zeros))
            self.write(memoryview(zeros)[:step])
            n -= step

    def commit(self) -> None:
        """Make the output durable and give it its final name."""
        if self.to_stdout:
            self._closed = True
            return
        try:
            # A hole at the very end needs the file extended to its size.
            if os.fstat(self.fd).st_size < self.position:
                os.ftruncate(self.fd, self.position)
            os.fsync(self.fd)
            os.close(self.fd)
            self._closed = True
            os.rename(self.part_path, self.path)
        except OSError as e:
            raise self._fail("finishing", e) from None
        try:
            dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # the rename is done; a directory fsync is best effort

    def abort(self) -> None:
        """Remove the partial output; never raises."""
        if self.to_stdout:
            return
        if not self._closed:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self._closed = True
        try:
            os.unlink(self.part_path)
        except OSError:
            pass


class SparseSink:
    """Writes a plain byte stream, leaving all-zero blocks as holes.

    Every byte passes through a userspace bounce buffer before write():
    writing straight from a /proc/vmcore mapping to a network filesystem
    (9p, seen in a real capture kernel) fails with EFAULT because the kernel
    cannot pin the old-memory pages for the transfer.
    """

    def __init__(self, out: OutputFile, *, bounce_bytes: int = 1 << 20):
        self.out = out
        self._bounce = bytearray(bounce_bytes)
        self.bytes_in = 0

    def _copy_out(self, view: memoryview) -> None:
        bounce = memoryview(self._bounce)
        for start in range(0, len(view), len(bounce)):
            part = view[start:start + len(bounce)]
            bounce[:len(part)] = part
            self.out.write(bounce[:len(part)])

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.bytes_in += len(view)
        if not self.out.seekable:
            self._copy_out(view)
            return
        # Only whole blocks on the output's block grid can become holes.
        head = min(len(view), -self.out.position % SPARSE_BLOCK)
        if head:
            self._copy_out(view[:head])
            view = view[head:]
        blocks = len(view) // SPARSE_BLOCK
        if blocks:
            body = view[:blocks * SPARSE_BLOCK]
            nonzero = np.frombuffer(body, dtype=np.uint64).reshape(
                blocks, SPARSE_BLOCK // 8).any(axis=1)
            # Runs of equal flags: boundaries where the flag changes.
            edges = np.flatnonzero(np.diff(nonzero)) + 1
            starts = np.concatenate(([0], edges))
            ends = np.concatenate((edges, [blocks]))
            for start, end in zip(starts.tolist(), ends.tolist()):
                part = body[start * SPARSE_BLOCK:end * SPARSE_BLOCK]
                if nonzero[start]:
                    self._copy_out(part)
                else:
                    self.out.skip(len(part))
            view = view[blocks * SPARSE_BLOCK:]
        if len(view):
            self._copy_out(view)

    def write_zeros(self, n: int) -> None:
        self.bytes_in += n
        self.out.skip(n)

    def close(self) -> int:
        return self.out.position
