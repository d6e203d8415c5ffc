"""The Python API: ``open_dump(path)`` -> one ``Dump`` for any dump vmcap reads.

A ``Dump`` is the plain ELF core a dump stands for, read in place: a plain
ELF core as it is, a zelf file through its seek table (only the frames a
read touches are decompressed), a kdump or flattened kdump file (or the
files of a makedumpfile --split set) through its page descriptors
(vmcap.source.elfview). ``vmcap mount`` serves ``Dump.elf`` as DIR/vmcore;
``vmcap.drgn_bridge`` hands ``Dump.physical`` to drgn.

    with vmcap.open_dump("dump.zelf") as dump:
        print(dump.describe())
        banner = dump.physical.read(0x1000000, 64)

A flattened stream compressed whole (gzip, xz, lz4, zstd without a seek
table) is read once, in order, by `vmcap save` only: it has no random
access, so ``open_dump`` refuses it (Unsupported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BadSource, SourceIOError, Unsupported
from .fileio.mmapio import FileSource
from .source.dumpfile import ElfPhysicalView, ZstdSource, compressed_wrapper, detect_container
from .source.layout import Layout, read_layout


@dataclass(frozen=True)
class Platform:
    """The dumped machine, as the ELF view's header and VMCOREINFO say."""

    arch: str  # "x86_64", "aarch64", ...
    machine: str  # ELF e_machine name, "EM_X86_64"
    e_machine: int
    elf_class: int  # 32 or 64
    byte_order: str  # "little" or "big"
    page_size: int  # the kernel's page size


class PhysicalMemory:
    """A dump's physical memory: ``read(paddr, size)`` and the ranges the file stores.

    Memory a PT_LOAD covers beyond its stored bytes (p_memsz past p_filesz:
    pages a dump level left out) reads as zeros, as from the ELF core;
    an address no PT_LOAD covers is an error (BadSource).
    """

    def __init__(self, layout: Layout, elf):
        self._view = ElfPhysicalView(layout, elf)
        self.segments = layout.segments  # PT_LOADs: paddr, memsz, filesz, vaddr, offset

    def read(self, paddr: int, size: int) -> bytes:
        """Bytes at [paddr, paddr+size), which may span back-to-back segments."""
        return self._view.read_physical(paddr, size)

    def read_segment(self, segment, paddr: int, size: int) -> bytes:
        """Bytes at paddr within one PT_LOAD (as a debugger reads that segment)."""
        return self._view.read(paddr, size, segment=segment)

    def stored_ranges(self) -> list[tuple[int, int]]:
        """(paddr, size) of the memory whose bytes the dump stores, as in its PT_LOADs."""
        return self._view.stored_ranges()


def open_elf_view(path):
    """(a Source of the plain ELF core a dump stands for, its container name).

    ``path`` is a file, or a list: the files of a makedumpfile --split set.
    The Source reads in place; nothing is decompressed ahead of a read.
    """
    if not isinstance(path, str):
        paths = [str(p) for p in path]
        if len(paths) > 1:
            from .source.dumpfile import check_split_set_paths
            from .source.kdump_memory import open_kdump_view

            check_split_set_paths(paths)
            return open_kdump_view(paths)[0], "kdump-split"
        path = paths[0]
    path = str(path)
    container = detect_container(path)
    if container in ("kdump", "kdump-flat"):
        from .source.kdump_memory import open_kdump_view

        return open_kdump_view(path)[0], container
    if container == "zstd-seekable":
        return ZstdSource(path), "zelf"
    if container == "elf":
        return FileSource(path), "elf"
    wrapper = compressed_wrapper(path)
    if wrapper is not None:
        raise Unsupported(f"{path}: compressed whole with {wrapper}, which allows no random "
                          "access; decompress it first, or `vmcap save` it to a zelf file")
    if container == "zstd":
        raise BadSource(f"{path}: zstd-compressed without a seek table (a zelf file cut short "
                        "loses it; `zstd -d` restores whatever frames are whole)")
    raise BadSource(f"{path}: not a dump vmcap reads (an ELF core, zelf, kdump or flattened "
                    "kdump file)")


class Dump:
    """One opened dump: its platform, VMCOREINFO, physical memory and ELF view.

    ``elf`` is a Source (``pread(offset, length)``, ``size``) of the plain
    ELF core the dump stands for; ``layout`` its headers and notes.
    """

    def __init__(self, path, *, page_size: int | None = None,
                 vmcoreinfo: bytes | None = None):
        single = isinstance(path, (str, os.PathLike))
        self.paths = [os.fspath(path)] if single else [os.fspath(p) for p in path]
        self.elf, self.container = open_elf_view(self.paths)
        self.path = self.elf.name
        try:
            self.layout: Layout = read_layout(self.elf, page_size=page_size,
                                              vmcoreinfo=vmcoreinfo)
        except BaseException:
            self.elf.close()
            raise
        layout = self.layout
        self.platform = Platform(arch=layout.arch, machine=layout.machine,
                                 e_machine=layout.e_machine, elf_class=layout.elf_class,
                                 byte_order=layout.byte_order, page_size=layout.page_size)
        self.physical = PhysicalMemory(layout, self.elf)

    @property
    def vmcoreinfo(self) -> dict[str, str]:
        """VMCOREINFO as KEY -> value ({} when the dump has none)."""
        return self.layout.vmcoreinfo

    @property
    def vmcoreinfo_raw(self) -> bytes:
        """The VMCOREINFO note's text, as the kernel wrote it."""
        return self.layout.vmcoreinfo_raw

    @property
    def size(self) -> int:
        """Bytes of the ELF view (the size of the plain file `vmcap decompress` would write)."""
        return self.elf.size

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes of the ELF view at [offset, offset+length), cut at its end."""
        length = max(0, min(length, self.elf.size - offset))
        if offset < 0 or not length:
            return b""
        return self.elf.pread(offset, length)

    def describe(self) -> dict:
        """A short JSON-able summary: container, platform, kernel, memory."""
        layout = self.layout
        stored = sum(size for _, size in self.physical.stored_ranges())
        return {
            "path": self.path,
            "container": self.container,
            "arch": self.platform.arch,
            "machine": self.platform.machine,
            "elf_class": self.platform.elf_class,
            "byte_order": self.platform.byte_order,
            "page_size": self.platform.page_size,
            "osrelease": layout.osrelease,
            "crash_time": layout.crash_time,
            "cpus": layout.cpus,
            "segments": len(layout.segments),
            "memory_bytes": layout.memory_bytes,
            "stored_bytes": stored,
            "elf_size": self.elf.size,
        }

    def close(self) -> None:
        self.elf.close()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dump(path, *, page_size: int | None = None, vmcoreinfo: bytes | None = None) -> Dump:
    """Open any dump vmcap reads (ELF core, zelf, kdump, flattened kdump, or a list: the
    files of a --split set). Errors are vmcap.errors classes (BadSource, Unsupported, ...)."""
    return Dump(path, page_size=page_size, vmcoreinfo=vmcoreinfo)


__all__ = ["Dump", "Platform", "PhysicalMemory", "open_dump", "open_elf_view",
           "BadSource", "SourceIOError", "Unsupported"]
