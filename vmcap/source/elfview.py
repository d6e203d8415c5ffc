"""Any dump's physical memory offered as a plain ELF core, without writing one.

A kdump-compressed file stores pages, not PT_LOADs. ``ElfCoreView`` builds
the ELF header, program headers and notes of the core such a dump stands
for, and answers reads of that (virtual) file from the dump's pages. It is
a ``Source`` (vmcap.fileio.mmapio), so everything that reads /proc/vmcore or a
saved ELF core (layout parsing, page classes, the copy engine, the writers)
reads a kdump file the same way, and ``vmcap save`` converts and re-filters
through it.

The view's PT_LOADs follow the dump's two bitmaps: a run of present pages
becomes one PT_LOAD per run of dumped pages, whose p_memsz reaches on over
the pages that are present but not dumped (read as zeros, never stored:
the zero fill of an ELF core, as makedumpfile -E writes it). Present pages
before the first dumped one of a run get a PT_LOAD with p_filesz 0.

What the view needs from a dump (``GranuleMemory``): its granule (the
kdump block size), the runs of present and of dumped granules, reading
dumped granules into a buffer, its notes and its ELF identity.
"""

from __future__ import annotations

import mmap
from bisect import bisect_right
from dataclasses import dataclass
from typing import Protocol, Sequence

from ..errors import SourceIOError
from ..fileio.mmapio import MmapRefused
from ..formats.elf import build_note, iter_note_spans
from ..formats.elfwriter import OutputSegment, plan_elf_image
from ..formats.note import without_note

VMCOREINFO_NOTE_NAME = b"VMCOREINFO"
SEGMENT_FLAGS = 7  # PF_R | PF_W | PF_X, as the kernel's /proc/vmcore PT_LOADs


@dataclass(frozen=True)
class ElfIdentity:
    """What an ELF header says about the dumped machine (elfwriter reads these names)."""

    elf_class: int  # 32 or 64
    byte_order: str  # "little" or "big"
    e_machine: int
    source_name: str
    e_flags: int = 0


class GranuleMemory(Protocol):
    """A dump's physical memory, stored in granules (pages or kdump blocks)."""

    name: str
    granule: int  # bytes per stored unit
    sequential: bool  # read once, in ascending order (a stream compressed whole)

    def present_runs(self) -> Sequence[tuple[int, int]]:
        """(first granule, count) of the memory the dump represents, ascending."""

    def dumped_runs(self) -> Sequence[tuple[int, int]]:
        """(first granule, count) of the granules whose bytes are stored, ascending."""

    def read_dumped_into(self, first: int, out: memoryview) -> None:
        """Fill out with the dumped granules first, first+1, ... (all dumped)."""


def has_note(note_bytes: bytes, byte_order: str, name: str) -> bool:
    return any(span.name == name for span in iter_note_spans(note_bytes, byte_order))


def view_notes(note_bytes: bytes, vmcoreinfo: bytes, byte_order: str) -> bytes:
    """A dump's notes for its ELF view: without vmcap's note (it described the
    dump file, not the memory), with a VMCOREINFO note when the dump keeps
    VMCOREINFO apart from its notes (kdump sub header)."""
    notes = without_note(note_bytes, byte_order)
    if vmcoreinfo and not has_note(notes, byte_order, VMCOREINFO_NOTE_NAME.decode()):
        notes += build_note(VMCOREINFO_NOTE_NAME, 0, bytes(vmcoreinfo), byte_order)
    return notes


def view_segments(present, dumped, granule: int) -> list[OutputSegment]:
    """PT_LOADs for present runs, each data run followed by its undumped pages as zero fill."""
    segments = []
    d = 0
    for first, count in present:
        end = first + count
        cursor = first
        while d < len(dumped) and dumped[d][0] < end:
            start, length = dumped[d]
            if start > cursor:  # present, not dumped, before the first data of the run
                segments.append(OutputSegment(cursor * granule, 0, 0, 0,
                                              (start - cursor) * granule, SEGMENT_FLAGS))
            next_start = dumped[d + 1][0] if d + 1 < len(dumped) else end
            reach = min(max(next_start, start + length), end)
            segments.append(OutputSegment(start * granule, 0, 0, length * granule,
                                          (reach - start) * granule, SEGMENT_FLAGS))
            cursor = reach
            d += 1
        if cursor < end:
            segments.append(OutputSegment(cursor * granule, 0, 0, 0, (end - cursor) * granule,
                                          SEGMENT_FLAGS))
    return segments


class ElfCoreView:
    """A Source whose bytes are the ELF core of a GranuleMemory; nothing is written.

    Reads of the headers and notes come from memory; reads of segment data
    come from the dump's granules (a partial granule at either end is read
    whole and cut). mmap is refused: the bytes do not exist in any file.
    """

    def __init__(self, memory: GranuleMemory, identity: ElfIdentity, notes: bytes,
                 closer=None):
        self.memory = memory
        self.name = identity.source_name
        # Memory read once, in order (a compressed stream): save must not
        # scan before copying, nor read struct pages (vmcap.save).
        self.sequential = memory.sequential
        self._closer = closer
        granule = memory.granule
        present, dumped = list(memory.present_runs()), list(memory.dumped_runs())
        segments = view_segments(present, dumped, granule)
        self._notes = notes + b"\0" * (-len(notes) % 4)
        image = plan_elf_image(identity, segments, len(self._notes), granule)
        self._head = image.header
        self._notes_offset = image.notes_offset
        data = [s for s in image.segments if s.filesz]
        self._offsets = [s.offset for s in data]
        self._data = data
        ends = [s.offset + s.filesz for s in image.segments if s.filesz]
        self.size = max([image.notes_offset + len(self._notes), *ends])

    def pread(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.pread_into(memoryview(buffer), offset)
        return bytes(buffer)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        if offset < 0 or offset + length > self.size:
            raise SourceIOError(f"{self.name}: unexpected end of data at offset {self.size:#x} "
                                f"(wanted {length} bytes from {offset:#x})", offset=self.size)
        done = 0
        granule = self.memory.granule
        while done < length:
            at = offset + done
            view = buffer[done:]
            if at < len(self._head):
                n = min(len(view), len(self._head) - at)
                view[:n] = self._head[at:at + n]
            elif at < self._notes_offset:
                n = min(len(view), self._notes_offset - at)
                view[:n] = bytes(n)
            elif at < self._notes_offset + len(self._notes):
                n = min(len(view), self._notes_offset + len(self._notes) - at)
                rel = at - self._notes_offset
                view[:n] = self._notes[rel:rel + n]
            else:
                i = bisect_right(self._offsets, at) - 1
                seg = self._data[i] if i >= 0 else None
                if seg is None or at >= seg.offset + seg.filesz:
                    # Between segments' data: alignment padding, zeros.
                    following = self._offsets[i + 1] if i + 1 < len(self._offsets) else self.size
                    n = min(len(view), following - at)
                    view[:n] = bytes(n)
                else:
                    n = min(len(view), seg.offset + seg.filesz - at)
                    paddr = seg.paddr + at - seg.offset
                    first = paddr // granule
                    last = -(-(paddr + n) // granule)
                    if paddr % granule == 0 and n % granule == 0:
                        self.memory.read_dumped_into(first, view[:n])
                    else:
                        whole = bytearray((last - first) * granule)
                        self.memory.read_dumped_into(first, memoryview(whole))
                        skip = paddr - first * granule
                        view[:n] = whole[skip:skip + n]
            done += n

    def map(self, offset: int, length: int) -> mmap.mmap:
        raise MmapRefused("an ELF view of a dump is not a file")

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None
