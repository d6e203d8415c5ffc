"""Dump levels for the ELF formats: find excluded pages, split PT_LOADs around them.

An ELF header comes before the data, so which pages are left out must be
known before the first byte is written: a scan pass reads the whole pages
once (mmap windows; fractional pieces are never part of it, they are read
once, in the copy pass) and records runs of excluded pages. The output then
follows makedumpfile -E: a run of at least ``MIN_EXCLUDED_RUN`` pages ends a
PT_LOAD (it goes into p_memsz, not p_filesz) and the next one starts after
it; shorter runs are written with their real contents (zeros, for zero
pages), because another program header costs more than it saves; a run at
the very end of a segment's data always becomes zero fill.

What a dump level means for one output is decided once, by ExclusionPolicy:
which page classes go, whether zero pages are left out, stored once (kdump's
shared zero page) or kept, whether struct pages must be classified, and
what re-filtering a saved dump allows (SavedLevel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import Unsupported
from ..formats.elf import Segment
from ..kernel.dumplevel import EXCLUDED_CLASSES, DumpLevel
from .copier import PlanCopier
from .copyplan import CopyPlan, MappedRange

MIN_EXCLUDED_RUN = 256  # makedumpfile's PFN_EXCLUDED
MASK_PIECE_PFNS = 1 << 20  # runs_from_mask reads the exclusion mask this many pfns at a time
PAGE_FORMATS = ("kdump", "kdump-flat")  # one page at a time, zero pages found while writing
# What happens to all-zero pages.
ZERO_EXCLUDED = "excluded"  # left out (ELF: zero fill; kdump: cleared from the 2nd bitmap)
ZERO_SHARED = "shared"      # kdump: dumped, every one pointing at one stored zero page
ZERO_KEPT = "kept"          # written like any other page


@dataclass(frozen=True)
class SavedLevel:
    """The dump level of a save's source: 0 for /proc/vmcore, its own for a saved dump.

    drops_zero: an ELF core saved with bit 1, whose zero pages are gone (a
    kdump file keeps them readable); sequential: the source is read once, in
    order, so no struct pages can be classified and nothing scanned first.
    """

    level: DumpLevel = DumpLevel(0)
    drops_zero: bool = False
    sequential: bool = False

    def levels_to_write(self, source_path: str, levels, *, inherit: bool) -> tuple[DumpLevel, ...]:
        """The levels a save asked for (a -d list), as they will be written.

        ``inherit`` (no -d given, or makedumpfile's command line): the
        source's bits are added. Otherwise a level without every bit of the
        source's is refused (exit 8): makedumpfile silently adds them when it
        re-filters; vmcap says so instead, so that the level asked for is the
        level written.
        """
        levels = tuple(DumpLevel.of(level) for level in levels)
        if inherit:
            return tuple(level | self.level for level in levels)
        for level in levels:
            if not level.includes(self.level):
                raise Unsupported(
                    f"{source_path} was saved at dump level {self.level}: the pages it left out "
                    f"cannot come back, so dump level {level} is impossible; use a level that "
                    f"includes {self.level}'s bits, such as -d {level | self.level}")
        return levels

    def needs_struct_pages(self, level: DumpLevel) -> bool:
        """Whether writing ``level`` classifies pages the source kept (bits 2-16 it lacks)."""
        return level.without(self.level).needs_kernel


@dataclass(frozen=True)
class ExclusionPolicy:
    """What one dump level means for one output, from one source.

    ``level`` is the level written (the source's bits included);
    ``zero_pages`` is the --zero-pages choice for kdump at bit 1 ("shared"
    or "exclude").
    """

    level: DumpLevel
    output_format: str = "zelf"
    zero_pages: str = "shared"
    source: SavedLevel = SavedLevel()

    def __post_init__(self):
        object.__setattr__(self, "level", DumpLevel.of(self.level | self.source.level))

    @property
    def page_format(self) -> bool:
        """kdump and kdump-flat: pages one at a time, zero pages found while writing."""
        return self.output_format in PAGE_FORMATS

    @property
    def classifies(self) -> bool:
        """Whether the kernel's struct pages must be classified before writing."""
        return self.level.needs_kernel and not self.source.sequential

    @property
    def excluded_classes(self) -> tuple[str, ...]:
        """The kernel page classes left out: the level's, and hwpoison and offline
        whenever struct pages are classified (makedumpfile never dumps those)."""
        if not self.classifies:
            return ()
        wanted = set(self.level.names()) | {"hwpoison", "offline"}
        return tuple(name for name in EXCLUDED_CLASSES if name in wanted)

    @property
    def zero_mode(self) -> str:
        """ZERO_EXCLUDED, ZERO_SHARED or ZERO_KEPT: what becomes of all-zero pages."""
        if not self.level.excludes_zero:
            return ZERO_KEPT
        if self.page_format:
            # A source whose zero pages are gone cannot share them: say they are excluded.
            exclude = self.zero_pages == "exclude" or self.source.drops_zero
            return ZERO_EXCLUDED if exclude else ZERO_SHARED
        # The ELF header comes first: without a scan pass, zero pages stay in.
        return ZERO_KEPT if self.source.sequential else ZERO_EXCLUDED

    @property
    def kdump_zero_pages(self) -> str:
        """The --zero-pages mode a kdump output records (its note's ZERO_PAGES)."""
        return "exclude" if self.page_format and self.source.drops_zero else self.zero_pages

    @property
    def cuts_segments(self) -> bool:
        """ELF formats: whether PT_LOADs are split around excluded runs (found before writing)."""
        return not self.page_format and bool(self.level) and not self.source.sequential

    @property
    def scans_zero_pages(self) -> bool:
        """ELF formats: whether a scan pass reads every page to find the zero ones."""
        return self.cuts_segments and self.zero_mode == ZERO_EXCLUDED

    def warnings(self) -> list[str]:
        """What the output does differently from what the level allows."""
        if not self.page_format and self.source.sequential and self.level.excludes_zero:
            return ["the source is read once, in order: its zero pages are kept, not "
                    "excluded (dump level bit 1 allows both)"]
        return []

    def without_kernel_classes(self) -> ExclusionPolicy:
        """The policy when struct pages cannot be classified: bit 1 kept, the source's bits kept."""
        return replace(self, level=self.level & DumpLevel.ZERO | self.source.level)


@dataclass(frozen=True, slots=True)
class ExcludedRun:
    segment: int
    paddr: int
    length: int


class RunTracker:
    """Accumulates runs of excluded pages of one segment across chunks."""

    def __init__(self, segment: Segment, page_size: int):
        self.segment = segment
        self.page_size = page_size
        self.runs: list[ExcludedRun] = []
        self._start: int | None = None
        self._end = 0

    def add(self, paddr: int, excluded: np.ndarray) -> None:
        """``excluded[i]`` tells whether page paddr + i*page_size is excluded."""
        if not len(excluded):
            return
        page = self.page_size
        # Runs of equal flags in this block.
        edges = np.flatnonzero(np.diff(excluded.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges)).tolist()
        ends = np.concatenate((edges, [len(excluded)])).tolist()
        for first, last in zip(starts, ends):
            run_paddr = paddr + first * page
            run_end = paddr + last * page
            if excluded[first]:
                if self._start is not None and self._end == run_paddr:
                    self._end = run_end
                else:
                    self._close()
                    self._start, self._end = run_paddr, run_end
            else:
                self._close()

    def _close(self) -> None:
        if self._start is None:
            return
        length = self._end - self._start
        trailing = self._end == self.segment.paddr + self.segment.filesz
        if trailing or length >= MIN_EXCLUDED_RUN * self.page_size:
            self.runs.append(ExcludedRun(self.segment.index, self._start, length))
        self._start = None

    def finish(self) -> list[ExcludedRun]:
        self._close()
        return self.runs


def page_flags_of_chunk(paddr: int, data, page_size: int) -> tuple[int, np.ndarray]:
    """(paddr of first whole physical page, all-zero flag per whole page) of a chunk."""
    skip = -paddr % page_size
    count = max(0, (len(data) - skip) // page_size)
    if not count:
        return paddr + skip, np.zeros(0, dtype=bool)
    body = np.frombuffer(data, dtype=np.uint8, count=count * page_size, offset=skip)
    if page_size % 8 == 0 and (body.ctypes.data % 8 == 0):
        rows = body.view(np.uint64).reshape(count, page_size // 8)
    else:
        rows = body.reshape(count, page_size)
    return paddr + skip, ~rows.any(axis=1)


@dataclass(frozen=True)
class ScanResult:
    runs: list[ExcludedRun]
    zero_pages: int  # all-zero pages seen that no kernel class excludes (in runs or not)


def scan_excluded_runs(copier_factory, plan: CopyPlan, segments: dict[int, Segment],
                       page_size: int, *, exclude_zero: bool,
                       class_excluded: np.ndarray | None = None) -> ScanResult:
    """Read the plan's mapped ranges once and find the runs to exclude.

    ``copier_factory(plan)`` returns a PlanCopier over the source;
    ``class_excluded`` is the per-pfn bitmap from page classification.
    """
    zero_pages = 0
    scan_plan = CopyPlan(plan.page_size, tuple(s for s in plan.steps if type(s) is MappedRange),
                         plan.segments, plan.mapped_bytes, 0, 0)
    trackers: dict[int, RunTracker] = {}
    copier: PlanCopier = copier_factory(scan_plan)
    for chunk in copier:
        if chunk.data is None:
            continue
        tracker = trackers.get(chunk.segment)
        if tracker is None:
            tracker = trackers[chunk.segment] = RunTracker(segments[chunk.segment], page_size)
        first, zero = page_flags_of_chunk(chunk.paddr, chunk.data, page_size)
        excluded = zero if exclude_zero else np.zeros(len(zero), dtype=bool)
        if class_excluded is not None and len(zero):
            pfn = first // page_size
            known = class_excluded[pfn:pfn + len(zero)]
            excluded = excluded.copy()
            excluded[:len(known)] |= known
        # A page that could not be read (zero-filled under --on-error=zero)
        # is kept, so the copy pass meets the error again and records it.
        for error in copier.stats.error_ranges:
            lo = max(0, (error.paddr - first) // page_size)
            hi = min(len(excluded), -(-(error.paddr + error.length - first) // page_size))
            if lo < hi:
                excluded = excluded.copy()
                excluded[lo:hi] = False
        # Pages cut by a window edge (only in packed cores) are not in the
        # flags at all: never exclude what was not seen whole.
        tracker.add(first, excluded)
        if exclude_zero:
            zero_only = excluded & zero
            if class_excluded is not None and len(zero):
                zero_only[:len(known)] &= ~known
            zero_pages += int(zero_only.sum())
    runs = []
    for tracker in trackers.values():
        runs.extend(tracker.finish())
    return ScanResult(runs, zero_pages)


def runs_from_mask(segments, excluded: np.ndarray, page_size: int) -> list[ExcludedRun]:
    """Runs to exclude when the per-pfn mask is known without reading (no zero-page bit)."""
    runs: list[ExcludedRun] = []
    for seg in segments:
        first = -(-seg.paddr // page_size)
        last = (seg.paddr + seg.filesz) // page_size
        if last <= first:
            continue
        tracker = RunTracker(seg, page_size)
        # A piece at a time: a 1 TiB segment is 2**28 pfns.
        for lo in range(first, last, MASK_PIECE_PFNS):
            hi = min(last, lo + MASK_PIECE_PFNS)
            mask = np.zeros(hi - lo, dtype=bool)
            known = excluded[lo:hi]  # shorter past the end of the mask
            mask[:len(known)] = known
            tracker.add(lo * page_size, mask)
        runs.extend(tracker.finish())
    return runs


def split_segments(segments, runs: list[ExcludedRun]) -> list[Segment]:
    """Output segments: each source segment cut around its excluded runs.

    The results reference the *source* file offsets (so they can be planned
    and copied like source segments) and are numbered in output order.
    """
    by_segment: dict[int, list[ExcludedRun]] = {}
    for run in runs:
        by_segment.setdefault(run.segment, []).append(run)
    out: list[Segment] = []

    def emit(src: Segment, start: int, filesz: int, memsz: int) -> None:
        delta = start - src.paddr
        out.append(Segment(len(out), start, src.vaddr + delta, src.offset + min(delta, src.filesz),
                           filesz, memsz, src.flags))

    for src in segments:
        start = src.paddr
        data_end = src.paddr + src.filesz
        mem_end = src.paddr + src.memsz
        for run in sorted(by_segment.get(src.index, ()), key=lambda r: r.paddr):
            run_end = run.paddr + run.length
            if run_end == data_end:
                break  # trailing: the rest of the segment is zero fill
            emit(src, start, run.paddr - start, run_end - start)
            start = run_end
        else:
            emit(src, start, data_end - start, mem_end - start)
            continue
        emit(src, start, run.paddr - start, mem_end - start)
    return out
