"""Where output bytes go: an atomic file (private temporary, fsync, rename) or stdout.

A dump that is half written under its final name looks like a dump; a
script that finds it later cannot tell. So the bytes go to a temporary file
of our own beside OUT, which is fsynced and given OUT's name only when
everything succeeded, and removed on any failure (disk full, EIO, Ctrl-C).

vmcap runs as root, often in directories other users can write (/var/crash,
/tmp). Nothing there may be trusted: OUT must be a regular file or absent
(never a device node, FIFO, socket, symbolic link or directory); the
temporary file is created fresh (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600) under
a random name and never reused; without --force the final step cannot
replace a file that appeared at OUT meanwhile. Every step works on one
descriptor of OUT's directory, so a directory swapped under the path later
does not redirect the commit.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Sequence

import numpy as np

from ..errors import OutputError, OutputFull

SPARSE_BLOCK = 4096
TEMP_SUFFIX = ".part"
# Name bytes of OUT kept in the temporary name: ".", 8 random hex digits and
# the suffix must still fit NAME_MAX (255).
_TEMP_NAME_KEEP = 200
_CREATE_ATTEMPTS = 100
# link() errors that mean "this filesystem has no hard links" (vfat, exfat,
# many FUSE filesystems): commit falls back to check-then-rename.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# Write errors that mean "it does not fit": a dump level list retries at the
# next level on these, and the last level keeps what was written.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The tail reserve grows ahead of the data in steps of at least this much,
# so the allocation is one syscall per step, not per write.
_RESERVE_STEP = 8 << 20

_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISLNK, "is a symbolic link"),
    (stat.S_ISCHR, "is a character device"),
    (stat.S_ISBLK, "is a block device"),
    (stat.S_ISFIFO, "is a FIFO"),
    (stat.S_ISSOCK, "is a socket"),
)


def temp_name_for(name: str) -> str:
    """A fresh temporary name for OUT's basename: ``.NAME.XXXXXXXX.part``."""
    kept = os.fsdecode(os.fsencode(name)[:_TEMP_NAME_KEEP])
    return f".{kept}.{_random_tag()}{TEMP_SUFFIX}"


