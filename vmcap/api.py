"""The Python API: ``open_dump(path)`` -> one ``Dump`` for any dump vmcap reads.

A ``Dump`` (vmcap.source.dump) is the plain ELF core a dump stands for,
read in place: a plain ELF core as it is, a zelf file through its seek
table (only the frames a read touches are decompressed), a kdump or
flattened kdump file (or the files of a makedumpfile --split set) through
its page descriptors. ``vmcap mount`` serves ``Dump.elf`` as DIR/vmcore;
``vmcap.drgn_bridge`` hands ``Dump.physical`` to drgn.

    with vmcap.open_dump("dump.zelf") as dump:
        print(dump.platform.arch, dump.describe()["osrelease"])
        banner = dump.physical.read(0x1000000, 64)

A flattened stream compressed whole (gzip, xz, lz4, zstd without a seek
table) is read once, in order, by `vmcap save` only: it has no random
access, so ``open_dump`` refuses it (Unsupported), as it refuses a file
that is no dump (BadSource).
"""

from __future__ import annotations

from .errors import BadSource, SourceIOError, Unsupported
from .kernel.arch import Platform
from .source import dump as _dump
from .source.dump import Dump, PhysicalMemory


def open_dump(path, *, page_size: int | None = None, vmcoreinfo: bytes | None = None) -> Dump:
    """Open any dump vmcap reads (ELF core, zelf, kdump, flattened kdump, or a list: the
    files of a --split set). Errors are vmcap.errors classes (BadSource, Unsupported, ...)."""
    return _dump.open_dump(path, page_size=page_size, vmcoreinfo=vmcoreinfo, strict=True)


__all__ = ["Dump", "Platform", "PhysicalMemory", "open_dump", "BadSource", "SourceIOError",
           "Unsupported"]
