"""`vmcap verify` and `vmcap decompress`: reading vmcap's outputs back.

verify proves a dump whole in two steps. Alone, it checks everything the
file can vouch for: zelf frames against zstd's content checksums and the
seek table's, plain ELF and kdump files against the XXH64 digests their
VMCAP note records (see vmcap.formats.digest), and a kdump file's structure
(headers, bitmaps, page descriptors). With ``--source`` it also re-derives
what the dump should hold: every byte of the source's segments (their
zero fill included) must be represented in the dump, and no other; the page
classes the recorded dump level excludes are classified again on the
source, and every other source page must be in the dump, byte for byte (at
dump levels with bit 1, a page the dump dropped must be zero in the source).
"""

from __future__ import annotations

import os
from bisect import bisect_right

import numpy as np

from .errors import BadSource, CorruptOutput, SourceIOError, VerifyMismatch
from .fileio.output import OutputFile, SparseSink, check_output_target, refuse_same_files
from .formats.digest import UNKNOWN, file_digest
from .formats.kdump import KdumpReader
from .formats.note import DIGEST_LINE_KEYS, NOTE_NAME, VmcapNote, locate_note, value_offset
from .kernel.dumplevel import DumpLevel
from .plan.exclude import ZERO_EXCLUDED, ExclusionPolicy
from .source.dumpfile import ElfPhysicalView, detect_container, open_elf_source
from .source.layout import read_layout

