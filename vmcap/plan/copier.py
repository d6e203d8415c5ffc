"""Running the copy plan: source bytes out, in plan order, in bounded memory.

``iter_plan_data`` walks the plan and yields each segment's bytes as
``DataChunk``s: mmap windows for ``MappedRange`` steps, one pread for each
``BufferedPiece``, nothing read for ``ZeroFill``. A chunk's memoryview is
valid only until the next chunk is requested: the window behind it is
unmapped (or the read buffer reused) so memory stays at about one window
whatever the size of the dump. Consumers copy what they keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import SourceIOError
from ..fileio.mmapio import ALLOCATION_GRANULARITY, MappedBytes, MmapRefused, Source
from ..formats.note import ErrorRange
from .copyplan import BufferedPiece, CopyPlan, MappedRange

# 1 MiB a thread (save's default, SaveOptions.window_bytes None): a window's pages count
# in the resident set while mapped (4 MiB windows put a one-thread -d 31 capture at
# 41 MiB peak RSS, 1 MiB at 37 MiB) and a kdump batch is 1 MiB a thread, which a
# window's chunk fills without a copy; smaller windows cost no measurable CPU now that
# they end on physical pages.
DEFAULT_WINDOW_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Bytes of one segment starting at ``paddr``; ``data`` is None for zero fill,
    and for whole pages the copier's ``skip`` said not to read (``skipped``)."""

    segment: int
    paddr: int
    length: int
    data: memoryview | None
    skipped: bool = False


@dataclass
class CopyStats:
    mapped_bytes: int = 0  # bytes that actually came through mmap
    buffered_bytes: int = 0  # bytes that came through pread
    zero_fill_bytes: int = 0
    mmap_fallbacks: int = 0  # windows that could not be mapped and were read instead
    skipped_bytes: int = 0  # whole pages the caller's skip() had left unread
    mmap_refusal: str | None = None  # the first refusal's reason
    error_ranges: list[ErrorRange] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return self.mapped_bytes + self.buffered_bytes

    def record_error(self, paddr: int, length: int, reason: str) -> None:
        last = self.error_ranges[-1] if self.error_ranges else None
        if last and last.paddr + last.length == paddr and last.reason == reason:
            self.error_ranges[-1] = ErrorRange(last.paddr, last.length + length, reason)
        else:
            self.error_ranges.append(ErrorRange(paddr, length, reason))


