"""The copy plan: which source bytes are mapped, which are read, which are zero.

Pure functions over the layout's segments; no I/O here.

Firmware can put System RAM and reserved memory (ACPI tables, even MMIO) in
the same physical page. /proc/vmcore exports each PT_LOAD inside a
page-rounded chunk (fs/proc/vmcore.c), so the file page holding such a
*fractional* page also holds bytes that belong to no segment. Mapping that
page fails the kernel's cache-type check and touching its non-RAM part can
disturb a device. So:

* only file pages that lie wholly inside one segment's file data are mapped
  (``MappedRange``);
* every other byte of a segment's file data is read once with pread
  (``BufferedPiece``), never more than the segment's own bytes;
* bytes between p_filesz and p_memsz are zero (``ZeroFill``), nothing is read.

The plan lists every byte of every segment exactly once, segment by segment
in program header order. Segments that overlap (the x86_64 kernel-text
PT_LOAD overlaps a RAM PT_LOAD) are each copied whole, as makedumpfile -E
does, so each keeps its own p_offset in the output.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from typing import Iterable, Union

from ..formats.elf import Segment


@dataclass(frozen=True, slots=True)
class MappedRange:
    """Whole file pages inside one segment's file data: safe to mmap."""

    segment: int
    paddr: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BufferedPiece:
    """Segment bytes that share a file page with bytes of no (or another) segment."""

    segment: int
    paddr: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ZeroFill:
    """p_memsz beyond p_filesz: zeros that are not in the file."""

    segment: int
    paddr: int
    length: int


Step = Union[MappedRange, BufferedPiece, ZeroFill]


@dataclass(frozen=True, slots=True)
class PagePiece:
    """The part of one segment's file data that falls in a fractional page."""

    segment: int
    paddr: int
    size: int
    offset: int  # file offset of the piece's first byte


@dataclass(frozen=True, slots=True)
class FractionalPage:
    """A physical page holding segment bytes that no single segment covers whole."""

    paddr: int  # start of the page
    page_size: int
    pieces: tuple[PagePiece, ...]

    @property
    def ram_bytes(self) -> int:
        """Bytes of the page inside some segment (overlapping pieces counted once)."""
        covered = 0
        reach = self.paddr
        for piece in sorted(self.pieces, key=lambda p: p.paddr):
            start = max(piece.paddr, reach)
            end = piece.paddr + piece.size
            if end > start:
                covered += end - start
                reach = end
        return covered

    @property
    def non_ram_bytes(self) -> int:
        return self.page_size - self.ram_bytes

    @property
    def file_offset(self) -> int:
        """Where the page starts in the file, as seen from its first piece's segment."""
        first = self.pieces[0]
        return first.offset - (first.paddr - self.paddr)


@dataclass(frozen=True)
class CopyPlan:
    page_size: int
    steps: tuple[Step, ...]
    segments: tuple[Segment, ...]  # what the steps were planned from
    mapped_bytes: int
    buffered_bytes: int
    zero_fill_bytes: int

    @cached_property
    def fractional_pages(self) -> tuple[FractionalPage, ...]:
        """Computed when asked: copying does not need them, inspecting does."""
        return find_fractional_pages(self.segments, self.page_size)

    @property
    def file_bytes(self) -> int:
        """Bytes read from the source (mapped + buffered)."""
        return self.mapped_bytes + self.buffered_bytes

    @property
    def memory_bytes(self) -> int:
        return self.mapped_bytes + self.buffered_bytes + self.zero_fill_bytes


def _round_down(value: int, page_size: int) -> int:
    return value - value % page_size