COMPARE_BYTES = 4 << 20
# How far into a plain ELF output verify looks for its notes.
MAX_HEAD_BYTES = 64 << 20


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length buffers (vectorised)."""
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return int(diff[0])


def verify(dump_path: str, source_path: str | None = None, *,
           vmcoreinfo: bytes | None = None) -> dict:
    """Check a dump's container and digests; with a source, that it holds what it should.

    ``vmcoreinfo`` (a file's text) stands in for a source without the note;
    by default the VMCOREINFO the dump carries does.
    """
    container = detect_container(dump_path)
    if container in ("kdump", "kdump-flat"):
        return verify_kdump(dump_path, source_path, vmcoreinfo=vmcoreinfo)
    if container == "unknown":
        raise CorruptOutput(f"{dump_path}: not a vmcap output (no ELF, zstd or kdump signature)")
    result: dict = {"dump": dump_path, "container": container}
    try:
        out_source = open_elf_source(dump_path)
    except (BadSource, SourceIOError) as error:
        raise CorruptOutput(str(error)) from None
    try:
        try:
            if container == "zstd-seekable":
                frames = 0
                for _ in out_source.reader.iter_frames():
                    frames += 1
                result["frames"] = frames
                result["decompressed_bytes"] = out_source.size
            layout = read_layout(out_source)
        except (BadSource, SourceIOError) as error:
            raise CorruptOutput(f"{dump_path}: {error}") from None
        result["segments"] = len(layout.segments)
        note, span = checked_note(layout.note_bytes, layout.byte_order, dump_path)
        if container == "zstd-seekable":
            # Every frame, the header frame included, was checked against its checksums.
            result["digest"] = "zstd checksums" if out_source.reader.has_checksums else "none"
        else:
            result["digest"] = check_elf_digests(dump_path, layout, note, span)
        if source_path is not None:
            dump_level = recorded_level(dump_path, (note.dump_level if note is not None else None) or 0,
                                        "its VMCAP note's DUMP_LEVEL")
            result["dump_level"] = int(dump_level)
            policy = ExclusionPolicy(dump_level, "zelf" if container == "zstd-seekable" else "elf")
            result.update(compare_with_source(ElfPhysicalView(layout, out_source), source_path, policy,
                                              vmcoreinfo=vmcoreinfo or layout.vmcoreinfo_raw))
    finally:
        out_source.close()
    result["status"] = "ok"
    return result


def recorded_level(dump_path: str, value, where: str) -> DumpLevel:
    """The dump level a dump says it was saved at; CorruptOutput if it is none."""
    try:
        return DumpLevel.of(int(value))
    except ValueError:
        raise CorruptOutput(f"{dump_path}: {where} is {str(value)[:40]!r}, not a dump level "
                            "from 0 to 31") from None


def checked_note(note_bytes: bytes, byte_order: str, where: str):
    """(the VMCAP note, its NoteSpan) among the notes, or (None, None) if it has none.

    A damaged note is CorruptOutput (see note.locate_note), and so is the
    note of a dump kept after a full disk or a write error: readable, but
    not a whole dump.
    """
    note, span = locate_note(note_bytes, byte_order, where)
    if note is not None and note.incomplete is not None:
        raise CorruptOutput(f"{where}: incomplete dump (the capture stopped early): it holds "
                            f"{note.incomplete.describe()}")
    return note, span


def digest_state(note: VmcapNote | None, keys) -> str | None:
    """"none" (no note or no digests: an older vmcap), "unknown" (streamed) or None (digests to check)."""
    return "none" if note is None else note.digest_state(keys)


def _check_digest(fd: int, name: str, key: str, expected: str, start: int, end: int,
                  what: str, blank_at: int | None = None) -> None:
    try:
        actual = file_digest(fd, start, end, blank_at=blank_at, what=f"{name}: {what}")
    except EOFError as error:
        raise CorruptOutput(str(error)) from None
    if actual != expected:
        raise CorruptOutput(f"{name}: {what} (bytes {start:#x}-{end:#x}) changed: XXH64 "
                            f"{actual}, the VMCAP note's {key} says {expected}")


def check_elf_digests(path: str, layout, note: VmcapNote | None, span) -> str:
    """Check a plain ELF output's META and DATA digests; returns the result's "digest"."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        first_data = min((s.offset for s in layout.segments if s.filesz), default=file_size)
        head = os.pread(fd, min(first_data, file_size, MAX_HEAD_BYTES), 0)
        if note is None:
            if NOTE_NAME.encode() + b"\0\0\0" in head:
                # The notes were found somewhere else than where vmcap wrote them.
                raise CorruptOutput(f"{path}: has a VMCAP note its program headers do not point at")
            return "none"
        state = digest_state(note, ("META_XXH64", "DATA_XXH64"))
        if state is not None:
            return state
        notes_offset = head.find(layout.note_bytes)
        vmcap_end = span.desc_offset + span.desc_size
        if notes_offset < 0 or vmcap_end != len(layout.note_bytes):
            raise CorruptOutput(f"{path}: the notes are not where vmcap writes them")
        desc = layout.note_bytes[span.desc_offset:vmcap_end]
        meta_at = notes_offset + span.desc_offset + value_offset(desc, "META_XXH64")
        notes_end = notes_offset + len(layout.note_bytes)
        _check_digest(fd, path, "META_XXH64", note.digests["META_XXH64"], 0, notes_end,
                      "ELF header, program headers and notes", blank_at=meta_at)
        _check_digest(fd, path, "DATA_XXH64", note.digests["DATA_XXH64"], notes_end, file_size,
                      "segment data")
        return "xxh64"
    finally:
        os.close(fd)


def check_kdump_digests(path: str, reader, note: VmcapNote | None, span) -> str:
    """Check a kdump output's META, DESC and DATA digests; returns the result's "digest"."""
    state = digest_state(note, DIGEST_LINE_KEYS)
    if state is not None:
        return state
    desc = reader.notes[span.desc_offset:span.desc_offset + span.desc_size]
    meta_at = reader.notes_offset + span.desc_offset + value_offset(desc, "META_XXH64")
    digests = note.digests
    data_offset = int(digests["DATA_OFFSET"], 16)
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        _check_digest(fd, path, "META_XXH64", digests["META_XXH64"], 0, reader.descriptor_offset,
                      "header, sub header, notes and bitmaps", blank_at=meta_at)
        _check_digest(fd, path, "DESC_XXH64", digests["DESC_XXH64"], reader.descriptor_offset,
                      data_offset, "page descriptors")
        _check_digest(fd, path, "DATA_XXH64", digests["DATA_XXH64"], data_offset, file_size,
                      "page data")
    finally:
        os.close(fd)
    return "xxh64"


def _merged(ranges) -> list[tuple[int, int]]:
    """(start, end) of the union of (start, length) ranges, sorted."""
    out: list[list[int]] = []
    for start, length in sorted(ranges):
        if length <= 0:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length)
        else:
            out.append([start, start + length])
    return [(a, b) for a, b in out]


def _split(start: int, end: int, ranges: list[tuple[int, int]]):
    """[start, end) cut by the sorted, disjoint (start, end) ranges: (lo, hi, inside)."""
    i = max(bisect_right(ranges, (start, float("inf"))) - 1, 0)
    position = start
    while position < end:
        while i < len(ranges) and ranges[i][1] <= position:
            i += 1
        if i < len(ranges) and ranges[i][0] <= position:
            hi = min(end, ranges[i][1])
            yield position, hi, True
        else:
            hi = min(end, ranges[i][0]) if i < len(ranges) else end
            yield position, hi, False
        position = hi


