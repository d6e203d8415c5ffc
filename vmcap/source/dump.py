"""Every dump vmcap reads, opened once: ``open_dump(path) -> Dump``.

One detector per format looks at the file's first bytes (``DETECTORS``,
chosen in ``detect`` and nowhere else), and one ``Dump`` class per
container opens it:

* ``ElfDump``: a plain ELF core (/proc/vmcore, a saved vmcore, QEMU's dump,
  makedumpfile -E, vmcap's ``--format elf``);
* ``ZelfDump``: vmcap's default output, an ELF core in the zstd seekable
  format, read through its seek table (only the frames a read touches are
  decompressed);
* ``KdumpDump``: makedumpfile's kdump-compressed format, plain or flattened
  (``-F``, read in place through its record index), or the files of a
  makedumpfile --split set given together;
* ``StreamDump``: a flattened stream compressed whole (gzip, xz, lz4, zstd
  without a seek table), read once, in order: only ``vmcap save`` takes it
  (``open_dump(..., stream=True)``).

Every Dump has the same faces: ``platform`` (kernel.arch.Platform),
``vmcoreinfo``, ``physical`` (one physical-memory shape, ``PhysicalMemory``),
``elf`` (the plain ELF core it stands for, as a Source: what `save` copies
and `mount` serves), ``layout`` (that core's headers and notes),
``describe()`` (what `vmcap inspect --json` prints), ``check()`` (the
container's own structural and digest check, as `vmcap verify` runs it
without a source) and a lazy kernel ``translator``.
"""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod
from bisect import bisect_right
from functools import cached_property
from itertools import accumulate
from typing import Protocol, Sequence

from ..errors import BadSource, SourceIOError, Unsupported
from ..fileio.mmapio import ALLOCATION_GRANULARITY, FileSource, MappedBytes, MmapRefused, open_source_fd
from ..formats.elf import ELF_MAGIC, Segment, parse_notes
from ..formats.flattened import DETECT_BYTES, is_flattened
from ..formats.kdump import KDUMP_SIGNATURE, KdumpReader
from ..kernel.arch import Platform, make_platform
from ..kernel.vmcoreinfo import parse_vmcoreinfo
from .layout import Layout, read_layout

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHECK_BATCH_PAGES = 256  # kdump pages decoded at a time by check(): 1 MiB of 4 KiB pages

NOT_A_DUMP = "not a dump vmcap reads (an ELF core, zelf, kdump or flattened kdump file)"
NO_SEEK_TABLE = ("zstd-compressed without a seek table (a zelf file cut short loses it; "
                 "`zstd -d` restores whatever frames are whole)")


# --- detection -------------------------------------------------------------------------------

def _is_zelf(head: bytes, path: str) -> bool:
    from ..formats.seekable import is_seekable_zstd

    return head.startswith(ZSTD_MAGIC) and is_seekable_zstd(path)


# (container, test of the file's first DETECT_BYTES): the first that holds names the container.
DETECTORS = (
    ("elf", lambda head, path: head.startswith(ELF_MAGIC)),
    ("kdump", lambda head, path: head[:8] == KDUMP_SIGNATURE),
    ("kdump-flat", lambda head, path: is_flattened(head)),
    ("zstd-seekable", _is_zelf),
    ("zstd", lambda head, path: head.startswith(ZSTD_MAGIC)),
)