class PlanCopier:
    """Reads a plan's bytes from one source."""

    def __init__(self, source: Source, plan: CopyPlan, *,
                 window_bytes: int = DEFAULT_WINDOW_BYTES,
                 on_error: str = "fail",
                 progress: Callable[[int], None] | None = None,
                 skip: Callable[[int, int], int] | None = None):
        if on_error not in ("fail", "zero"):
            raise ValueError(f"on_error must be 'fail' or 'zero', not {on_error!r}")
        granule = max(plan.page_size, ALLOCATION_GRANULARITY)
        # Windows must start on a page *and* an mmap granule boundary.
        self.window_bytes = max(granule, window_bytes - window_bytes % granule)
        self.granule = granule
        self.source = source
        self.plan = plan
        self.on_error = on_error
        self.progress = progress
        # skip(paddr, length): how many bytes from paddr on (whole pages, at most
        # length) the caller will not use (kdump at -d 31: excluded by their class).
        # They are not mapped: /proc/vmcore maps a window's page tables eagerly,
        # makedumpfile reads only the pages it dumps, and at -d 31 most of a big
        # machine is excluded. One answer covers a whole run, however many
        # windows long: a skipped run costs one chunk, not one per window.
        self.skip = skip
        self.stats = CopyStats()
        # pread's buffer, grown on demand: with mmap working it only ever holds the short
        # pieces at segment edges, and a capture kernel should not pay a window for nothing.
        self._buffer = bytearray(0)

    def __iter__(self) -> Iterator[DataChunk]:
        for step in self.plan.steps:
            if type(step) is MappedRange:
                yield from self._mapped(step)
            elif type(step) is BufferedPiece:
                yield self._read(step.segment, step.paddr, step.offset, step.length)
                self.stats.buffered_bytes += step.length
            else:
                self.stats.zero_fill_bytes += step.length
                yield DataChunk(step.segment, step.paddr, step.length, None)

    def _mapped(self, step: MappedRange) -> Iterator[DataChunk]:
        offset, end = step.offset, step.offset + step.length
        paddr_of = step.paddr - step.offset
        # The plan's ranges are page-aligned; the host may need a larger mmap
        # granule (a 4 KiB-page dump read on a 64 KiB-page host). Whole pages
        # of the range are safe to read, so read up to the next granule.
        head_end = min(end, -(-offset // self.granule) * self.granule)
        if head_end > offset:
            yield self._read(step.segment, paddr_of + offset, offset, head_end - offset)
            self.stats.buffered_bytes += head_end - offset
            offset = head_end
        page = self.plan.page_size
        # Where file pages and physical pages are out of step (QEMU's and makedumpfile
        # -E's packed layouts put a segment at any file offset), chunks end on a
        # physical page boundary all the same: a window starts at the granule below
        # its chunk. Cut on the file's grid, every window would split a page that the
        # kdump writer then assembles and stores as a batch of one.
        phase = -paddr_of % page
        while offset < end:
            start = offset - offset % self.granule
            stop = start + self.window_bytes
            if phase:
                stop = max(stop - (stop - phase) % page, offset + page)
            stop = min(stop, end)
            length = stop - offset
            if self.skip is not None:
                unused = self.skip(paddr_of + offset, end - offset)
                if unused:
                    self.stats.skipped_bytes += unused
                    if self.progress:
                        self.progress(unused)
                    yield DataChunk(step.segment, paddr_of + offset, unused, None, skipped=True)
                    offset += unused
                    continue
            try:
                mapping = self.source.map(start, stop - start)
            except MmapRefused as refusal:
                self.stats.mmap_fallbacks += 1
                if self.stats.mmap_refusal is None:
                    self.stats.mmap_refusal = str(refusal)
                yield self._read(step.segment, paddr_of + offset, offset, length)
                self.stats.buffered_bytes += length
            else:
                with MappedBytes(mapping, offset - start, length) as view:
                    yield DataChunk(step.segment, paddr_of + offset, length, view)
                self.stats.mapped_bytes += length
                if self.progress:
                    self.progress(length)
            offset = stop

    def _read(self, segment: int, paddr: int, offset: int, length: int) -> DataChunk:
        """One pread into the reusable buffer; on error fail or zero-fill per policy."""
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        view = memoryview(self._buffer)[:length]
        try:
            self.source.pread_into(view, offset)
        except SourceIOError:
            # Find the unreadable pages: the error names where the big read
            # started, the user needs the physical address that failed.
            bad = self._read_page_by_page(view, paddr, offset)
            if self.on_error == "fail" and bad:
                bad_paddr, _, reason = bad[0]
                bad_offset = offset + (bad_paddr - paddr)
                raise SourceIOError(
                    f"{self.source.name}: cannot read physical address {bad_paddr:#x} "
                    f"(file offset {bad_offset:#x}): {reason}",
                    offset=bad_offset, paddr=bad_paddr) from None
            for bad_paddr, bad_length, reason in bad:
                self.stats.record_error(bad_paddr, bad_length, reason)
        if self.progress:
            self.progress(length)
        return DataChunk(segment, paddr, length, view)

    def _read_page_by_page(self, view: memoryview, paddr: int, offset: int
                           ) -> list[tuple[int, int, str]]:
        """Salvage what can be read; zero each unreadable page and return them."""
        page = self.plan.page_size
        bad = []
        pos = 0
        while pos < len(view):
            # Stay on the physical page grid so reported ranges are page-sized.
            step = min(len(view) - pos, page - (paddr + pos) % page)
            part = view[pos:pos + step]
            try:
                self.source.pread_into(part, offset + pos)
            except SourceIOError as error:
                part[:] = bytes(step)
                bad.append((paddr + pos, step, _reason(error)))
            pos += step
        return bad


def _reason(error: SourceIOError) -> str:
    """The OS's words for an error ('Input/output error'), without our prefix."""
    text = str(error)
    return text.rsplit(": ", 1)[-1] if ": " in text else text