def _random_tag() -> str:
    # os.urandom is what secrets.token_hex reads; secrets itself pulls in hmac, hashlib and
    # OpenSSL's libcrypto (3.4 MiB resident) for nothing.
    return os.urandom(4).hex()


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode cannot be an output, or None for a regular file."""
    for test, what in _KINDS:
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else "is not a regular file"


def _split(path: str) -> tuple[str, str]:
    """(directory, name) of an output path; the directory as the user wrote it."""
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise OutputError(f"{path}: is a directory")
    return directory or ".", name


def _refusal(path: str, mode: int, force: bool) -> OutputError | None:
    """The error for an existing entry of this mode at OUT, or None if it may be replaced."""
    what = _not_regular(mode)
    if what is not None:
        # A symlink is refused too: writing through it is the attack, and
        # silently replacing a link the user named would surprise them.
        return OutputError(f"{path}: {what}; vmcap writes only regular files "
                           "(or '-' for standard output)")
    if not force:
        return OutputError(f"{path}: already exists (use --force to overwrite)")
    return None


def check_output_target(path: str, force: bool) -> None:
    """Refuse an output path before anything is written: not a regular file,
    exists without --force, or its directory is missing. "-" (stdout) passes."""
    if path == "-":
        return
    directory, _ = _split(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{path}: cannot check: {e.strerror}") from None
    if st is not None:
        error = _refusal(path, st.st_mode, force)
        if error is not None:
            raise error
    if not os.path.isdir(directory):
        raise OutputError(f"{path}: directory {directory} does not exist")


def file_identity(path: str, *, existing: bool = False):
    """What makes two paths the same file, or None if it cannot be known.

    An existing file is its (st_dev, st_ino), so hard links and symlinks to it
    match; a path not yet there (unless ``existing`` is asked for) is its
    directory's (st_dev, st_ino) plus its name. "-" is whatever standard
    output is open on.
    """
    try:
        if path == "-":
            st = os.fstat(sys.stdout.fileno())
        else:
            st = os.stat(path)
        return ("file", st.st_dev, st.st_ino)
    except (OSError, ValueError, AttributeError):
        pass
    if path == "-" or existing:
        return None
    try:
        directory, name = os.path.split(path)
        parent = os.stat(directory or ".")
    except OSError:
        return None
    return ("new", parent.st_dev, parent.st_ino, name)


def refuse_same_files(inputs: Sequence[tuple[str, str]],
                      outputs: Sequence[tuple[str, str | None]]) -> None:
    """OutputError if an output is an input, or two outputs are one file.

    ``inputs`` and ``outputs`` are (role, path) pairs; a None path is skipped,
    a missing input too (opening it reports that). Called before anything is
    written: an output that is the source, or two outputs that are one file,
    would destroy data that was meant to be kept.
    """
    seen: list[tuple[object, str, str]] = []
    for role, path in inputs:
        identity = file_identity(path, existing=True)
        if identity is not None:
            seen.append((identity, role, path))
    for role, path in outputs:
        if path is None:
            continue
        identity = file_identity(path)
        if identity is None:
            continue
        for other_identity, other_role, other_path in seen:
            if identity == other_identity:
                raise OutputError(f"{path}: {role} is the same file as {other_role} "
                                  f"{other_path}; refusing to overwrite it")
        seen.append((identity, role, path))


def write_error(what: str, error: OSError) -> OutputError:
    """The OutputError for a failed write: OutputFull when the output does not fit."""
    return (OutputFull if error.errno in NO_ROOM_ERRNOS else OutputError)(what)


# Early writeback's stride (OutputFile.wrote_through).
WRITEBACK_BYTES = 32 << 20


class OutputFile:
    """A byte sink on a file descriptor that turns OSError into one-line OutputErrors.

    A named output lives in a temporary file (``temp_name``, in OUT's
    directory) until commit() gives it OUT's name; abort() is the one place
    that decides what becomes of it on failure: removed, unless the writer
    registered a way to finish it as an incomplete dump (keep_incomplete)
    and the failure was the output's own (disk full, EIO, size limit).

    ``size_limit`` caps the file's size (makedumpfile -L): a write past it
    raises OutputFull, as a full disk does.
    """

    def __init__(self, path: str, *, force: bool = False, mode: int = 0o600,
                 size_limit: int | None = None):
        self.path = path
        self.force = force
        self.to_stdout = path == "-"
        self.position = 0
        self.size_limit = size_limit
        # Bytes kept allocated past the data for metadata written at the end
        # (set_tail_reserve); _allocated_end is how far the file is allocated.
        self.tail_reserve = 0
        self._allocated_end = 0
        self._finish_incomplete = None  # see keep_incomplete()
        self.temp_name: str | None = None  # set while a temporary file of ours exists
        # Early writeback (see wrote_through): the end of the last range handed to the
        # kernel, and where that range began; None where there is no file of ours.
        self._writeback_to: int | None = None
        self._writeback_from = 0
        self._closed = not self.to_stdout  # no descriptor of ours yet
        self._dir_fd: int | None = None
        self._identity: tuple[int, int] | None = None
        if self.to_stdout:
            self.fd = sys.stdout.buffer.fileno()
            sys.stdout.flush()
            st = os.fstat(self.fd)
            self.seekable = stat.S_ISREG(st.st_mode) and os.lseek(self.fd, 0, os.SEEK_CUR) == 0
            return
        directory, self.name = _split(path)
        try:
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise OutputError(f"{path}: directory {directory} does not exist") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot open directory {directory}: {e.strerror}") from None
        try:
            self._check_target()
            self.fd = self._create_temp(mode)
            self._closed = False
            self._writeback_to = 0
        except BaseException:
            self.abort()
            raise
        self.seekable = True

    def _lstat_target(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OutputError(f"{self.path}: cannot check: {e.strerror}") from None

    def _check_target(self) -> None:
        """OUT must be absent, or (with --force) a regular file."""
        st = self._lstat_target()
        if st is not None:
            error = _refusal(self.path, st.st_mode, self.force)
            if error is not None:
                raise error

    def _create_temp(self, mode: int) -> int:
        """Create a new private temporary file; never opens anything already there."""
        # O_EXCL: fail rather than open an existing file (a planted one keeps
        # its owner and mode); with O_CREAT it also refuses any symlink, and
        # O_NOFOLLOW says so twice. A collision just means another name.
        # O_RDWR: writers read back what they wrote (the kdump metadata
        # digest) through this fd, with no /proc to reopen it (an initramfs).
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(_CREATE_ATTEMPTS):
            name = temp_name_for(self.name)
            try:
                # Kernel memory holds keys and passwords: owner-only by default.
                fd = os.open(name, flags, mode, dir_fd=self._dir_fd)
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create {name}: {e.strerror}") from None
            self.temp_name = name
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino)
            return fd
        raise OutputError(f"{self.path}: cannot create a temporary file: "
                          f"{_CREATE_ATTEMPTS} names taken")

    def _temp_is_ours(self) -> bool:
        """Is the temporary name still the file we created (not swapped by someone)?"""
        try:
            st = os.stat(self.temp_name, dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _fail(self, what: str, error: OSError) -> OutputError:
        name = "standard output" if self.to_stdout else self.path
        reason = error.strerror or errno.errorcode.get(error.errno, str(error))
        return write_error(f"{name}: {what} failed at offset {self.position:#x}: {reason}", error)

    def _limit_error(self, end: int) -> OutputFull:
        name = "standard output" if self.to_stdout else self.path
        return OutputFull(f"{name}: size limit of {self.size_limit} bytes reached at offset "
                          f"{self.position:#x}")

    def check_room(self, end: int) -> None:
        """OutputFull if data up to ``end`` would not leave room for the tail reserve.

        Checked before writing, so the reserve is still whole when the data
        stops: the metadata that makes the data readable always fits.
        """
        need = end + self.tail_reserve
        if self.size_limit is not None and need > self.size_limit:
            raise self._limit_error(end)
        if self.tail_reserve and need > self._allocated_end:
            self._allocate(max(need, self._allocated_end + _RESERVE_STEP), need)

    def _allocate(self, want_end: int, need_end: int) -> None:
        """Allocate the file up to ``want_end`` (posix_fallocate, which glibc emulates
        with real zeros where the filesystem cannot); if that much is not free, up to
        ``need_end``; else OutputFull, before any byte of the write is attempted."""
        for stop in (want_end, need_end):
            if stop <= self._allocated_end:
                return
            try:
                os.posix_fallocate(self.fd, self._allocated_end, stop - self._allocated_end)
            except OSError as e:
                if e.errno in NO_ROOM_ERRNOS:
                    continue
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL,
                               errno.ESPIPE, errno.ENODEV):
                    self.tail_reserve = 0  # cannot reserve here: best effort, as before
                    return
                raise self._fail("allocating", e) from None
            self._allocated_end = stop
            return
        # The reserve stays free: the dump's metadata goes there.
        raise OutputFull(f"{self.path}: write failed at offset {self.position:#x}: "
                         f"{os.strerror(errno.ENOSPC)}")

    def set_tail_reserve(self, nbytes: int) -> None:
        """Keep ``nbytes`` allocated past the data from now on (a seekable file only).

        Formats whose metadata goes at the end (the zelf seek table, the
        kdump-flat headers) need room for it when the disk fills up.
        """
        if self.to_stdout or not self.seekable:
            return
        self.tail_reserve = nbytes
        self.check_room(self.position)

    def reserve_range(self, offset: int, length: int) -> None:
        """Allocate [offset, offset+length) now, for metadata written there later
        (the kdump headers, bitmaps and descriptor table before the page data)."""
        if self.to_stdout or length <= 0:
            return
        if self.size_limit is not None and offset + length > self.size_limit:
            raise self._limit_error(offset + length)
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            if e.errno in NO_ROOM_ERRNOS:
                raise self._fail("reserving room for the dump's metadata", e) from None
            # A filesystem that cannot allocate ahead: metadata is written as before.

    def use_tail_reserve(self) -> None:
        """The data has stopped: the metadata may now go into the reserve."""
        self.tail_reserve = 0

    def keep_incomplete(self, finish) -> None:
        """Register how to turn a failed output into a readable, flagged incomplete dump.

        ``finish()`` is called by abort() after an output failure; it writes
        the metadata for what is there and returns a one-line account of it
        ("N of M bytes of memory ..."), or None when no memory was written.
        """
        self._finish_incomplete = finish

    def truncate(self, size: int) -> None:
        """Cut the file to ``size`` bytes (dropping a partly written unit) and write on from there."""
        try:
            os.ftruncate(self.fd, size)
            os.lseek(self.fd, size, os.SEEK_SET)
        except OSError as e:
            raise self._fail("truncating", e) from None
        self.position = size
        self._allocated_end = min(self._allocated_end, size)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self.size_limit is not None or self.tail_reserve:
            self.check_room(self.position + len(view))
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
        self.wrote_through(self.position)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        if self.size_limit is not None and offset + len(view) > self.size_limit:
            raise self._limit_error(offset + len(view))
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                raise self._fail("write", e) from None
        self.wrote_through(offset + len(view))

    def wrote_through(self, end: int) -> None:
        """Bytes up to ``end`` were written (by write, pwrite, or a sink on our fd).

        Early writeback: every WRITEBACK_BYTES of file, the kernel starts writing the
        new range out, and drops the range before it, written out by then, from the cache.

        commit()'s fsync then waits for the last stretch only, not for the whole
        dump (on a big machine the kernel lets gigabytes stay dirty), and the
        output's pages leave the page cache as it goes.
        Advice only: what the kernel fails to write, fsync reports.
        """
        if self._writeback_to is None or end - self._writeback_to < WRITEBACK_BYTES:
            return
        try:
            os.posix_fadvise(self.fd, self._writeback_from, end - self._writeback_from,
                             os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            self._writeback_to = None  # not a file the kernel takes advice on: stop asking
            return
        self._writeback_from, self._writeback_to = self._writeback_to, end

    def skip(self, n: int) -> None:
        """Leave a hole of n bytes (a sparse region) — or write zeros where we cannot seek."""
        if not self.seekable:
            self.write_zeros(n)
            return
        if self.size_limit is not None:
            self.check_room(self.position + n)  # a hole still makes the file that long
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

    def _sync(self) -> None:
        """Cut the file to its data (a tail reserve) or extend it over a final hole; fsync."""
        if os.fstat(self.fd).st_size != self.position:
            os.ftruncate(self.fd, self.position)
        os.fsync(self.fd)

    def commit(self) -> None:
        """Make the output durable and give it its final name.

        On an error the temporary file is still there for abort().
        """
        if self.to_stdout:
            self._closed = True
            return
        try:
            self._sync()
        except OSError as e:
            raise self._fail("finishing", e) from None
        if not self._temp_is_ours():
            raise OutputError(f"{self.path}: temporary file {self.temp_name} was removed or "
                              "replaced while writing; nothing saved")
        self._publish()
        self._close_fd()
        try:
            os.fsync(self._dir_fd)
        except OSError:
            pass  # the new name is in place; a directory fsync is best effort
        self._close_dir()

    def _publish(self) -> None:
        """Give the finished temporary file OUT's name."""
        if not self.force:
            try:
                # link() fails with EEXIST whatever appeared at OUT since the
                # start (file, symlink, device node): nothing of theirs is touched.
                os.link(self.temp_name, self.name, src_dir_fd=self._dir_fd,
                        dst_dir_fd=self._dir_fd, follow_symlinks=False)
            except FileExistsError:
                raise self._appeared() from None
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise self._fail("finishing", e) from None
                # No hard links here (vfat, exfat, many FUSE filesystems):
                # check that OUT is still absent, then rename. A file created
                # in the microseconds between the two would be replaced, but
                # these filesystems have no symlinks, device nodes or owners
                # to plant, so all such a race can do is lose that file, the
                # same as --force would. (renameat2 RENAME_NOREPLACE would
                # close the window but has no Python wrapper.)
                if self._lstat_target() is not None:
                    raise self._appeared() from None
                self._rename()
                return
            temp, self.temp_name = self.temp_name, None
            try:
                os.unlink(temp, dir_fd=self._dir_fd)
            except OSError:
                pass  # OUT is complete; a second name of it is all that is left
            return
        # --force: replace only a regular file. rename() never follows a
        # symlink at OUT nor writes into a device; should one be planted
        # between this check and the rename, that directory entry is replaced,
        # its target left as it was.
        self._check_target()
        self._rename()

    def _appeared(self) -> OutputError:
        return OutputError(f"{self.path}: appeared while writing (use --force to overwrite); "
                           "left untouched, nothing saved")

    def _rename(self) -> None:
        try:
            os.rename(self.temp_name, self.name, src_dir_fd=self._dir_fd,
                      dst_dir_fd=self._dir_fd)
        except OSError as e:
            raise self._fail("finishing", e) from None
        self.temp_name = None

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            try:
                os.close(self._dir_fd)
            except OSError:
                pass
            self._dir_fd = None

    def abort(self, error: BaseException | None = None) -> str | None:
        """The one place a failed output's fate is decided.

        After an output failure (``error`` an OutputError: disk full, EIO,
        the size limit) the memory already written is a dump that cannot be
        taken again: if the writer registered keep_incomplete(), the file is
        finished as a flagged incomplete dump and given OUT's name, and the
        account of what it holds is returned. A script that renames OUT on
        success still sees the non-zero exit. Anything else (a stop signal:
        the user asked to stop; a bad source; no memory written; the
        finishing failing too) removes the temporary file, as does a call
        without ``error``.

        Removes only the temporary file this object created (checked by
        device and inode), never OUT or anything planted. Never raises.
        """
        if self.to_stdout:
            return None
        kept = None
        if (isinstance(error, OutputError) and self._finish_incomplete is not None
                and not self._closed and self.temp_name is not None
                and self._dir_fd is not None and self._temp_is_ours()):
            kept = self._keep_incomplete()
        self._close_fd()
        if kept is None and self.temp_name is not None and self._dir_fd is not None \
                and self._temp_is_ours():
            try:
                os.unlink(self.temp_name, dir_fd=self._dir_fd)
            except OSError:
                pass
        self.temp_name = None
        self._close_dir()
        return kept

    def _keep_incomplete(self) -> str | None:
        """Finish the incomplete dump and publish it as OUT; None if it cannot be."""
        finish, self._finish_incomplete = self._finish_incomplete, None
        self.size_limit = None  # the limit counted the reserve: the metadata fits in it
        self.use_tail_reserve()
        try:
            account = finish()
            if account is None:
                return None
            self._sync()
            if not self._temp_is_ours():
                return None
            self._publish()
        except Exception:
            return None
        try:
            os.fsync(self._dir_fd)
        except OSError:
            pass
        return account


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


def write_whole_file(path: str, data: bytes, *, force: bool = False) -> None:
    """A small output (a kernel log) written whole, with every OutputFile guarantee."""
    out = OutputFile(path, force=force, mode=0o600)
    try:
        out.write(data)
        out.commit()
    except BaseException:
        out.abort()
        raise