def _round_up(value: int, page_size: int) -> int:
    return -(-value // page_size) * page_size


def plan_segment(segment: Segment, page_size: int) -> list[Step]:
    """The steps that copy one segment, in address order."""
    steps: list[Step] = []
    if segment.filesz:
        start = segment.offset
        end = segment.offset + segment.filesz
        # File pages, not physical pages: in a packed saved core the two are
        # not congruent, and mmap works on file pages.
        first_whole = _round_up(start, page_size)
        last_whole = _round_down(end, page_size)
        paddr_of = segment.paddr - segment.offset  # file offset -> paddr
        if last_whole > first_whole:
            if first_whole > start:
                steps.append(BufferedPiece(segment.index, segment.paddr, start,
                                           first_whole - start))
            steps.append(MappedRange(segment.index, paddr_of + first_whole, first_whole,
                                     last_whole - first_whole))
            if end > last_whole:
                steps.append(BufferedPiece(segment.index, paddr_of + last_whole, last_whole,
                                           end - last_whole))
        else:
            steps.append(BufferedPiece(segment.index, segment.paddr, start, segment.filesz))
    if segment.memsz > segment.filesz:
        steps.append(ZeroFill(segment.index, segment.paddr + segment.filesz,
                              segment.memsz - segment.filesz))
    return steps


def find_fractional_pages(segments: Iterable[Segment], page_size: int
                          ) -> tuple[FractionalPage, ...]:
    """Physical pages that hold file data of some segment but are covered by none whole.

    Only a segment's first and last page can be partly covered by it, so
    those are the candidates; a candidate stops being fractional when some
    other segment covers it whole (overlapping PT_LOADs).
    """
    with_data = [s for s in segments if s.filesz]
    pieces_by_page: dict[int, list[PagePiece]] = defaultdict(list)
    for s in with_data:
        start, end = s.paddr, s.paddr + s.filesz
        first_page = _round_down(start, page_size)
        last_page = _round_down(end - 1, page_size)
        candidates = []
        if start != first_page or end < first_page + page_size:
            candidates.append(first_page)
        if last_page != first_page and end != last_page + page_size:
            candidates.append(last_page)
        for page in candidates:
            piece_start = max(start, page)
            piece_end = min(end, page + page_size)
            pieces_by_page[page].append(PagePiece(s.index, piece_start, piece_end - piece_start,
                                                  s.offset + (piece_start - start)))
    if not pieces_by_page:
        return ()

    # Does any single segment cover [page, page + page_size)? Among segments
    # starting at or before the page, the furthest-reaching end decides.
    ordered = sorted((s.paddr, s.paddr + s.filesz) for s in with_data)
    starts = [start for start, _ in ordered]
    reach = list(accumulate((end for _, end in ordered), max))

    fractional = []
    for page in sorted(pieces_by_page):
        i = bisect_right(starts, page) - 1
        if i >= 0 and reach[i] >= page + page_size:
            continue
        pieces = tuple(sorted(pieces_by_page[page], key=lambda p: (p.paddr, p.segment)))
        fractional.append(FractionalPage(page, page_size, pieces))
    return tuple(fractional)


def plan_copy(segments: Iterable[Segment], page_size: int) -> CopyPlan:
    """Plan the copy of every segment, in program header order."""
    segments = tuple(segments)
    steps: list[Step] = []
    for segment in segments:
        steps.extend(plan_segment(segment, page_size))
    mapped = buffered = zero = 0
    for step in steps:
        if type(step) is MappedRange:
            mapped += step.length
        elif type(step) is BufferedPiece:
            buffered += step.length
        else:
            zero += step.length
    return CopyPlan(page_size, tuple(steps), segments,
                    mapped, buffered, zero)


def disjoint_segments(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """Segments sorted by paddr and trimmed so that none overlaps another.

    Page-based formats (kdump) store each physical page once, in pfn order;
    where PT_LOADs overlap (kernel text over RAM) the bytes are the same
    memory, so the part already covered by an earlier segment is dropped.
    The trimmed segments keep their source index and stay inside their
    source segment's file data, so planning them is as safe as planning the
    originals.
    """
    ordered = sorted(segments, key=lambda s: (s.paddr, -s.memsz, s.index))
    result = []
    covered = -1
    for s in ordered:
        start = max(s.paddr, covered)
        end = s.paddr + s.memsz
        if end <= start:
            continue
        skip = start - s.paddr
        in_file = min(skip, s.filesz)
        result.append(Segment(s.index, start, s.vaddr + skip, s.offset + in_file,
                              s.filesz - in_file, end - start, s.flags))
        covered = end
    return tuple(result)


def present_page_count(segments: Iterable[Segment], page_size: int) -> int:
    """Distinct physical pages touched by disjoint, sorted segments."""
    count = 0
    previous_last = -1
    for s in segments:
        if not s.memsz:
            continue
        first = s.paddr // page_size
        last = (s.paddr + s.memsz - 1) // page_size
        count += last - max(first, previous_last + 1) + 1 if last > previous_last else 0
        previous_last = max(previous_last, last)
    return count
