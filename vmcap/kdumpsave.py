"""`vmcap save --format kdump`, and inspect/verify of kdump-compressed files.

The copy plan is made over disjoint segments (``disjoint_segments``) so its
bytes come in physical-address order; ``PageStream`` cuts them into pages
for ``KdumpWriter``. A fractional page is assembled from its RAM pieces
(each read once, with pread, by the copy engine) over zeros: its non-RAM
part is zero in the output and the page is present, so every RAM byte of it
survives (makedumpfile 1.7.2 drops such pages from kdump files).

Pages wholly in a segment's zero fill (beyond p_filesz) hold no data in the
source: like makedumpfile (exclude_nodata_pages) they are marked present in
the 1st bitmap and left out of the 2nd, a range at a time. Written page by
page, a p_memsz of 2**40 would take minutes and gigabytes of descriptors.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .errors import BadSource, Unsupported
from .fileio.output import OutputFile
from .formats.flattened import FlattenedWriter
from .formats.head import KdumpFile
from .formats.kdump import BITMAP_WINDOW_BYTES, KdumpHeaderInfo, KdumpLayout, KdumpWriter
from .formats.note import DIGEST_LINE_KEYS, Incomplete, VmcapNote, aligned_notes, placeholders
from .kernel.dumplevel import ExclusionCounts
from .plan.copier import PlanCopier
from .plan.copyplan import CopyPlan, disjoint_segments, present_page_count
from .plan.exclude import ZERO_EXCLUDED, ZERO_SHARED, ExclusionPolicy
from .source.layout import Layout

# The writer streams its bitmaps, but readers (crash, makedumpfile, drgn)
# load them: past this many pfns (32 TiB of physical address space with
# 4 KiB pages) each bitmap would be over 1 GiB. Refuse, clearly.
MAX_KDUMP_PFNS = 1 << 33


class PageStream:
    """Turns (paddr, bytes) runs in increasing address order into whole pages."""

    def __init__(self, writer: KdumpWriter, page_size: int, excluded=None):
        self.writer = writer
        self.page_size = page_size
        self._partial = bytearray(page_size)
        self._partial_pfn: int | None = None
        # Optional per-pfn exclusion (kernel page classes: a CyclicExclusion, which
        # slices into bool arrays; excluded_bytes also asks its first_clear): such
        # pages are left out of the dump entirely (they stay present in bitmap 1).
        self._excluded = excluded
        self.zero_fill_pages = 0  # whole pages of zero fill, present but not dumped

    def _emit(self, pfn: int, pages) -> None:
        if self._excluded is None:
            self.writer.write_pages(pfn, pages)
            return
        count = len(pages) // self.page_size
        mask = self._excluded[pfn:pfn + count]
        if not mask.any():
            self.writer.write_pages(pfn, pages)
            return
        keep = np.flatnonzero(~mask)
        if not len(keep):
            self.writer.mark_present(pfn, count)
            return
        # Runs of kept pages, written with the excluded ones marked present only.
        breaks = np.flatnonzero(np.diff(keep) != 1) + 1
        cursor = pfn
        for run in np.split(keep, breaks):
            first, last = int(run[0]) + pfn, int(run[-1]) + pfn
            if first > cursor:
                self.writer.mark_present(cursor, first - cursor)
            start = (first - pfn) * self.page_size
            self.writer.write_pages(first, pages[start:start + (last - first + 1) * self.page_size])
            cursor = last + 1
        if cursor < pfn + count:
            self.writer.mark_present(cursor, pfn + count - cursor)

    def add_excluded(self, paddr: int, length: int) -> None:
        """Whole pages at [paddr, paddr+length) that the exclusion drops all of, left unread."""
        self._flush_partial()
        count = length // self.page_size
        self.writer.mark_present(paddr // self.page_size, count)

    def excluded_bytes(self, paddr: int, length: int) -> int:
        """How many bytes from paddr on (whole pages, at most length) the exclusion drops every page of."""
        page = self.page_size
        if self._excluded is None or paddr % page or length < page:
            return 0
        first = paddr // page
        # One answer however long the run: the classification's bitmap scans its packed bytes.
        return (self._excluded.first_clear(first, first + length // page) - first) * page

    def _flush_partial(self) -> None:
        if self._partial_pfn is not None:
            self._emit(self._partial_pfn, memoryview(self._partial))
            self._partial_pfn = None

    def _add_partial(self, paddr: int, data) -> None:
        pfn, start = divmod(paddr, self.page_size)
        if self._partial_pfn != pfn:
            self._flush_partial()
            self._partial[:] = bytes(self.page_size)
            self._partial_pfn = pfn
        if data is not None:
            self._partial[start:start + len(data)] = data

    def add(self, paddr: int, length: int, data: memoryview | None) -> None:
        """Bytes (or zeros when data is None) at [paddr, paddr+length)."""
        page = self.page_size
        end = paddr + length
        head_end = min(end, -(-paddr // page) * page)
        if head_end > paddr:
            self._add_partial(paddr, None if data is None else data[:head_end - paddr])
        whole_end = end - end % page
        if whole_end > head_end:
            self._flush_partial()
            if data is None:
                count = (whole_end - head_end) // page
                self.writer.mark_present(head_end // page, count)
                self.zero_fill_pages += count
            else:
                self._emit(head_end // page, data[head_end - paddr:whole_end - paddr])
        tail_start = max(whole_end, head_end)
        if end > tail_start:
            self._add_partial(tail_start, None if data is None else data[tail_start - paddr:])

    def close(self) -> None:
        self._flush_partial()


def ram_pfn_runs(segments, page_size: int, *, data_only: bool = False) -> list[tuple[int, int]]:
    """(first pfn, count) of every page the segments touch, merged, in increasing order.

    ``data_only``: the pages of their file data (p_filesz), the only ones
    that can be dumped; zero fill beyond it is present, never dumped.
    """
    runs: list[list[int]] = []
    for seg in sorted(segments, key=lambda s: s.paddr):
        size = seg.filesz if data_only else seg.memsz
        if not size:
            continue
        first, end = seg.paddr // page_size, -(-(seg.paddr + size) // page_size)
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([first, end])
    return [(first, end - first) for first, end in runs]


def metadata_ranges(layout: KdumpLayout, ram_runs, data_runs=None) -> list[tuple[int, int]]:
    """(offset, length) of what the kdump metadata can occupy: the header blocks,
    the bitmap windows that hold RAM pfns (the rest stay holes; for the 2nd
    bitmap only pfns that can be dumped, ``data_runs``) and the descriptor
    table. Reserved before the data, so a full disk cannot stop it."""
    window_pfns = BITMAP_WINDOW_BYTES * 8

    def windows_of(runs):
        return sorted({w for first, count in runs
                       for w in range(first // window_pfns, (first + count - 1) // window_pfns + 1)})

    ranges = [(0, layout.present_bitmap_offset)]
    for base, runs in ((layout.present_bitmap_offset, ram_runs),
                       (layout.dumped_bitmap_offset, ram_runs if data_runs is None else data_runs)):
        for window in windows_of(runs):
            start = window * BITMAP_WINDOW_BYTES
            ranges.append((base + start, min(BITMAP_WINDOW_BYTES, layout.bitmap_bytes - start)))
    ranges.append((layout.descriptor_offset, layout.data_offset - layout.descriptor_offset))
    return ranges


def flattened_metadata_bytes(layout: KdumpLayout, ram_runs, data_runs=None) -> int:
    """Most bytes the records written by close() take in a flattened stream:
    the bitmap windows holding RAM pfns, the sub header with notes, the
    header block, the size record and the end marker, with record headers."""
    ranges = metadata_ranges(layout, ram_runs, data_runs)
    bitmaps = ranges[1:-1]
    return (sum(length for _, length in bitmaps) + layout.present_bitmap_offset
            + 16 * (len(bitmaps) + 8) + layout.block_size)


def zero_fill_page_runs(segments, page_size: int) -> list[tuple[int, int]]:
    """(first pfn, count) of the pages wholly in a disjoint segment's zero fill.

    PageStream marks exactly these present without dumping them: the zero
    fill comes as one chunk per segment, and no other disjoint segment
    touches a page that lies wholly inside this one.
    """
    runs = []
    for s in segments:
        first = -(-(s.paddr + s.filesz) // page_size)
        end = (s.paddr + s.memsz) // page_size
        if end > first:
            runs.append((first, end - first))
    return runs


def _bits_set(bitmap, first: int, count: int, step: int = 1 << 24) -> int:
    """Set bits of a per-pfn bitmap in [first, first+count), unpacked a bounded piece at a time."""
    end = min(first + count, len(bitmap))
    return sum(int(bitmap[lo:min(lo + step, end)].sum()) for lo in range(first, end, step))


def write_kdump(layout: Layout, plan: CopyPlan, copier: PlanCopier, out: OutputFile,
                options, policy: ExclusionPolicy, excluded=None,
                counts: ExclusionCounts = ExclusionCounts()) -> ExclusionCounts:
    """Write a kdump-compressed file; ``plan`` must be made over disjoint segments.

    ``excluded`` is the per-pfn mask of the kernel classes ``policy`` leaves
    out; returns ``counts`` (theirs) with the zero and zero-fill pages added.
    """
    page = layout.page_size
    segments = disjoint_segments(layout.segments)
    max_end = max((s.paddr + s.memsz for s in segments), default=0)
    if max_end == 0:
        raise BadSource(f"{layout.source_name}: no memory to dump (no non-empty PT_LOAD)")
    max_mapnr = -(-max_end // page)
    if max_mapnr > MAX_KDUMP_PFNS:
        bitmap_mib = -(-max_mapnr // 8) >> 20
        raise Unsupported(
            f"{layout.source_name}: memory reaches physical address {max_end:#x}; a kdump "
            f"file would need two {bitmap_mib} MiB bitmaps, which its readers load (vmcap's "
            f"limit is {MAX_KDUMP_PFNS} pages); use --format zelf or elf")
    notes = aligned_notes(layout.note_bytes)
    vmcap_note = VmcapNote(source=layout.source_name, page_size=page, output_format="kdump",
                           compress=options.compress, dump_level=int(options.dump_level),
                           zero_pages=options.zero_pages, digests=placeholders(DIGEST_LINE_KEYS))

    def all_notes(error_ranges, values=None, incomplete=None) -> bytes:
        note = vmcap_note.with_errors(error_ranges)
        if values is not None:
            note = note.with_digests(values)
        return notes + replace(note, incomplete=incomplete).build(layout.byte_order)

    info = KdumpHeaderInfo(
        machine=layout.platform.utsname,
        elf_class=layout.elf_class, byte_order=layout.byte_order, page_size=page,
        release=layout.osrelease or "", nr_cpus=max(layout.cpus, 1),
        vmcoreinfo=layout.vmcoreinfo_raw,
        notes=all_notes(()),
        crash_time=layout.crash_time or 0)
    level = options.compression_level()
    # Page descriptors are reserved before the data: one per page that may
    # be dumped. Pages a kernel class excludes need none; zero pages are only
    # known while copying, so their share stays reserved (a sparse hole).
    zero_fill = zero_fill_page_runs(segments, page)
    may_dump = present_page_count(segments, page) - sum(count for _, count in zero_fill)
    if excluded is not None:
        # A page both excluded and zero fill is left out once.
        may_dump -= excluded.count() - sum(_bits_set(excluded, first, count)
                                           for first, count in zero_fill)
    # Dump level 1: makedumpfile keeps zero pages in the 2nd bitmap, all
    # pointing at one stored zero page, so readers see zeros. Clearing them
    # from the bitmap (--zero-pages exclude) saves 24 bytes a page, but then
    # crash (without --zero_excluded), drgn and makedumpfile --dump-dmesg
    # fail on them, and unused parts of live kernel structures (the printk
    # descriptor ring) are such pages.
    exclude_zero = policy.zero_mode == ZERO_EXCLUDED
    # kdump-flat: every positional write becomes a record of a stream, which
    # a pipe can take (makedumpfile -F); `makedumpfile -R` rebuilds the file.
    flat = FlattenedWriter(out) if options.output_format == "kdump-flat" else None
    writer = KdumpWriter(KdumpFile(out) if flat is None else flat, info, max_mapnr=max_mapnr,
                         compress=options.compress,
                         level=level, threads=options.threads,
                         exclude_zero=exclude_zero,
                         max_pages_present=max(may_dump, 0),
                         dump_level=int(policy.level),
                         size_limit=options.size_limit if flat is None else None)
    # Room for the metadata, taken before the data: when the disk fills up,
    # what was written can still be finished as a readable dump.
    ram_runs = ram_pfn_runs(segments, page)
    data_runs = ram_pfn_runs(segments, page, data_only=True)
    if flat is None:
        for offset, length in metadata_ranges(writer.layout, ram_runs, data_runs):
            out.reserve_range(offset, length)
    else:
        out.set_tail_reserve(flattened_metadata_bytes(writer.layout, ram_runs, data_runs))
    ram_pages = sum(count for _, count in ram_runs)

    def finish_incomplete() -> str | None:
        """After an output failure: close the pages stored so far as a flagged incomplete dump."""
        cut = writer.stored_through
        saved = sum(max(0, min(count, cut - first)) for first, count in ram_runs)
        if saved == 0:
            writer.close(incomplete_present=[])  # stops the compressor threads
            return None
        if flat is not None:
            flat.cut_to_whole_records()
        incomplete = Incomplete(saved * page, ram_pages * page, cut * page)
        errors = copier.stats.error_ranges
        writer.close(lambda values: all_notes(errors, values, incomplete), incomplete_present=ram_runs)
        if flat is not None:
            flat.close()
        return incomplete.describe()

    out.keep_incomplete(finish_incomplete)
    stream = PageStream(writer, page, excluded)
    if excluded is not None and copier.skip is None:
        # Runs of excluded pages are not even mapped. (A source read once, in
        # order, is never classified: ExclusionPolicy.classifies.)
        copier.skip = stream.excluded_bytes
    for chunk in copier:
        if chunk.skipped:
            stream.add_excluded(chunk.paddr, chunk.length)
        else:
            stream.add(chunk.paddr, chunk.length, chunk.data)
    stream.close()
    errors = copier.stats.error_ranges
    # The sink finishes the head (the header block last); the output's size follows.
    stats = writer.close(lambda values: all_notes(errors, values))
    if flat is not None:
        flat.close()
    return replace(counts, zero_fill=stream.zero_fill_pages,
                   zero=stats.zero_pages_excluded if exclude_zero else None,
                   zero_shared=stats.zero_pages_shared if policy.zero_mode == ZERO_SHARED else None)
