"""Opening any dump vmcap can read, and reading its physical memory.

A dump comes in one of three containers:

* ``elf``: a plain ELF core (/proc/vmcore, a saved vmcore, QEMU's dump,
  vmcap's ``--format elf``);
* ``zstd-seekable``: vmcap's default output, an ELF core compressed in the
  zstd seekable format, read through its seek table without decompressing
  the whole file;
* ``kdump``: makedumpfile's kdump-compressed format;
* ``kdump-flat``: the same in makedumpfile's flattened format (``-F``), read
  in place through its record index (vmcap.formats.flattened).

For the first two the ELF bytes are offered through the same ``Source``
interface as the capture source, so layout parsing and inspection work the
same on a saved dump as on /proc/vmcore. As a `save` source
(open_save_source), a kdump or flattened file, the files of a makedumpfile
--split set and a flattened stream compressed whole are offered as the ELF
core they stand for (vmcap.source.elfview, source_kdump, source_stream).
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from ..errors import BadSource
from ..fileio.mmapio import FileSource, MmapRefused, open_source_fd
from ..formats.elf import Segment
from .layout import Layout

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
KDUMP_SIGNATURE = b"KDUMP   "


class ZstdSource:
    """The decompressed bytes of a seekable-zstd file, as a Source."""

    def __init__(self, path: str):
        from ..formats.seekable import SeekableReader

        self.name = str(path)
        self.reader = SeekableReader(path)
        self.size = self.reader.size

    def pread(self, offset: int, length: int) -> bytes:
        if offset + length > self.size:
            from ..errors import SourceIOError

            raise SourceIOError(f"{self.name}: unexpected end of data at offset "
                                f"{self.size:#x} (wanted {length} bytes from {offset:#x})",
                                offset=self.size)
        return self.reader.pread(offset, length)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        buffer[:] = self.pread(offset, len(buffer))

    def map(self, offset: int, length: int) -> mmap.mmap:
        raise MmapRefused("compressed data cannot be mapped")

    def close(self) -> None:
        self.reader.close()


def detect_container(path: str) -> str:
    """'elf', 'zstd-seekable', 'zstd' (no seek table), 'kdump', 'kdump-flat' or 'unknown'."""
    from ..formats.flattened import DETECT_BYTES, is_flattened

    fd = open_source_fd(path)
    try:
        head = os.pread(fd, DETECT_BYTES, 0)
        magic = head[:8]
    except OSError as e:
        raise BadSource(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if magic.startswith(b"\x7fELF"):
        return "elf"
    if magic == KDUMP_SIGNATURE:
        return "kdump"
    if is_flattened(head):
        return "kdump-flat"
    if magic.startswith(ZSTD_MAGIC):
        from ..formats.seekable import is_seekable_zstd

        return "zstd-seekable" if is_seekable_zstd(path) else "zstd"
    return "unknown"


def open_elf_source(path: str, *, allow_mmap: bool = True):
    """A Source over the ELF bytes of a plain or seekable-zstd dump."""
    container = detect_container(path)
    if container == "zstd-seekable":
        return ZstdSource(path)
    if container == "zstd":
        raise BadSource(f"{path}: zstd-compressed without a seek table (a zelf file cut short "
                        "loses it; `zstd -d` restores whatever frames are whole)")
    if container == "unknown":
        wrapper = compressed_wrapper(path)
        if wrapper is not None:
            raise BadSource(f"{path}: compressed whole with {wrapper}: `vmcap save` takes a "
                            "compressed flattened stream as its source; other commands need "
                            "the file decompressed")
    # Plain files, /proc/vmcore and devices; FileSource reports open errors.
    return FileSource(path, allow_mmap=allow_mmap)


def compressed_wrapper(path: str) -> str | None:
    """'gzip', 'xz', 'lz4' or 'zstd' for a file compressed as a whole, else None."""
    from .stream import wrapper_of

    fd = open_source_fd(path)
    try:
        head = os.pread(fd, 8, 0)
    except OSError as e:
        raise BadSource(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return wrapper_of(head)


def check_split_set_paths(paths) -> None:
    """Several sources are the files of a makedumpfile --split set: kdump files."""
    for path in paths:
        if detect_container(path) not in ("kdump", "kdump-flat"):
            raise BadSource(f"{path}: several sources are the files of a makedumpfile --split "
                            "set, which are kdump files; this one is not")


def open_save_source(path, *, allow_mmap: bool = True):
    """(a Source of ELF core bytes for `vmcap save`, the source's dump level or None).

    /proc/vmcore and ELF files are read as they are, a zelf file through its
    seek table, a kdump or flattened kdump file through its ELF view
    (vmcap.source.elfview), a flattened stream compressed as a whole (gzip, xz,
    lz4, zstd without a seek table) once, in order (vmcap.source.stream;
    the Source then has ``sequential = True``). A list of paths is the
    files of a makedumpfile --split set. The dump level is the kdump header's; for an ELF core
    it is None here (a vmcap output's VMCAP note says it, see save).
    """
    if not isinstance(path, str):
        paths = list(path)
        if len(paths) > 1:
            from .kdump_memory import open_kdump_view

            check_split_set_paths(paths)
            return open_kdump_view(paths)
        path = paths[0]
    container = detect_container(path)
    if container in ("kdump", "kdump-flat"):
        from .kdump_memory import open_kdump_view

        return open_kdump_view(path)
    wrapper = compressed_wrapper(path) if container in ("zstd", "unknown") else None
    if wrapper is not None:
        from .stream import open_stream_view

        return open_stream_view(path, wrapper)
    if container in ("zstd-seekable", "zstd"):
        return open_elf_source(path, allow_mmap=allow_mmap), None
    return FileSource(path, allow_mmap=allow_mmap), None


@dataclass
class ElfPhysicalView:
    """Physical memory of an ELF core: paddr -> bytes, zeros beyond p_filesz."""

    layout: Layout
    source: object

    def __post_init__(self):
        self._ordered = sorted(self.layout.segments, key=lambda s: (s.paddr, s.index))
        self._starts = [s.paddr for s in self._ordered]
        # reach[i]: the furthest end among ordered[:i+1]; lets a lookup stop
        # walking back as soon as no earlier segment can cover the address.
        self._reach = list(accumulate((s.paddr + s.memsz for s in self._ordered), max))

    def segment_at(self, paddr: int) -> Segment | None:
        i = bisect_right(self._starts, paddr) - 1
        # Overlapping segments: walk back to any that still covers paddr.
        while i >= 0 and self._reach[i] > paddr:
            seg = self._ordered[i]
            if paddr < seg.paddr + seg.memsz:
                return seg
            i -= 1
        return None

    def read(self, paddr: int, length: int, segment: Segment | None = None) -> bytes:
        """Bytes at [paddr, paddr+length), which must lie within one segment's memsz."""
        seg = segment or self.segment_at(paddr)
        if seg is None or paddr + length > seg.paddr + seg.memsz:
            raise BadSource(f"{self.layout.source_name}: physical address {paddr:#x} "
                            f"(+{length:#x}) is not in the dump")
        start = paddr - seg.paddr
        in_file = max(0, min(length, seg.filesz - start))
        data = self.source.pread(seg.offset + start, in_file) if in_file else b""
        return data + bytes(length - in_file)

    def stored_ranges(self):
        """(paddr, length) of the memory whose bytes are in the file."""
        return [(s.paddr, s.filesz) for s in self.layout.segments if s.filesz]

    def read_physical(self, paddr: int, length: int) -> bytes:
        """Bytes at [paddr, paddr+length), which may span back-to-back segments.

        /proc/vmcore can split contiguous RAM into several PT_LOADs, so a
        kernel structure can straddle two of them.
        """
        parts = []
        while length > 0:
            seg = self.segment_at(paddr)
            if seg is None:
                raise BadSource(f"{self.layout.source_name}: physical address {paddr:#x} "
                                "is not in the dump")
            n = min(length, seg.paddr + seg.memsz - paddr)
            parts.append(self.read(paddr, n, segment=seg))
            paddr += n
            length -= n
        return b"".join(parts)


@dataclass
class OpenDump:
    """Any dump as physical memory plus what the kernel said about itself."""

    path: str
    container: str
    machine: str  # "EM_X86_64" (ELF) or "x86_64" (kdump header)
    page_size: int
    vmcoreinfo: dict
    read_physical: object  # (paddr, length) -> bytes
    phys_base_hint: int | None  # from the kernel-text PT_LOAD, when there is one
    max_pfn: int
    ram_pfn_ranges: list = None  # [start, end) pfns that are RAM in the dump
    _closer: object = None

    def close(self) -> None:
        if self._closer is not None:
            self._closer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_dump(path, *, page_size: int | None = None,
              vmcoreinfo: bytes | None = None) -> OpenDump:
    """Open /proc/vmcore, a saved ELF, a vmcap zelf or a kdump file for reading memory.

    ``vmcoreinfo`` replaces the dump's own VMCOREINFO (a file's text).
    """
    from ..kernel.vmcoreinfo import parse_vmcoreinfo
    from .layout import read_layout

    if not isinstance(path, str):
        paths = list(path)
        if len(paths) > 1:
            return _split_set_dump(paths, page_size, vmcoreinfo)
        path = paths[0]
    container = detect_container(path)
    if container in ("kdump", "kdump-flat"):
        from ..formats.kdump import KdumpReader

        try:
            reader = KdumpReader(path)
        except OSError as e:
            raise BadSource(f"{path}: cannot open: {e.strerror}") from None
        try:
            from .kdump_memory import refuse_split_part

            refuse_split_part(reader)
        except BaseException:
            reader.close()
            raise
        header = reader.header
        info = parse_vmcoreinfo(reader.vmcoreinfo if vmcoreinfo is None else vmcoreinfo)
        # The kernel's page, which may be smaller than the file's block: QEMU
        # stores arm64 dumps in 64 KiB blocks whatever the kernel's page size.
        page = kernel_page_size(info, page_size, header.page_size)
        per_block = header.page_size // page
        runs = [(first * per_block, (first + count) * per_block)
                for first, count in reader.iter_present_runs()]
        return OpenDump(path, container, header.machine, page, info, reader.pread_physical,
                        header.phys_base or None, header.max_mapnr * per_block, runs,
                        reader.close)
    source = open_elf_source(path)
    try:
        layout = read_layout(source, page_size=page_size, vmcoreinfo=vmcoreinfo)
    except BaseException:
        source.close()
        raise
    return elf_dump(layout, source, container=container, closer=source.close)


def _split_set_dump(paths, page_size, vmcoreinfo) -> OpenDump:
    from ..kernel.vmcoreinfo import parse_vmcoreinfo
    from .kdump_memory import SplitSetMemory, open_kdump_readers

    check_split_set_paths(paths)
    readers = open_kdump_readers(paths)
    try:
        memory = SplitSetMemory(readers)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    header, first = memory.header, memory.readers[0]
    info = parse_vmcoreinfo(first.vmcoreinfo if vmcoreinfo is None else vmcoreinfo)
    page = kernel_page_size(info, page_size, header.page_size)
    per_block = header.page_size // page
    runs = [(start * per_block, (start + count) * per_block)
            for start, count in memory.present_runs()]
    return OpenDump(memory.name, "kdump", header.machine, page, info, memory.read,
                    header.phys_base or None, header.max_mapnr * per_block, runs, memory.close)


def kernel_page_size(vmcoreinfo: dict, option: int | None, block_size: int) -> int:
    """The dumped kernel's page size in a kdump file: --page-size, else VMCOREINFO
    PAGESIZE when it divides the block size, else the block size."""
    if option:
        page = option
    else:
        try:
            page = int(vmcoreinfo.get("PAGESIZE") or block_size)
        except ValueError:
            page = block_size
    if page <= 0 or page & (page - 1) or block_size % page:
        return block_size
    return page


def elf_dump(layout, source, *, container: str = "elf", closer=None) -> OpenDump:
    """An ELF source whose layout is already read, as an OpenDump."""
    from ..kernel.translate import phys_base_from_segments
    from ..plan.copyplan import disjoint_segments

    view = ElfPhysicalView(layout, source)
    page = layout.page_size
    max_end = max((s.paddr + s.memsz for s in layout.segments), default=0)
    ram = [(s.paddr // page, -(-(s.paddr + s.memsz) // page))
           for s in disjoint_segments(layout.segments) if s.memsz]
    return OpenDump(layout.source_name, container, layout.machine, page, layout.vmcoreinfo,
                    view.read_physical,
                    phys_base_from_segments((s.vaddr, s.paddr) for s in layout.segments),
                    -(-max_end // page), ram, closer)


def classify_dump(dump: OpenDump, dump_level: int):
    """makedumpfile's page classes (dump level bits 2-16) of a dump."""
    from ..kernel.pageclass import classify_pages

    return classify_pages(dump.read_physical, dump.vmcoreinfo, dump.machine, dump_level,
                          max_pfn=dump.max_pfn, ram_pfn_ranges=dump.ram_pfn_ranges)


def kernel_log(dump: OpenDump):
    """The crashed kernel's log records (lockless ringbuffer or log_buf)."""
    from ..kernel.arch import make_translator
    from ..kernel.dmesg import read_kernel_log

    translator = make_translator(dump.read_physical, dump.vmcoreinfo, dump.machine,
                                 fallback_phys_base=dump.phys_base_hint)
    return read_kernel_log(translator, dump.vmcoreinfo)
