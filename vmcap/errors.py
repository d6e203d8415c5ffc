"""The few exception classes vmcap raises on purpose.

Each carries a one-line message that says what went wrong and where (a file
offset or physical address). cli.py maps each class to one exit code; nothing
else in the package knows about exit codes.

One read-error type per layer, whatever the container:
  fileio   a read of the source or a dump file failed (EIO, short read): SourceIOError;
           a mapping refused is mmapio.MmapRefused, which never leaves the copier
           (it falls back to pread)
  formats  stored bytes that do not decode or do not add up: CorruptOutput (a codec's own
           error, pagecodecs.PageDataError, becomes one where the page is read)
  source   a physical address the dump does not hold: BadSource
  kernel   a kernel structure or VMCOREINFO value that makes no sense: BadSource; knowledge
           vmcap lacks (a key, an architecture): Unsupported
"""

from __future__ import annotations


class VmcapError(Exception):
    """Base class: an expected failure with a one-line message."""


class BadSource(VmcapError):
    """The source is not a usable vmcore (not ELF, not a core, truncated, inconsistent)."""


class SourceIOError(VmcapError):
    """Reading the source failed (EIO, short read) at a known offset / physical address."""

    def __init__(self, message: str, offset: int | None = None, paddr: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.paddr = paddr


class OutputError(VmcapError):
    """The output could not be written (exists, unwritable, disk full, EIO)."""


class OutputFull(OutputError):
    """The output does not fit: the disk (or quota) is full, or the size limit was reached.

    A dump level list retries at the next level on this error alone.
    """


class CorruptOutput(VmcapError):
    """A vmcap output (seekable zstd, kdump) is damaged: bad frame, bad seek table."""


class VerifyMismatch(VmcapError):
    """`vmcap verify --source` found a byte that differs from the source."""


class Unsupported(VmcapError):
    """A valid request vmcap cannot honour (e.g. a dump level needing missing VMCOREINFO)."""