def _head(path: str) -> bytes:
    fd = open_source_fd(path)
    try:
        return os.pread(fd, DETECT_BYTES, 0)
    except OSError as e:
        raise BadSource(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def detect(path: str) -> tuple[str, str | None]:
    """(container, wrapper) of a file: container as detect_container says; wrapper the
    compressor ('gzip', 'xz', 'lz4', 'zstd') of a file compressed whole, else None."""
    head = _head(path)
    container = next((name for name, test in DETECTORS if test(head, path)), "unknown")
    if container not in ("zstd", "unknown"):
        return container, None
    from .stream import wrapper_of  # here: gzip, lzma and the ELF view, for such files only

    return container, wrapper_of(head)


def detect_container(path: str) -> str:
    """'elf', 'zstd-seekable', 'zstd' (no seek table), 'kdump', 'kdump-flat' or 'unknown'."""
    return detect(path)[0]


# --- physical memory -------------------------------------------------------------------------

class PhysicalMemory(Protocol):
    """A dump's physical memory, the one shape every container offers.

    ``read`` spans back-to-back ranges; memory the dump represents but does
    not store (p_memsz past p_filesz, pages a dump level left out) reads as
    zeros; an address the dump does not represent is BadSource.
    """

    name: str
    granule: int  # the unit the dump represents memory in (1 for ELF; the kdump block size)
    stores_excluded_pages: bool  # False: the format never stores a page its dump level excludes
    segments: Sequence[Segment]  # the PT_LOADs of the dump's ELF view

    def read(self, paddr: int, size: int) -> bytes: ...

    def read_segment(self, segment: Segment, paddr: int, size: int) -> bytes:
        """Bytes at paddr within one of ``segments`` (as a debugger reads that segment)."""

    def stored_ranges(self) -> list[tuple[int, int]]:
        """(paddr, size) of the memory whose bytes the dump stores."""

    def covered_ranges(self) -> list[tuple[int, int]]:
        """(paddr, size) of the memory the dump represents, stored or zero fill."""

    def mapped(self, paddr: int, size: int) -> MappedBytes | None:
        """Bytes at [paddr, paddr+size) mapped rather than copied, or None where they cannot be."""


class ElfMemory:
    """Physical memory of an ELF core: paddr -> bytes, zeros beyond p_filesz."""

    granule = 1
    stores_excluded_pages = True  # a PT_LOAD may hold excluded pages (vmcap's -d with --format elf keeps runs)

    def __init__(self, layout: Layout, source):
        self.layout = layout
        self.source = source
        self.name = layout.source_name
        self.segments = layout.segments
        self._ordered = sorted(layout.segments, key=lambda s: (s.paddr, s.index))
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

    def read_segment(self, segment: Segment | None, paddr: int, size: int) -> bytes:
        """Bytes at [paddr, paddr+size), which must lie within one segment's memsz."""
        seg = segment or self.segment_at(paddr)
        if seg is None or paddr + size > seg.paddr + seg.memsz:
            raise BadSource(f"{self.name}: physical address {paddr:#x} (+{size:#x}) is not in the dump")
        start = paddr - seg.paddr
        in_file = max(0, min(size, seg.filesz - start))
        data = self.source.pread(seg.offset + start, in_file) if in_file else b""
        return data + bytes(size - in_file)

    def read(self, paddr: int, size: int) -> bytes:
        """Bytes at [paddr, paddr+size), which may span back-to-back segments.

        /proc/vmcore can split contiguous RAM into several PT_LOADs, so a
        kernel structure can straddle two of them.
        """
        parts = []
        while size > 0:
            seg = self.segment_at(paddr)
            if seg is None:
                raise BadSource(f"{self.name}: physical address {paddr:#x} is not in the dump")
            n = min(size, seg.paddr + seg.memsz - paddr)
            parts.append(self.read_segment(seg, paddr, n))
            paddr += n
            size -= n
        return b"".join(parts)

    def stored_ranges(self) -> list[tuple[int, int]]:
        return [(s.paddr, s.filesz) for s in self.segments if s.filesz]

    def covered_ranges(self) -> list[tuple[int, int]]:
        return [(s.paddr, s.memsz) for s in self.segments]

    def mapped(self, paddr: int, size: int) -> MappedBytes | None:
        """[paddr, paddr+size) through an mmap window, or None: read it instead.

        Only where the whole window (granule-aligned file range) is one segment's
        file data: those are whole RAM pages, never a fractional page nor a byte
        of no segment. /proc/vmcore's read() copies each page through a fresh
        kernel mapping of old memory, its mmap maps it once (makedumpfile reads
        struct pages through mmap too).
        """
        seg = self.segment_at(paddr)
        if seg is None or paddr + size > seg.paddr + seg.filesz or size <= 0:
            return None
        granule = max(self.layout.page_size, ALLOCATION_GRANULARITY)
        offset = seg.offset + (paddr - seg.paddr)
        start = offset - offset % granule
        end = -(-(offset + size) // granule) * granule
        if start < seg.offset or end > seg.offset + seg.filesz:
            return None
        try:
            window = self.source.map(start, end - start)
        except MmapRefused:
            return None
        return MappedBytes(window, offset - start, size)


class KdumpPhysicalMemory:
    """Physical memory of a kdump file or --split set: its 1st bitmap's pages, zeros
    for those its 2nd bitmap left out."""

    stores_excluded_pages = False  # a kdump file never stores a page its dump level excludes

    def __init__(self, memory):
        self.memory = memory  # kdump_memory.KdumpMemory or SplitSetMemory
        self.name = memory.name
        self.granule = memory.granule  # a present page is represented whole
        self._present = memory.present_runs()
        self._present_starts = [first for first, _ in self._present]

    @cached_property
    def _dumped(self) -> list[tuple[int, int]]:
        return list(self.memory.dumped_runs())

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """The ELF view's PT_LOADs (their offsets are the view's business: Dump.elf)."""
        from .elfview import view_segments

        return tuple(Segment(i, s.paddr, s.vaddr, 0, s.filesz, s.memsz, s.flags)
                     for i, s in enumerate(view_segments(self._present, self._dumped, self.granule)))

    def read(self, paddr: int, size: int) -> bytes:
        granule = self.granule
        i = bisect_right(self._present_starts, paddr // granule) - 1
        if i < 0 or paddr + size > (self._present[i][0] + self._present[i][1]) * granule:
            raise BadSource(f"{self.name}: physical address {paddr:#x} (+{size:#x}) is not in the dump")
        return self.memory.read(paddr, size)

    def read_segment(self, segment: Segment, paddr: int, size: int) -> bytes:
        return self.read(paddr, size)  # a kdump file's segments do not overlap

    def stored_ranges(self) -> list[tuple[int, int]]:
        return [(first * self.granule, count * self.granule) for first, count in self._dumped]

    def covered_ranges(self) -> list[tuple[int, int]]:
        return [(first * self.granule, count * self.granule) for first, count in self._present]

    def mapped(self, paddr: int, size: int) -> None:
        return None  # pages are stored compressed: there is nothing to map


# --- the dumps -------------------------------------------------------------------------------

class Dump(ABC):
    """One opened dump (see the module doc). Subclasses set the attributes below."""

    container: str  # as `vmcap inspect --json` names it
    path: str  # the file's name (a --split set's names, space separated)
    paths: list[str]
    platform: Platform
    page_size: int  # the dumped kernel's page size
    vmcoreinfo: dict[str, str]
    vmcoreinfo_raw: bytes
    dump_level: int | None = None  # a kdump header's dump level; None for an ELF core
    physical: PhysicalMemory

    @property
    @abstractmethod
    def elf(self):
        """The plain ELF core the dump stands for, as a Source (pread, size), read in place."""

    @property
    @abstractmethod
    def layout(self) -> Layout:
        """The ELF view's headers, notes and VMCOREINFO."""

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

    @cached_property
    def translator(self):
        """The kernel-virtual layer over this dump's physical memory (kernel.arch)."""
        return self.platform.translator(self.physical.read, self.vmcoreinfo,
                                        fallback_phys_base=self.phys_base_hint)

    # What page classification needs beyond memory: the pfns to look at.
    phys_base_hint: int | None = None  # phys_base from the kernel-text PT_LOAD, when there is one

    @property
    @abstractmethod
    def max_pfn(self) -> int:
        """The pfn past the highest memory the dump represents (in kernel pages)."""

    @property
    @abstractmethod
    def ram_pfn_ranges(self) -> list[tuple[int, int]]:
        """[start, end) pfns that are RAM in the dump."""

    @abstractmethod
    def describe(self) -> dict:
        """Everything `vmcap inspect --json` shows (without --mem-usage)."""

    @property
    def vmcap_note(self) -> dict | None:
        """The VMCAP note (formats.note.VmcapNote), checked: CorruptOutput when damaged or
        incomplete; None without one."""
        return self._vmcap_note[0]

    @cached_property
    def _vmcap_note(self):
        """(the VMCAP note, its NoteSpan in the notes): check.checked_note over the dump's notes."""
        from .check import checked_note

        notes, byte_order = self._note_bytes()
        return checked_note(notes, byte_order, self.path)

    def _note_bytes(self) -> tuple[bytes, str]:
        """The dump's own notes (the file's, not the ELF view's) and their byte order."""
        return self.layout.note_bytes, self.layout.byte_order

    @abstractmethod
    def check(self) -> dict:
        """The container's own check (structure, checksums, digests): the fields `vmcap verify`
        reports for it; CorruptOutput (or VerifyMismatch) when it fails."""

    @abstractmethod
    def close(self) -> None:
        """Close what the dump opened."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ElfDump(Dump):
    """A plain ELF core, or anything read as one (/proc/vmcore, a device)."""

    container = "elf"

    def __init__(self, source, layout: Layout, *, owns_source: bool = True):
        self.source = source
        self._layout = layout
        self._owns_source = owns_source
        self.path = layout.source_name
        self.paths = [self.path]
        self.platform = layout.platform
        self.page_size = layout.page_size
        self.vmcoreinfo = layout.vmcoreinfo
        self.vmcoreinfo_raw = layout.vmcoreinfo_raw
        self.physical = ElfMemory(layout, source)

    @classmethod
    def open(cls, source, *, page_size=None, vmcoreinfo=None) -> ElfDump:
        try:
            layout = read_layout(source, page_size=page_size, vmcoreinfo=vmcoreinfo)
        except BaseException:
            source.close()
            raise
        return cls(source, layout)

    @property
    def elf(self):
        return self.source

    @property
    def layout(self) -> Layout:
        return self._layout

    @cached_property
    def phys_base_hint(self) -> int | None:
        from ..kernel.translate import phys_base_from_segments

        return phys_base_from_segments((s.vaddr, s.paddr) for s in self._layout.segments)

    @property
    def max_pfn(self) -> int:
        end = max((s.paddr + s.memsz for s in self._layout.segments), default=0)
        return -(-end // self.page_size)

    @property
    def ram_pfn_ranges(self) -> list[tuple[int, int]]:
        from ..plan.copyplan import disjoint_segments

        page = self.page_size
        return [(s.paddr // page, -(-(s.paddr + s.memsz) // page))
                for s in disjoint_segments(self._layout.segments) if s.memsz]

    def describe(self) -> dict:
        from ..formats.note import find_note_fields, incomplete_in
        from ..plan.copyplan import plan_copy

        layout = self._layout
        plan = plan_copy(layout.segments, layout.page_size)
        report = {
            "source": self.path,
            "container": self.container,
            "page_size": layout.page_size,
            "page_size_origin": layout.page_size_origin,
            "elf_class": layout.elf_class,
            # The file's ELF encoding; the kernel's when it differs (QEMU 7.2 pseries dumps).
            "byte_order": layout.header_byte_order or layout.byte_order,
            "kernel_byte_order": layout.byte_order,
            "machine": layout.machine,
            "arch": layout.arch,
            "cpus": layout.cpus,
            "osrelease": layout.osrelease,
            "crash_time": layout.crash_time,
            "segments": [{"index": s.index, "paddr": s.paddr, "vaddr": s.vaddr,
                          "offset": s.offset, "filesz": s.filesz, "memsz": s.memsz}
                         for s in layout.segments],
            "fractional_pages": [
                {"paddr": page.paddr, "file_offset": page.file_offset,
                 "non_ram_bytes": page.non_ram_bytes,
                 "pieces": [{"segment": p.segment, "paddr": p.paddr, "size": p.size,
                             "offset": p.offset} for p in page.pieces]}
                for page in plan.fractional_pages],
            "totals": {"memory": plan.memory_bytes, "mapped_bytes": plan.mapped_bytes,
                       "buffered_bytes": plan.buffered_bytes,
                       "zero_fill_bytes": plan.zero_fill_bytes},
            "notes": [{"name": n.name, "type": n.type, "size": len(n.desc)} for n in layout.notes],
            "vmcoreinfo": layout.vmcoreinfo,
            "vmcoreinfo_text": layout.vmcoreinfo_raw.decode("utf-8", "replace"),
            "warnings": list(layout.warnings),
        }
        vmcap = find_note_fields(layout.notes)
        if vmcap is not None:
            report["vmcap"] = vmcap
        incomplete = incomplete_in(vmcap)
        if incomplete is not None:
            report["incomplete"] = incomplete.as_dict()
        return report

    def check(self) -> dict:
        from .check import check_elf_digests

        layout = self._layout
        segments = len(layout.segments)
        note, span = self._vmcap_note
        return {"segments": segments, "digest": check_elf_digests(self.path, layout, note, span)}

    def close(self) -> None:
        if self._owns_source:
            self.source.close()


class ZstdSource:
    """The decompressed bytes of a seekable-zstd file, as a Source."""

    def __init__(self, path: str):
        from ..formats.seekable import SeekableReader

        self.name = str(path)
        self.reader = SeekableReader(path)
        self.size = self.reader.size

    def pread(self, offset: int, length: int) -> bytes:
        if offset + length > self.size:
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


class ZelfDump(ElfDump):
    """An ELF core in the zstd seekable format (vmcap's default output)."""

    container = "zstd-seekable"

    def check(self) -> dict:
        """Every frame against zstd's content checksum and the seek table's."""
        reader = self.source.reader
        frames = sum(1 for _ in reader.iter_frames())
        self._vmcap_note  # a damaged note fails the check
        # Every frame, the header frame included, was checked against its checksums.
        return {"frames": frames, "decompressed_bytes": self.source.size,
                "segments": len(self._layout.segments),
                "digest": "zstd checksums" if reader.has_checksums else "none"}


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


class KdumpDump(Dump):
    """A kdump-compressed file (plain or flattened), or the files of a --split set.

    The granule is the kdump block size. It is the kernel's page size for
    makedumpfile's files, but QEMU's arm64 kdump files use 64 KiB blocks for
    4 KiB-page kernels: the kernel page size comes from VMCOREINFO.
    """

    def __init__(self, readers: list[KdumpReader], *, page_size=None, vmcoreinfo=None):
        from .kdump_memory import SplitSetMemory

        self._readers = readers
        self._page_size_option = page_size
        self._vmcoreinfo_option = vmcoreinfo
        if len(readers) > 1:
            self.memory = SplitSetMemory(readers)  # checks the set is whole, at once
            self.container = "kdump-split"
            self.reader = self.memory.readers[0]
        else:
            self.reader = readers[0]
            self.container = "kdump-flat" if self.reader.flattened else "kdump"
        header = self.header = self.reader.header
        self.paths = [reader.name for reader in readers]  # as given
        self.path = " ".join(self.paths)
        self.dump_level = header.dump_level
        own = self.reader.vmcoreinfo.rstrip(b"\0")
        self.vmcoreinfo_raw = own if vmcoreinfo is None else vmcoreinfo
        self.vmcoreinfo = parse_vmcoreinfo(self.vmcoreinfo_raw)
        self.page_size = kernel_page_size(self.vmcoreinfo, page_size, header.page_size)
        self.phys_base_hint = header.phys_base or None

    @cached_property
    def memory(self):
        """The file's memory (KdumpMemory); one file of a --split set is refused here, as
        it holds part of the memory, but opens for describe() and check()."""
        from .kdump_memory import KdumpMemory

        return KdumpMemory(self.reader)

    @cached_property
    def physical(self) -> KdumpPhysicalMemory:
        return KdumpPhysicalMemory(self.memory)

    @cached_property
    def platform(self) -> Platform:
        """From the header's utsname machine (Unsupported when no machine vmcap knows has it:
        only what needs the machine fails, verify's checks do not)."""
        header = self.header
        return make_platform(elf_class=header.elf_class, byte_order=header.byte_order,
                             utsname=header.machine)

    @cached_property
    def elf(self):
        from .elfview import ElfCoreView, ElfIdentity, view_notes

        header = self.header
        identity = ElfIdentity(elf_class=header.elf_class, byte_order=header.byte_order,
                               e_machine=self.platform.e_machine, source_name=self.path)
        notes = view_notes(self.reader.notes, self.reader.vmcoreinfo.rstrip(b"\0"), header.byte_order)
        return ElfCoreView(self.memory, identity, notes)

    @cached_property
    def layout(self) -> Layout:
        return read_layout(self.elf, page_size=self._page_size_option, vmcoreinfo=self._vmcoreinfo_option)

    @property
    def max_pfn(self) -> int:
        return self.header.max_mapnr * (self.header.page_size // self.page_size)

    @property
    def ram_pfn_ranges(self) -> list[tuple[int, int]]:
        per_block = self.header.page_size // self.page_size
        return [(first * per_block, (first + count) * per_block)
                for first, count in self.memory.present_runs()]

    def describe(self) -> dict:
        from ..formats.kdump import DUMP_DH_COMPRESSED_INCOMPLETE
        from ..formats.note import find_note_fields, incomplete_in

        reader, header = self.reader, self.header
        present, dumped = reader.page_counts()
        notes = parse_notes(reader.notes, header.byte_order) if reader.notes else []
        vmcoreinfo_text = reader.vmcoreinfo.rstrip(b"\0")
        runs = list(reader.iter_present_runs())
        page = header.page_size
        info = parse_vmcoreinfo(vmcoreinfo_text)
        # QEMU leaves the header's utsname and time empty: VMCOREINFO has them.
        crash_time = header.crash_time or None
        if crash_time is None and (info.get("CRASHTIME") or "").isdigit():
            crash_time = int(info["CRASHTIME"])
        report = {
            "source": self.path,
            "container": self.container,
            "page_size": page,
            "page_size_origin": "kdump header",
            "elf_class": header.elf_class,
            "byte_order": header.byte_order,
            "machine": header.machine,
            "arch": header.machine,
            "cpus": header.nr_cpus,
            "osrelease": header.release or info.get("OSRELEASE") or None,
            "crash_time": crash_time,
            # A kdump file has no PT_LOADs: its present pages, as runs.
            "segments": [{"index": i, "paddr": first * page, "vaddr": 0, "offset": 0,
                          "filesz": count * page, "memsz": count * page}
                         for i, (first, count) in enumerate(runs)],
            "fractional_pages": [],
            "totals": {"memory": present * page, "mapped_bytes": 0, "buffered_bytes": 0,
                       "zero_fill_bytes": 0},
            "notes": [{"name": n.name, "type": n.type, "size": len(n.desc)} for n in notes],
            "vmcoreinfo": info,
            "vmcoreinfo_text": vmcoreinfo_text.decode("utf-8", "replace"),
            "warnings": [],
            "kdump": {"header_version": header.header_version, "compression": header.compression,
                      "dump_level": header.dump_level, "max_mapnr": header.max_mapnr,
                      "pages_present": present, "pages_dumped": dumped},
        }
        vmcap = find_note_fields(notes)
        if vmcap is not None:
            report["vmcap"] = vmcap
        incomplete = incomplete_in(vmcap)
        incomplete = incomplete.as_dict() if incomplete is not None else None
        if incomplete is None and header.status & DUMP_DH_COMPRESSED_INCOMPLETE:
            # makedumpfile's own incomplete dumps: only the page counts say how much.
            incomplete = {"saved_bytes": dumped * page, "memory_bytes": present * page,
                          "data_end_paddr": None}
        if incomplete is not None:
            incomplete["pages_dumped"] = dumped
            report["incomplete"] = incomplete
        if self._vmcoreinfo_option is not None:
            given = self.vmcoreinfo
            report.update(vmcoreinfo=given,
                          vmcoreinfo_text=self._vmcoreinfo_option.decode("utf-8", "replace"),
                          osrelease=given.get("OSRELEASE", report.get("osrelease")))
        return report

    def check(self) -> dict:
        """Structure, digests, and every dumped page decompressed."""
        from ..formats.digest import UNKNOWN
        from .check import check_kdump_digests

        if len(self._readers) > 1:
            raise Unsupported(f"{self.path}: vmcap verify takes one kdump file, not a --split set")
        reader = self.reader
        note, span = self._vmcap_note
        data_offset = note.digests.get("DATA_OFFSET") if note is not None else None
        reader.check_structure(int(data_offset, 16) if data_offset and data_offset != UNKNOWN
                               else None)
        digest = check_kdump_digests(self.path, reader, note, span)
        # Every dumped page decoded, through the batched reader the ELF view reads with
        # (one pread of descriptors and of stored bytes per batch; the same errors).
        block = self.header.page_size
        batch = memoryview(bytearray(CHECK_BATCH_PAGES * block))
        pages = 0
        for first, count in reader.iter_dumped_runs():
            for lo in range(first, first + count, CHECK_BATCH_PAGES):
                n = min(CHECK_BATCH_PAGES, first + count - lo)
                reader.read_dumped_pages_into(lo, batch[:n * block])
            pages += count
        return {"digest": digest, "pages_checked": pages}

    def _note_bytes(self) -> tuple[bytes, str]:
        return self.reader.notes, self.header.byte_order

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class StreamDump(Dump):
    """A flattened stream compressed whole: its ELF view, read once, in order (save only)."""

    container = "kdump-stream"

    def __init__(self, path: str, wrapper: str, *, page_size=None, vmcoreinfo=None):
        from .stream import open_stream_view

        self.path = path
        self.paths = [path]
        self._view, self.dump_level = open_stream_view(path, wrapper)
        self._page_size_option = page_size
        self._vmcoreinfo_option = vmcoreinfo
        header = self._view.memory.header
        self.platform = make_platform(elf_class=header.elf_class, byte_order=header.byte_order,
                                      utsname=header.machine)
        self.phys_base_hint = header.phys_base or None

    @property
    def elf(self):
        return self._view

    @cached_property
    def layout(self) -> Layout:
        return read_layout(self._view, page_size=self._page_size_option, vmcoreinfo=self._vmcoreinfo_option)

    @property
    def vmcoreinfo(self) -> dict[str, str]:
        return self.layout.vmcoreinfo

    @property
    def vmcoreinfo_raw(self) -> bytes:
        return self.layout.vmcoreinfo_raw

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    def _sequential(self, what: str):
        raise Unsupported(f"{self.path}: a stream compressed whole is read once, in order "
                          f"(`vmcap save`); it has no {what}")

    @property
    def physical(self):
        self._sequential("random access to its memory")

    @property
    def max_pfn(self) -> int:
        self._sequential("random access to classify its pages")

    @property
    def ram_pfn_ranges(self) -> list[tuple[int, int]]:
        self._sequential("random access to classify its pages")

    def describe(self) -> dict:
        self._sequential("random access to describe it")

    def check(self) -> dict:
        self._sequential("random access to check it")

    def close(self) -> None:
        self._view.close()


# --- opening ---------------------------------------------------------------------------------

def open_dump(path, *, page_size: int | None = None, vmcoreinfo: bytes | None = None,
              allow_mmap: bool = True, stream: bool = False, strict: bool = False) -> Dump:
    """Open any dump vmcap reads; ``path`` a file, or a list: the files of a --split set.

    ``vmcoreinfo`` (a file's text) replaces the dump's own VMCOREINFO;
    ``page_size`` the page size VMCOREINFO gives. ``stream``: a flattened
    stream compressed whole opens as a StreamDump (read once, in order: `vmcap
    save`). ``strict`` (the Python API, `vmcap mount`): a file no detector
    knows is refused as not a dump, and a stream compressed whole as
    Unsupported; otherwise such a file is read as an ELF core (/proc/vmcore,
    devices), whose reader says what is wrong with it.
    """
    if not isinstance(path, (str, os.PathLike)):
        paths = [os.fspath(p) for p in path]
        if len(paths) > 1:
            return _open_split_set(paths, page_size, vmcoreinfo)
        path = paths[0]
    path = os.fspath(path)
    container, wrapper = detect(path)
    return open_detected(path, container, wrapper, page_size=page_size, vmcoreinfo=vmcoreinfo,
                         allow_mmap=allow_mmap, stream=stream, strict=strict)


def open_detected(path: str, container: str, wrapper: str | None, *, page_size=None, vmcoreinfo=None,
                  allow_mmap: bool = True, stream: bool = False, strict: bool = False) -> Dump:
    """open_dump of one file whose detect() is known (verify tells a file it cannot read
    from a damaged dump by where the error comes from)."""
    if container in ("kdump", "kdump-flat"):
        return _open_kdump([path], page_size, vmcoreinfo)
    if container == "zstd-seekable":
        return ZelfDump.open(ZstdSource(path), page_size=page_size, vmcoreinfo=vmcoreinfo)
    if container == "elf":
        return ElfDump.open(FileSource(path, allow_mmap=allow_mmap), page_size=page_size,
                            vmcoreinfo=vmcoreinfo)
    if wrapper is not None and stream:
        return StreamDump(path, wrapper, page_size=page_size, vmcoreinfo=vmcoreinfo)
    if wrapper is not None and strict:
        raise Unsupported(f"{path}: compressed whole with {wrapper}, which allows no random "
                          "access; decompress it first, or `vmcap save` it to a zelf file")
    if container == "zstd":
        raise BadSource(f"{path}: {NO_SEEK_TABLE}")
    if wrapper is not None:
        raise BadSource(f"{path}: compressed whole with {wrapper}: `vmcap save` takes a "
                        "compressed flattened stream as its source; other commands need "
                        "the file decompressed")
    if strict:
        raise BadSource(f"{path}: {NOT_A_DUMP}")
    # Plain files, /proc/vmcore and devices; FileSource reports open errors.
    return ElfDump.open(FileSource(path, allow_mmap=allow_mmap), page_size=page_size,
                        vmcoreinfo=vmcoreinfo)


def _kdump_reader(path: str) -> KdumpReader:
    try:
        return KdumpReader(path)
    except OSError as e:
        raise BadSource(f"{path}: cannot open: {e.strerror or e}") from None


def _open_split_set(paths: list[str], page_size, vmcoreinfo) -> KdumpDump:
    for path in paths:
        if detect_container(path) not in ("kdump", "kdump-flat"):
            raise BadSource(f"{path}: several sources are the files of a makedumpfile --split "
                            "set, which are kdump files; this one is not")
    return _open_kdump(paths, page_size, vmcoreinfo)


def _open_kdump(paths: list[str], page_size, vmcoreinfo) -> KdumpDump:
    readers: list[KdumpReader] = []
    try:
        for path in paths:
            readers.append(_kdump_reader(path))
        return KdumpDump(readers, page_size=page_size, vmcoreinfo=vmcoreinfo)
    except BaseException:
        for reader in readers:
            reader.close()
        raise


def elf_dump(layout: Layout, source) -> ElfDump:
    """A Source whose layout is already read (save's source) as a Dump; the source stays the caller's."""
    return ElfDump(source, layout, owns_source=False)


# --- what the commands read through a Dump ---------------------------------------------------

def classify_dump(dump: Dump, dump_level: int):
    """makedumpfile's page classes (dump level bits 2-16) of a dump."""
    from ..kernel.pageclass import classify_pages

    return classify_pages(dump.physical.read, dump.vmcoreinfo, dump.platform, dump_level,
                          max_pfn=dump.max_pfn, ram_pfn_ranges=dump.ram_pfn_ranges,
                          map_physical=dump.physical.mapped)


def kernel_log(dump: Dump):
    """The crashed kernel's log records (lockless ringbuffer or log_buf)."""
    from ..kernel.dmesg import read_kernel_log

    return read_kernel_log(dump.translator, dump.vmcoreinfo)