# Pages examined per step when looking for missing ones: bounds the masks.
ABSENT_PAGES = 1 << 20


def _uncovered(start: int, end: int, ranges: list[tuple[int, int]]):
    """The parts of [start, end) outside the sorted, disjoint (start, end) ranges."""
    for lo, hi, inside in _split(start, end, ranges):
        if not inside:
            yield lo, hi


class _SourceChecker:
    """Compares a dump's physical memory with the source it was saved from."""

    def __init__(self, source, source_path: str, view, page: int, excluded, drops_zero: bool):
        self.source = source
        self.source_path = source_path
        self.view = view
        self.page = page
        self.excluded = excluded
        self.drops_zero = drops_zero
        self.compared = 0
        self.excluded_bytes = 0
        self.zero_checked = 0
        self.zero_fill = 0

    def compare(self, seg, lo: int, hi: int, read) -> None:
        done = lo
        while done < hi:
            n = min(COMPARE_BYTES, hi - done)
            expected = self.source.pread(seg.offset + (done - seg.paddr), n)
            actual = read(done, n)
            if expected != actual:
                at = _first_difference(expected, actual)
                raise VerifyMismatch(
                    f"{self.source_path} segment {seg.index}: physical address {done + at:#x} "
                    f"differs (source {expected[at]:#04x}, output {actual[at]:#04x})")
            done += n
            self.compared += n

    def zero_fill_stored(self, seg, lo: int, hi: int) -> None:
        """Dump bytes [lo, hi) lie in the source's zero fill: they must be zero."""
        done = lo
        while done < hi:
            n = min(COMPARE_BYTES, hi - done)
            actual = self.view.read_physical(done, n)
            if any(actual):
                at = int(np.flatnonzero(np.frombuffer(actual, np.uint8))[0])
                raise VerifyMismatch(
                    f"{self.source_path} segment {seg.index}: physical address {done + at:#x} "
                    f"is zero fill in the source but {actual[at]:#04x} in the output")
            done += n

    def _mask(self, first: int, last: int) -> np.ndarray:
        """Excluded flags of pfns [first, last); pfns past the classification are kept."""
        mask = np.zeros(last - first, dtype=bool)
        if self.excluded is not None and first < len(self.excluded):
            known = self.excluded[first:min(last, len(self.excluded))]
            mask[:len(known)] = known
        return mask

    def stored_excluded(self, lo: int, hi: int) -> None:
        """Stored bytes [lo, hi) of a format that never stores excluded pages."""
        if self.excluded is None:
            return
        page = self.page
        first, last = lo // page, (hi - 1) // page + 1
        for part in range(first, last, ABSENT_PAGES):
            mask = self._mask(part, min(last, part + ABSENT_PAGES))
            if mask.any():
                pfn = part + int(np.flatnonzero(mask)[0])
                raise VerifyMismatch(
                    f"{self.source_path}: physical address {pfn * page:#x} is in the dump, but "
                    "its dump level excludes that page (the dump does not follow its level)")

    def absent(self, seg, lo: int, hi: int) -> None:
        """Source bytes [lo, hi) are not in the dump: only excluded pages may be missing."""
        page = self.page
        first, last = lo // page, (hi - 1) // page + 1
        for part in range(first, last, ABSENT_PAGES):
            part_end = min(last, part + ABSENT_PAGES)
            self._absent_pages(seg, max(lo, part * page), min(hi, part_end * page), part,
                               self._mask(part, part_end))

    def _absent_pages(self, seg, lo: int, hi: int, first: int, mask: np.ndarray) -> None:
        page = self.page
        starts = (first + np.arange(len(mask), dtype=np.int64)) * page
        overlap = np.minimum(hi, starts + page) - np.maximum(lo, starts)
        self.excluded_bytes += int(overlap[mask].sum())
        keep = np.flatnonzero(~mask)
        if not len(keep):
            return
        breaks = np.flatnonzero(np.diff(keep) != 1) + 1
        for run in np.split(keep, breaks):
            run_lo = max(lo, (first + int(run[0])) * page)
            run_hi = min(hi, (first + int(run[-1]) + 1) * page)
            if not self.drops_zero:
                raise VerifyMismatch(
                    f"{self.source_path} segment {seg.index}: physical address {run_lo:#x} "
                    f"(to {run_hi:#x}) is not in the dump, and its dump level does not "
                    "exclude it")
            # Dump level bit 1 drops zero pages: the source must be zero there.
            self.compare(seg, run_lo, run_hi, lambda at, n: bytes(n))
            self.zero_checked += run_hi - run_lo  # also counted in compared


