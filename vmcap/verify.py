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

from bisect import bisect_right

import numpy as np

from .errors import BadSource, CorruptOutput, SourceIOError, VerifyMismatch
from .fileio.output import OutputFile, SparseSink, check_output_target, refuse_same_files
from .kernel.dumplevel import DumpLevel
from .plan.exclude import ZERO_EXCLUDED, ExclusionPolicy
from .source.dump import detect, detect_container, open_detected, open_dump
from .source.layout import read_layout

COMPARE_BYTES = 4 << 20


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
    container, wrapper = detect(dump_path)  # a path that is no readable file: BadSource (3)
    if container == "unknown":
        raise CorruptOutput(f"{dump_path}: not a vmcap output (no ELF, zstd or kdump signature)")
    try:
        dump = open_detected(dump_path, container, wrapper)
    except (BadSource, SourceIOError) as error:
        raise CorruptOutput(str(error)) from None
    with dump:
        result: dict = {"dump": dump_path, "container": dump.container}
        result.update(dump.check())
        if source_path is not None:
            policy = recorded_policy(dump)
            result["dump_level"] = int(policy.level)
            result.update(compare_with_source(dump.physical, source_path, policy,
                                              vmcoreinfo=vmcoreinfo or dump.vmcoreinfo_raw))
    result["status"] = "ok"
    return result


def recorded_policy(dump) -> ExclusionPolicy:
    """The exclusion policy a dump was saved with, from what it records of its level."""
    note = dump.vmcap_note
    if dump.dump_level is None:  # an ELF core: its VMCAP note says the level
        level = recorded_level(dump.path, (note.dump_level if note is not None else None) or 0,
                               "its VMCAP note's DUMP_LEVEL")
        return ExclusionPolicy(level, "zelf" if dump.container == "zstd-seekable" else "elf")
    level = recorded_level(dump.path, dump.dump_level, "its kdump header's dump_level")
    # vmcap's kdump files say whether zero pages were kept (one shared
    # page) or left out at dump level bit 1; other files may have done either.
    zero_pages = "shared" if note is not None and note.zero_pages == "shared" else "exclude"
    return ExclusionPolicy(level, "kdump", zero_pages)


def recorded_level(dump_path: str, value, where: str) -> DumpLevel:
    """The dump level a dump says it was saved at; CorruptOutput if it is none."""
    try:
        return DumpLevel.of(int(value))
    except ValueError:
        raise CorruptOutput(f"{dump_path}: {where} is {str(value)[:40]!r}, not a dump level "
                            "from 0 to 31") from None


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
            actual = self.view.read(done, n)
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

    # Any dump vmcap reads can be the source (a kdump file through its ELF view).
    source_dump = open_dump(source_path, stream=True)
    source = source_dump.elf
    try:
        src_layout = source_dump.layout
        if vmcoreinfo and not src_layout.vmcoreinfo_raw:
            # A source without the note (saved with --vmcoreinfo FILE): classify
            # it with the VMCOREINFO given, or the one its dump carries.
            src_layout = read_layout(source, vmcoreinfo=vmcoreinfo)
        classification = classify_source(src_layout, source, policy.level) if policy.classifies else None
        excluded = classification.excluded if classification is not None else None
        checker = _SourceChecker(source, source_path, view, src_layout.page_size, excluded,
                                 drops_zero=policy.zero_mode == ZERO_EXCLUDED)
        zero_fill = _check_coverage(src_layout, _merged(view.covered_ranges()), view.granule,
                                    source_path)
        stored = _merged(view.stored_ranges())
        if not view.stores_excluded_pages:
            for lo, hi in stored:
                checker.stored_excluded(lo, hi)
        # When the output keeps the source's segments one for one, compare
        # each with its own twin: overlapping PT_LOADs (kernel text over RAM)
        # are each copied whole.
        out_segments = view.segments
        twins = (len(out_segments) == len(src_layout.segments) and all(
            (a.paddr, a.filesz, a.memsz) == (b.paddr, b.filesz, b.memsz)
            for a, b in zip(out_segments, src_layout.segments)))
        for seg in src_layout.segments:
            if twins:
                twin = out_segments[seg.index]
                checker.compare(seg, seg.paddr, seg.end,
                                lambda at, n, twin=twin: view.read_segment(twin, at, n))
                continue
            for lo, hi, inside in _split(seg.paddr, seg.end, stored):
                if inside:
                    checker.compare(seg, lo, hi, view.read)
                else:
                    checker.absent(seg, lo, hi)
            # The zero fill is represented (coverage above); what the dump
            # stores of it must be zeros.
            for lo, hi, inside in _split(seg.end, seg.paddr + seg.memsz, stored):
                if inside:
                    checker.zero_fill_stored(seg, lo, hi)
    finally:
        source_dump.close()
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
