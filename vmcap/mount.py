"""`vmcap mount DUMP DIR`: a dump's plain ELF view as DIR/vmcore, read-only, over FUSE.

crash, gdb and drgn open DIR/vmcore as they open a plain vmcore; each read
is answered from the dump in place (vmcap.source.dump.Dump): a zelf file
decompresses only the frames a read touches (the seekable reader keeps a
few decompressed frames), a kdump file reads the pages its descriptors
point at. Nothing is written anywhere; memory does not grow with the dump.

The FUSE loop (libfuse 3 or 2 through mfusepy, single-threaded: the dump
readers are not thread-safe and the GIL would serialise the work anyway)
runs in a worker thread with the stop signals blocked, so SIGINT, SIGTERM
and SIGHUP reach the main thread as vmcap.process's ``Interrupted``. Stopping
sets a flag, and a lookup of a name that cannot exist makes the loop's
thread call fuse_exit from inside a FUSE callback (where mfusepy can find
the session); libfuse then unmounts DIR itself, as on its own Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import threading

from .errors import OutputError, Unsupported, VmcapError

FUSE_DEVICE = "/dev/fuse"
VMCORE = "/vmcore"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READ_ERRORS_REPORTED = 20  # then one line saying the rest are not reported
STOP_POKE_SECONDS = 0.5
# A loop stuck in a read (a dump on a hung NFS server) must not keep vmcap
# from exiting with the stop signals blocked.
STOP_GIVE_UP_SECONDS = 30


def load_fuse():
    """The mfusepy module, or Unsupported saying what is missing."""
    try:
        import mfusepy
    except ImportError:
        raise Unsupported("FUSE is not available: the Python package mfusepy is not "
                          "installed (pip install mfusepy)") from None
    except OSError:  # mfusepy looks libfuse up when imported
        raise Unsupported("FUSE is not available: libfuse is not installed (Debian: "
                          "apt install fuse3)") from None
    return mfusepy


def check_fuse_device(device: str = FUSE_DEVICE) -> None:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unsupported(f"FUSE is not available: {device} does not exist (the kernel's "
                          "fuse module is not loaded: modprobe fuse; in a container, pass "
                          "the device in)") from None
    except OSError as e:
        raise Unsupported(f"FUSE is not available: {device}: {e.strerror}") from None
    os.close(fd)


def check_mount_point(directory: str) -> None:
    """DIR must be an empty directory that is not a mount point already."""
    try:
        st = os.stat(directory)
    except OSError as e:
        hint = (" (a FUSE mount whose process is gone: umount -l it)"
                if e.errno == errno.ENOTCONN else "")
        raise OutputError(f"{directory}: {e.strerror}{hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{directory}: not a directory")
    if os.path.ismount(directory):
        raise OutputError(f"{directory}: already a mount point")
    try:
        entries = os.listdir(directory)
    except OSError as e:
        raise OutputError(f"{directory}: {e.strerror}") from None
    if entries:
        raise OutputError(f"{directory}: not an empty directory (the mount would hide "
                          f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")


def check_can_mount(directory: str):
    """Everything a mount needs that is not the dump: mfusepy and libfuse,
    /dev/fuse, an empty DIR. Returns the mfusepy module."""
    check_fuse_device()
    fuse = load_fuse()
    check_mount_point(directory)
    return fuse


class ViewFilesystem:
    """The FUSE operations of a directory holding one read-only file, ``vmcore``.

    mfusepy calls these from the loop's thread; an OSError becomes its errno.
    """

    use_ns = True  # times in nanoseconds (mfusepy's non-deprecated convention)

    def __init__(self, dump, fuse_exit, on_mounted, report=None):
        self.dump = dump
        self._fuse_exit = fuse_exit
        self._on_mounted = on_mounted
        self._report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.stopping = False
        self.read_errors = 0
        st = os.stat(dump.paths[0])
        self._times = {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                       "st_ctime": st.st_mtime_ns}
        self._owner = {"st_uid": os.getuid(), "st_gid": os.getgid()}

    def init(self, path):
        self._on_mounted()

    def getattr(self, path, fh=None):
        if self.stopping:
            # vmcap.mount.Mount.stop's lookup: end the loop from inside a callback.
            self._fuse_exit()
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0,
                    **self._times, **self._owner}
        if path == VMCORE:
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": self.dump.size,
                    "st_blocks": -(-self.dump.size // 512), **self._times, **self._owner}
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    def readdir(self, path, fh):
        if path != "/":
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return [".", "..", VMCORE[1:]]

    def open(self, path, flags):
        if path != VMCORE:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return 0

    def read(self, path, size, offset, fh):
        try:
            return self.dump.pread(offset, size)
        except VmcapError as error:
            # A damaged frame or an unreadable page: the reader gets EIO and
            # the user a line saying where (the loop goes on serving).
            self.read_errors += 1
            if self.read_errors <= READ_ERRORS_REPORTED:
                self._report(f"vmcap: warning: read of {size} bytes at offset {offset:#x} "
                             f"failed (EIO returned): {error}")
                if self.read_errors == READ_ERRORS_REPORTED:
                    self._report("vmcap: warning: further read errors are not reported")
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    def statfs(self, path):
        blocks = -(-self.dump.size // 4096)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": 1, "f_ffree": 0, "f_namemax": 255}


class _StderrCapture:
    """libfuse reports mount failures on fd 2, in lines of its own; while the
    mount is being set up they go to a pipe, so vmcap can say them in its one line."""

    def __init__(self):
        self._lock = threading.Lock()
        self._saved = os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)

    def restore(self) -> None:
        with self._lock:
            if self._saved >= 0:
                os.dup2(self._saved, 2)
                os.close(self._saved)
                self._saved = -1

    def text(self) -> str:
        """What was captured (call after restore)."""
        os.set_blocking(self._read, False)
        chunks = []
        try:
            while chunk := os.read(self._read, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(self._read)
        return b"".join(chunks).decode(errors="replace")


class Mount:
    """One FUSE mount of a Dump, its loop in a worker thread."""

    def __init__(self, dump, directory: str, *, allow_other: bool = False):
        self.fuse = check_can_mount(directory)
        self.dump = dump
        self.directory = os.path.abspath(directory)
        self.allow_other = allow_other
        self.mounted = threading.Event()
        # Set when the loop's thread is done. Waits are on events, never on
        # Thread.join: a stop signal raising inside join makes Python < 3.13
        # take the thread for finished while it still runs (gh-90882).
        self.finished = threading.Event()
        self._capture: _StderrCapture | None = None
        self._cwd = -1
        self.filesystem = ViewFilesystem(dump, self.fuse.fuse_exit, self._on_mounted)
        self.failure: BaseException | None = None
        self.failure_text = ""
        self._thread = threading.Thread(target=self._serve, name="vmcap-fuse", daemon=True)

    def _on_mounted(self) -> None:
        self._restore_process_state()
        self.mounted.set()

    def _restore_process_state(self) -> None:
        """Undo what libfuse's fuse_main does to the whole process while it
        mounts: fd 2 (our capture) and the working directory (it chdirs to /)."""
        if self._capture is not None:
            self._capture.restore()
        if self._cwd >= 0:
            try:
                os.fchdir(self._cwd)
            except OSError:
                pass
            os.close(self._cwd)
            self._cwd = -1

    def _serve(self) -> None:
        # Stop signals go to the main thread (vmcap.process), never to the loop:
        # threads libfuse starts inherit this mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._capture = _StderrCapture()
        options = {"foreground": True, "nothreads": True, "ro": True,
                   "fsname": "vmcap", "subtype": "vmcap", "kernel_cache": True}
        if self.allow_other:
            options["allow_other"] = True
        try:
            self.fuse.FUSE(self.filesystem, self.directory, **options)
        except BaseException as error:  # mfusepy: RuntimeError(libfuse's code), or a callback's
            self.failure = error
        finally:
            self._restore_process_state()
            self.failure_text = " ".join(self._capture.text().split())
            self.finished.set()

    def start(self) -> None:
        """Mount; return once DIR/vmcore answers (or raise why it cannot)."""
        self._thread.start()
        while not self.mounted.is_set() and not self.finished.is_set():
            self.mounted.wait(0.1)
        if not self.mounted.is_set():
            self.finished.wait()
            self._raise_failure()

    def _raise_failure(self) -> None:
        said = self.failure_text.replace("fuse: ", "")
        if not said:
            said = f"libfuse failed ({type(self.failure).__name__}: {self.failure})"
        raise Unsupported(f"cannot mount on {self.directory}: {said}")

    def wait(self) -> None:
        """Until DIR is unmounted by someone else (`umount DIR`, fusermount3 -u DIR)."""
        while not self.finished.wait(1.0):
            pass
        if self.failure is not None and not isinstance(self.failure, RuntimeError):
            raise self.failure

    def stop(self) -> None:
        """End the loop; libfuse unmounts DIR. Stop signals wait until it is done."""
        if not self._thread.ident or self.finished.is_set():
            return
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.filesystem.stopping = True
            attempt = 0
            while not self.finished.is_set():
                if attempt * STOP_POKE_SECONDS >= STOP_GIVE_UP_SECONDS:
                    print(f"vmcap: warning: the FUSE loop did not stop in "
                          f"{STOP_GIVE_UP_SECONDS} s; unmount with `umount -l "
                          f"{self.directory}`", file=sys.stderr, flush=True)
                    return
                if self.mounted.is_set():
                    # A lookup of a fresh name always reaches the loop (no
                    # cached negative entry); in a thread of its own, so a
                    # loop that is gone cannot hang the main thread.
                    poke = os.path.join(self.directory, f".vmcap-stop-{os.getpid()}-{attempt}")
                    threading.Thread(target=_lookup, args=(poke,), daemon=True).start()
                self.finished.wait(STOP_POKE_SECONDS)
                attempt += 1
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _lookup(path: str) -> None:
    try:
        os.stat(path)
    except OSError:
        pass


def serve(dump, directory: str, *, allow_other: bool = False, on_ready=None) -> None:
    """Mount ``dump`` on ``directory`` until it is unmounted or a stop signal
    (Interrupted) arrives; DIR is unmounted before this returns or raises."""
    mount = Mount(dump, directory, allow_other=allow_other)
    try:
        mount.start()
        if on_ready is not None:
            on_ready(mount)
        mount.wait()
    finally:
        mount.stop()