def _covered_ranges(view) -> list[tuple[int, int]]:
    """(start, end) of the physical memory the dump represents, data or zero fill.

    An ELF dump represents each PT_LOAD's p_memsz (excluded runs are zero
    fill in it); a kdump file the pages of its 1st bitmap.
    """
    if hasattr(view, "covered_ranges"):
        return _merged(view.covered_ranges())
    return _merged((s.paddr, s.memsz) for s in view.layout.segments)


def _check_coverage(src_layout, covered, granule: int, source_path: str) -> int:
    """Every byte of every source p_memsz is in the dump, and the dump holds no other memory.

    Returns the source's zero-fill bytes (beyond p_filesz) found represented.
    ``granule``: the dump's unit (a kdump page covers a fractional page whole).
    """
    for seg in src_layout.segments:
        for lo, hi in _uncovered(seg.paddr, seg.paddr + seg.memsz, covered):
            what = "zero fill" if lo >= seg.end else "memory"
            raise VerifyMismatch(
                f"{source_path} segment {seg.index}: physical address {lo:#x} (to {hi:#x}, "
                f"{what} of the source) is not in the dump at all")
    claimed = _merged((s.paddr // granule * granule,
                       -(-(s.paddr + s.memsz) // granule) * granule - s.paddr // granule * granule)
                      for s in src_layout.segments)
    for lo, hi in covered:
        for extra_lo, extra_hi in _uncovered(lo, hi, claimed):
            raise VerifyMismatch(
                f"{source_path}: the dump holds physical address {extra_lo:#x} (to "
                f"{extra_hi:#x}), which no segment of the source has")
    zero_fill = _merged((s.end, s.memsz - s.filesz) for s in src_layout.segments)
    return sum(hi - lo for lo, hi in zero_fill)


def compare_with_source(view, source_path: str, policy: ExclusionPolicy, *,
                        vmcoreinfo: bytes | None = None) -> dict:
    """Check that the dump holds every source byte that ``policy`` (its recorded level) keeps.

    Every byte of the source's p_memsz must be represented in the dump
    (a PT_LOAD's p_memsz, a kdump 1st-bitmap page), and the dump must not
    claim memory the source has not. The page classes of dump level bits
    2-16 are classified again on the source, as save did; pages of those
    classes may be missing (and a kdump file, which never stores them, must
    not hold them). Bit 1 lets zero pages go missing where the policy
    excludes them (not where vmcap's kdump ZERO_PAGES=shared kept them):
    those must be zero in the source. Any other source byte must be in the
    dump and equal; dump bytes in the source's zero fill must be zero.
    """
    from .save import classify_source
    from .source.dumpfile import open_save_source

    # Any dump vmcap reads can be the source (a kdump file through its ELF view).
    source, _ = open_save_source(source_path)
    try:
        src_layout = read_layout(source)
        if vmcoreinfo and not src_layout.vmcoreinfo_raw:
            # A source without the note (saved with --vmcoreinfo FILE): classify
            # it with the VMCOREINFO given, or the one its dump carries.
            src_layout = read_layout(source, vmcoreinfo=vmcoreinfo)
        classification = classify_source(src_layout, source, policy.level) if policy.classifies else None
        excluded = classification.excluded if classification is not None else None
        checker = _SourceChecker(source, source_path, view, src_layout.page_size, excluded,
                                 drops_zero=policy.zero_mode == ZERO_EXCLUDED)
        granule = getattr(view, "granule", 1)
        zero_fill = _check_coverage(src_layout, _covered_ranges(view), granule, source_path)
        stored = _merged(view.stored_ranges())
        if not getattr(view, "stores_excluded_pages", True):
            for lo, hi in stored:
                checker.stored_excluded(lo, hi)
        # When the output keeps the source's segments one for one, compare
        # each with its own twin: overlapping PT_LOADs (kernel text over RAM)
        # are each copied whole.
        out_segments = getattr(getattr(view, "layout", None), "segments", ())
        twins = (len(out_segments) == len(src_layout.segments) and all(
            (a.paddr, a.filesz, a.memsz) == (b.paddr, b.filesz, b.memsz)
            for a, b in zip(out_segments, src_layout.segments)))
        for seg in src_layout.segments:
            if twins:
                twin = out_segments[seg.index]
                checker.compare(seg, seg.paddr, seg.end,
                                lambda at, n, twin=twin: view.read(at, n, segment=twin))
                continue
            for lo, hi, inside in _split(seg.paddr, seg.end, stored):
                if inside:
                    checker.compare(seg, lo, hi, view.read_physical)
                else:
                    checker.absent(seg, lo, hi)
            # The zero fill is represented (coverage above); what the dump
            # stores of it must be zeros.
            for lo, hi, inside in _split(seg.end, seg.paddr + seg.memsz, stored):
                if inside:
                    checker.zero_fill_stored(seg, lo, hi)
    finally:
        source.close()
    return {"source": source_path, "compared_bytes": checker.compared,
            "zero_bytes_checked": checker.zero_checked,
            "excluded_bytes_not_compared": checker.excluded_bytes,
            "zero_fill_bytes": zero_fill}


def decompress(dump_path: str, plain_path: str, *, force: bool = False) -> int:
    """Write the plain sparse ELF of a seekable-zstd dump; returns its size.

    The same sink as `save --format elf`: all-zero blocks become holes,
    PLAIN gets its name only when every frame decompressed and was written.
    """
    from .formats.seekable import SeekableReader

    refuse_same_files([("DUMP", dump_path)], [("PLAIN", plain_path)])
    check_output_target(plain_path, force)
    container = detect_container(dump_path)
    if container != "zstd-seekable":
        raise BadSource(f"{dump_path}: not a vmcap zelf file (container: {container})")
    reader = SeekableReader(dump_path)
    out = OutputFile(plain_path, force=force, mode=0o600)
    try:
        sink = SparseSink(out)
        for _, plain in reader.iter_frames():
            sink.write(plain)
        out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        reader.close()
    return out.position


class KdumpPhysicalView:
    """Physical memory of a kdump file for comparisons; excluded pages read as zeros."""

    # A kdump file never stores a page its dump level excludes.
    stores_excluded_pages = False

    def __init__(self, reader: KdumpReader):
        self.reader = reader
        self.granule = reader.header.page_size  # a present page is represented whole

    def covered_ranges(self):
        """(paddr, length) of the memory the file represents: its 1st bitmap."""
        page = self.reader.header.page_size
        return [(first * page, count * page) for first, count in self.reader.iter_present_runs()]

    def read_physical(self, paddr: int, length: int) -> bytes:
        return self.reader.pread_physical(paddr, length)

    def stored_ranges(self):
        page = self.reader.header.page_size
        return [(first * page, count * page) for first, count in self.reader.iter_dumped_runs()]


def verify_kdump(path: str, source_path: str | None, *, vmcoreinfo: bytes | None = None) -> dict:
    """Check structure and digests, decompress every dumped page; with a source, compare."""
    result: dict = {"dump": path}
    try:
        reader = KdumpReader(path)
    except BadSource as error:
        raise CorruptOutput(str(error)) from None
    except OSError as e:
        raise CorruptOutput(f"{path}: cannot read: {e.strerror}") from None
    with reader:
        result["container"] = "kdump-flat" if reader.flattened else "kdump"
        note, span = checked_note(reader.notes, reader.header.byte_order, path)
        data_offset = note.digests.get("DATA_OFFSET") if note is not None else None
        reader.check_structure(int(data_offset, 16) if data_offset and data_offset != UNKNOWN
                               else None)
        result["digest"] = check_kdump_digests(path, reader, note, span)
        pages = 0
        for first, count in reader.iter_dumped_runs():
            for pfn in range(first, first + count):
                reader.read_page(pfn)
            pages += count
        result["pages_checked"] = pages
        if source_path is not None:
            dump_level = recorded_level(path, reader.header.dump_level, "its kdump header's dump_level")
            result["dump_level"] = int(dump_level)
            # vmcap's kdump files say whether zero pages were kept (one shared
            # page) or left out at dump level bit 1; other files may have done either.
            zero_pages = "shared" if note is not None and note.zero_pages == "shared" else "exclude"
            policy = ExclusionPolicy(dump_level, "kdump", zero_pages)
            result.update(compare_with_source(KdumpPhysicalView(reader), source_path, policy,
                                              vmcoreinfo=vmcoreinfo or reader.vmcoreinfo))
    result["status"] = "ok"
    return result
