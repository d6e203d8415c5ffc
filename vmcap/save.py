"""`vmcap save`: source headers -> layout -> plan -> copy -> writer.

This module wires the stages together and measures the run; it prints
nothing (the CLI renders the returned ``SaveSummary``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from .cpus import usable_cpus
from .errors import BadSource, OutputError, OutputFull, SourceIOError, Unsupported
from .fileio.mmapio import Source
from .fileio.output import OutputFile, check_output_target, refuse_same_files, write_whole_file
from .formats.digest import UNKNOWN, StreamDigest
from .formats.head import SparseElfSink
from .formats.note import (
    NOTE_NAME,
    Incomplete,
    VmcapNote,
    aligned_notes,
    find_note_fields,
    placeholders,
    without_note,
)
from .kernel.dumplevel import DumpLevel, ExclusionCounts
from .plan.copier import DEFAULT_WINDOW_BYTES, CopyStats, PlanCopier
from .plan.copyplan import CopyPlan, disjoint_segments, find_fractional_pages, plan_copy
from .plan.exclude import (
    PAGE_FORMATS,
    ExclusionPolicy,
    SavedLevel,
    runs_from_mask,
    scan_excluded_runs,
    split_segments,
)
from .source.dump import ElfDump, open_dump
from .source.layout import Layout, require_memory

FORMATS = ("zelf", "elf", "kdump", "kdump-flat")
KDUMP_FORMATS = PAGE_FORMATS  # kdump-flat: flattened (makedumpfile -F), for pipes
# Progress phases, named as makedumpfile names them on the console.
PHASE_SCAN = "Excluding zero pages"
PHASE_COPY = "Copying data"
# zstd level 3 is the CLI's default; single 4 KiB kdump pages need level 5 to
# come out no bigger than makedumpfile -c's zlib pages (measured, README).
DEFAULT_LEVELS = {"zelf": 3, "zstd": 5, "zlib": 3}


@dataclass(frozen=True)
class SaveOptions:
    output_format: str = "zelf"
    level: int | None = None  # None: the format's default (DEFAULT_LEVELS)
    threads: int = 0  # 0: all cores
    frame_bytes: int | None = None  # zelf; None: 16 MiB on one thread (streamed), 8 MiB with a pool
    window_bytes: int | None = None  # None: DEFAULT_WINDOW_BYTES a thread
    on_error: str = "fail"
    force: bool = False
    page_size: int | None = None
    allow_mmap: bool = True
    dump_level: DumpLevel = DumpLevel(0)
    compress: str = "zstd"  # kdump page compression: zstd, zlib, lzo, snappy or none
    # kdump at dump level 1: "shared" keeps zero pages readable (one stored
    # zero page, as makedumpfile does); "exclude" clears them from bitmap 2.
    zero_pages: str = "shared"
    dmesg_path: str | None = None  # also write the kernel log here
    vmcoreinfo_path: str | None = None  # VMCOREINFO file for a dump without (or with a bad) note
    # Dump levels to try, in order, after dump_level when the output does
    # not fit (disk full, size_limit): makedumpfile's -d 11,31.
    retry_levels: tuple[DumpLevel, ...] = ()
    size_limit: int | None = None  # bytes the output may take (makedumpfile -L)
    # A dump level needing kernel knowledge vmcap lacks: fail (exit 8)
    # rather than save at the level that needs none.
    strict: bool = False
    # No level was asked for (the CLI without -d): a saved dump as the source
    # is saved at its own dump level, the bits of dump_level added.
    inherit_level: bool = False

    def __post_init__(self):
        # Callers of the library may pass plain ints: a level is checked once, here.
        object.__setattr__(self, "dump_level", DumpLevel.of(self.dump_level))
        object.__setattr__(self, "retry_levels", tuple(DumpLevel.of(level) for level in self.retry_levels))

    def compression_level(self) -> int:
        """The level for this run: the option, else the format's default."""
        if self.output_format in KDUMP_FORMATS:
            # lzo and snappy have no levels; their compressors ignore it.
            default = DEFAULT_LEVELS.get(self.compress, 3)
            level = default if self.level is None else self.level
            # zlib knows 1..9 only.
            return min(max(level, 1), 9) if self.compress == "zlib" else level
        return DEFAULT_LEVELS["zelf"] if self.level is None else self.level


@dataclass(frozen=True)
class SaveSummary:
    source: str
    output: str
    format: str
    page_size: int
    segments: int
    memory_bytes: int
    bytes_read: int
    bytes_written: int
    ratio: float  # memory_bytes / bytes_written
    seconds: float
    mib_per_s: float  # memory_bytes per second, in MiB (2**20 bytes)
    mapped_bytes: int
    buffered_bytes: int
    zero_fill_bytes: int
    fractional_pages: int
    mmap_fallbacks: int
    error_ranges: tuple[dict, ...]
    pages_excluded: dict = field(default_factory=dict)  # ExclusionCounts.to_json()
    dmesg: str | None = None
    dmesg_records: int = 0
    warnings: tuple[str, ...] = ()
    dump_level: DumpLevel = DumpLevel(0)  # the level the output was written at (see retry_levels, strict)

    def to_json(self) -> dict:
        return dict(asdict(self), dump_level=int(self.dump_level))


class Capture:
    """What one run shares: the source, its layout, the options, the copiers made."""

    def __init__(self, source: Source, layout: Layout, options: SaveOptions, policy: ExclusionPolicy,
                 progress: Callable[[int, int, str], None] | None):
        self.source = source
        self.layout = layout
        self.options = options
        self.progress = progress
        self.copiers: list[PlanCopier] = []
        self.classification = None  # pageclass.ExclusionResult for dump level bits 2-16
        self.policy = policy  # what options.dump_level leaves out of this output

    def copier(self, plan: CopyPlan, phase: str = PHASE_COPY) -> PlanCopier:
        """A copier over ``plan``, reported as one phase of the progress."""
        total = plan.file_bytes
        report = (lambda n: self.progress(n, total, phase)) if self.progress else None
        copier = PlanCopier(self.source, plan, window_bytes=self.options.window_bytes,
                            on_error=self.options.on_error, progress=report)
        self.copiers.append(copier)
        return copier

    def stats(self) -> CopyStats:
        """All passes added up; read errors are those of the last (copy) pass."""
        total = CopyStats()
        for copier in self.copiers:
            total.mapped_bytes += copier.stats.mapped_bytes
            total.buffered_bytes += copier.stats.buffered_bytes
            total.zero_fill_bytes = copier.stats.zero_fill_bytes
            total.mmap_fallbacks += copier.stats.mmap_fallbacks
        if self.copiers:
            total.error_ranges = list(self.copiers[-1].stats.error_ranges)
        return total


def classify_or_fall_back(layout: Layout, source: Source, policy: ExclusionPolicy, *, strict: bool):
    """(page classes or None, the policy they allow, warnings).

    A level whose kernel page classes need what vmcap cannot know (a missing
    VMCOREINFO key, an unknown struct layout, another architecture) falls
    back to the bits that need none (1: zero pages; and what a saved source
    left out already) with a warning naming why, unless ``strict``: a
    scripted capture must not end without a dump.
    """
    if not policy.classifies:
        return None, policy, []
    try:
        return classify_source(layout, source, policy.level), policy, []
    except Unsupported as error:
        if strict:
            raise
        fallback = policy.without_kernel_classes()
        return None, fallback, [
            f"dump level {policy.level} needs kernel knowledge vmcap lacks ({error}); "
            f"saved at dump level {fallback.level} instead (--strict refuses)"]


def classify_source(layout: Layout, source: Source, dump_level: DumpLevel):
    """makedumpfile's page classes (dump level bits 2-16) for the source, or None."""
    if not dump_level.needs_kernel:
        return None
    from .source.dump import classify_dump, elf_dump

    return classify_dump(elf_dump(layout, source), dump_level)


def _classified(classification) -> ExclusionCounts:
    """The counts of the page classes (none without a classification); writing adds the rest."""
    return ExclusionCounts() if classification is None else classification.counts


def _count_set(mask, first: int, end: int, step: int = 1 << 20) -> int:
    """Set pfns of an exclusion mask in [first, end), a bounded slice at a time
    (one excluded run can span a terabyte)."""
    return sum(int(mask[lo:min(lo + step, end)].sum()) for lo in range(first, end, step))


def write_elf(capture: Capture, out: OutputFile) -> tuple[list[str], ExclusionCounts]:
    """Stream an ELF core (compressed or sparse plain) into ``out``.

    Returns (warnings, pages excluded per reason).
    """
    # Here, not at the top: a kdump capture (the collector's usual job) never loads it.
    from .formats.elfwriter import ElfStreamWriter, OutputSegment, cut_image, plan_elf_image

    layout, options, policy = capture.layout, capture.options, capture.policy
    page = layout.page_size
    # A source read once, in order, cannot be scanned before the copy: what
    # it left out stays out (zero fill), its zero pages stay in (a warning).
    warnings = policy.warnings()
    counts = ExclusionCounts()
    segments = layout.segments
    plan = plan_copy(segments, page)
    classification = capture.classification
    if policy.cuts_segments:
        # The headers come first, so exclusions must be known before writing.
        mask = classification.excluded if classification is not None else None
        zero_seen = 0
        if policy.scans_zero_pages:
            scan = scan_excluded_runs(lambda scan: capture.copier(scan, PHASE_SCAN), plan,
                                      {s.index: s for s in segments},
                                      page, exclude_zero=True, class_excluded=mask)
            runs, zero_seen = scan.runs, scan.zero_pages
        elif mask is not None:
            runs = runs_from_mask(segments, mask, page)
        else:
            # Only what the source left out is out: it is zero fill already.
            runs = []
        run_pages = sum(run.length for run in runs) // page
        # makedumpfile -E writes runs shorter than 256 pages as they are:
        # excludable pages (of a kernel class, or zero) that stay in the output.
        kept = 0
        if mask is not None:
            in_runs = sum(_count_set(mask, r.paddr // page, (r.paddr + r.length) // page)
                          for r in runs)
            kept += mask.count() - in_runs
        else:
            in_runs = 0
        zero = None
        if policy.scans_zero_pages:
            zero = run_pages - in_runs
            kept += zero_seen - zero
        counts = replace(_classified(classification), zero=zero, kept_in_short_runs=kept)
        segments = tuple(split_segments(segments, runs))
        plan = plan_copy(segments, page)
    copier = capture.copier(plan)

    source_notes = aligned_notes(layout.note_bytes)
    plain = options.output_format == "elf"
    # The plain ELF has no checksums of its own: its note carries digests,
    # known at the end, so only a rewritable output can record them.
    digest_keys = ("META_XXH64", "DATA_XXH64") if plain else ()
    vmcap_note = VmcapNote(source=layout.source_name, page_size=page,
                           output_format=options.output_format, dump_level=int(options.dump_level),
                           digests=placeholders(digest_keys) if out.seekable
                           else placeholders(digest_keys, UNKNOWN))

    def note(error_ranges, digests=None, incomplete=None) -> bytes:
        return replace(vmcap_note.with_errors(error_ranges), incomplete=incomplete,
                       digests=vmcap_note.digests if digests is None else digests
                       ).build(layout.byte_order)

    # Errors are only known at the end; a stream we cannot rewrite must not
    # claim there were none.
    may_fail_over = options.on_error == "zero"
    first_note = note(None if may_fail_over and not out.seekable else ())
    image = plan_elf_image(layout, [OutputSegment(s.paddr, s.vaddr, 0, s.filesz, s.memsz,
                                                  s.flags) for s in segments],
                           len(source_notes) + len(first_note), page)
    if options.output_format == "zelf":
        from .formats.seekable import SeekableWriter, seek_table_bound

        # Headers and notes go in an uncompressed frame of known size, so the
        # head can be rewritten in place at the end.
        sink = SeekableWriter(out, level=options.compression_level(), threads=options.threads,
                              frame_bytes=options.frame_bytes)
        # Room for the seek table, kept free while the frames go out: when
        # the disk fills up, the frames written can still be made readable.
        out.set_tail_reserve(seek_table_bound(image.total_size // options.frame_bytes
                                              + len(segments) + 4))

        def data_end() -> int:
            """The frames wholly written, kept; where their ELF bytes end."""
            return sink.cut_to_written_frames()
    else:
        sink = SparseElfSink(out)

        def data_end() -> int:
            return sink.position
    writer = ElfStreamWriter(sink, image, source_notes + first_note)

    def finish_incomplete() -> str | None:
        """The bytes written, as an ELF whose segments end where they end."""
        cut, saved, total, end_paddr = cut_image(layout, image, data_end())
        if not saved:
            return None
        incomplete = Incomplete(saved, total, end_paddr)
        sink.rewrite_head(cut.header + source_notes + note(
            copier.stats.error_ranges, placeholders(digest_keys, UNKNOWN), incomplete))
        sink.close()
        return incomplete.describe()

    out.keep_incomplete(finish_incomplete)
    for chunk in copier:
        if chunk.data is not None:
            writer.write_segment(chunk.segment, chunk.paddr, chunk.data)
    writer.finish()

    errors = copier.stats.error_ranges
    if errors and not out.seekable:
        warnings.append("read errors were zero-filled but cannot be recorded in the "
                        "note of a streamed output; they are listed in this summary")
    if plain and out.seekable:
        values = dict(vmcap_note.digests, DATA_XXH64=sink.data_digest.hexdigest())
        values["META_XXH64"] = StreamDigest.of(image.header + source_notes + note(errors, values))
        sink.rewrite_head(image.header + source_notes + note(errors, values))
    elif errors and out.seekable:
        # Before close(): the seek table records the new head frame's checksum.
        sink.rewrite_head(image.header + source_notes + note(errors))
    sink.close()
    return warnings, counts


def save_kernel_log(layout: Layout, source: Source, options: SaveOptions) -> int:
    """Write the crashed kernel's log beside the dump; returns the record count.

    Read first, before the long copy: if the capture is cut short, the log
    (often all a bug report needs) is already safe.
    """
    from .kernel.dmesg import format_makedumpfile
    from .source.dump import elf_dump, kernel_log

    records = kernel_log(elf_dump(layout, source))
    write_whole_file(options.dmesg_path,
                     format_makedumpfile(records).encode("utf-8", "surrogateescape"),
                     force=options.force)
    return len(records)


def check_outputs(source_path, output_path: str, options: SaveOptions) -> None:
    """Refuse bad output paths before anything is written (the log is written first).

    Each output must be a regular file or absent, and no two of SRC, OUT and
    the log file may be one file: ``save --force X X`` would replace the
    source with its own dump.
    """
    inputs = [("SRC", path) for path in source_paths(source_path)]
    if options.vmcoreinfo_path:
        inputs.append(("--vmcoreinfo FILE", options.vmcoreinfo_path))
    refuse_same_files(inputs, [("OUT", output_path), ("--dmesg FILE", options.dmesg_path)])
    check_output_target(output_path, options.force)
    if options.dmesg_path:
        check_output_target(options.dmesg_path, options.force)


def source_paths(source_path) -> list[str]:
    """A path, or the paths of a makedumpfile --split set, as a list."""
    return [source_path] if isinstance(source_path, str) else list(source_path)


def save(source_path, output_path: str, options: SaveOptions = SaveOptions(), *,
         progress: Callable[[int, int, str], None] | None = None,
         source: Source | None = None) -> SaveSummary:
    """Capture ``source_path`` into ``output_path`` ("-" for stdout).

    ``source_path`` may be a list: the files of a makedumpfile --split set.

    ``progress(done_bytes_increment, phase_total_bytes, phase)`` is called as
    bytes are read; ``phase`` is PHASE_SCAN (the -d 1 scan pass of the ELF
    formats) or PHASE_COPY.
    ``source`` replaces the file source (tests pass an instrumented one).
    """
    started = time.monotonic()
    if options.threads == 0:
        options = replace(options, threads=usable_cpus())
    if options.window_bytes is None:
        # Up to 4 MiB, the old default: with more threads the kdump batches
        # (1 MiB a thread) are filled from several windows, as before.
        options = replace(options, window_bytes=DEFAULT_WINDOW_BYTES * min(options.threads, 4))
    if options.frame_bytes is None and options.output_format == "zelf":
        from .formats.seekable import DEFAULT_FRAME_BYTES, STREAMED_FRAME_BYTES

        options = replace(options, frame_bytes=STREAMED_FRAME_BYTES if options.threads == 1
                          else DEFAULT_FRAME_BYTES)
    if options.output_format not in FORMATS:
        raise ValueError(f"unknown format {options.output_format!r}")
    if options.output_format == "kdump" and output_path == "-":
        raise OutputError("--format kdump needs a seekable output file, not stdout "
                          "(--format kdump-flat writes makedumpfile's flattened stream to a pipe)")
    check_outputs(source_path, output_path, options)
    if not isinstance(source_path, str):
        paths = source_paths(source_path)
        source_path = paths[0] if len(paths) == 1 else paths
    vmcoreinfo = None
    if options.vmcoreinfo_path:
        from .kernel.vmcoreinfo import read_vmcoreinfo_file

        vmcoreinfo = read_vmcoreinfo_file(options.vmcoreinfo_path)
    if source is None:
        # Any dump vmcap reads, opened once; its ELF view is what is copied.
        dump = open_dump(source_path, page_size=options.page_size, vmcoreinfo=vmcoreinfo,
                         allow_mmap=options.allow_mmap, stream=True)
    else:
        dump = ElfDump.open(source, page_size=options.page_size, vmcoreinfo=vmcoreinfo)
    with dump:
        source, layout, header_level = dump.elf, dump.layout, dump.dump_level
        require_memory(layout)
        source_path = source.name if not isinstance(source_path, str) else source_path
        layout, source_level, source_warnings = saved_dump_source(layout, header_level)
        saved = SavedLevel(source_level,
                           # An ELF core saved with bit 1 has no zero pages; makedumpfile's and
                           # QEMU's kdump files keep them (one shared stored zero page).
                           drops_zero=source_level.excludes_zero and header_level is None,
                           # Read once, in order (a compressed stream): no scan pass, no struct pages.
                           sequential=bool(getattr(source, "sequential", False)))
        levels = saved.levels_to_write(source_path, (options.dump_level, *options.retry_levels),
                                       inherit=options.inherit_level)
        options = replace(options, dump_level=levels[0], retry_levels=levels[1:])
        if saved.sequential:
            check_sequential_request(source_path, saved, options)
        dmesg_records = 0
        log_warning: list[str] = []
        if options.dmesg_path:
            try:
                dmesg_records = save_kernel_log(layout, source, options)
            except (BadSource, Unsupported, SourceIOError) as error:
                # The dump matters more than the log: say why, and go on.
                log_warning.append(f"kernel log not saved: {error}")
        fractional = len(find_fractional_pages(layout.segments, layout.page_size))
        level_warnings: list[str] = []
        for attempt, level in enumerate(levels):
            retry_left = attempt + 1 < len(levels) and output_path != "-"
            # Kernel page classes come from a few MiB of struct pages, read first.
            # What the source left out stays out, whatever could be classified.
            classification, policy, fallback = classify_or_fall_back(
                layout, source, ExclusionPolicy(level, options.output_format, options.zero_pages, saved),
                strict=options.strict)
            # A source whose zero pages are gone already: a kdump output cannot
            # keep them readable (--zero-pages shared), and says so.
            run_options = replace(options, dump_level=policy.level, zero_pages=policy.kdump_zero_pages)
            level_warnings += fallback
            capture = Capture(source, layout, run_options, policy, progress)
            capture.classification = classification
            out = OutputFile(output_path, force=options.force, size_limit=options.size_limit)
            try:
                warnings, counts = write_output(capture, out)
                out.commit()
                break
            except OutputFull as error:
                if not retry_left:
                    _abort_keeping(out, error)
                # The whole output is written again, from the start, at the next level.
                out.abort()
                level_warnings.append(f"dump level {level} did not fit ({error}); "
                                      f"retried at dump level {levels[attempt + 1]}")
            except BaseException as error:
                _abort_keeping(out, error)

    stats = capture.stats()
    seconds = max(time.monotonic() - started, 1e-9)
    written = out.position
    return SaveSummary(
        source=source_path, output=output_path, format=options.output_format,
        page_size=layout.page_size, segments=len(layout.segments),
        memory_bytes=layout.memory_bytes, bytes_read=stats.bytes_read, bytes_written=written,
        ratio=round(layout.memory_bytes / written, 3) if written else 0.0,
        seconds=round(seconds, 3), mib_per_s=round(layout.memory_bytes / seconds / (1 << 20), 1),
        mapped_bytes=stats.mapped_bytes, buffered_bytes=stats.buffered_bytes,
        zero_fill_bytes=stats.zero_fill_bytes, fractional_pages=fractional,
        mmap_fallbacks=stats.mmap_fallbacks,
        error_ranges=tuple({"paddr": e.paddr, "length": e.length, "reason": e.reason}
                           for e in stats.error_ranges),
        pages_excluded=counts.to_json(),
        dmesg=options.dmesg_path if options.dmesg_path and not log_warning else None,
        dmesg_records=dmesg_records,
        warnings=(layout.warnings + tuple(source_warnings) + tuple(log_warning)
                  + tuple(level_warnings) + tuple(warnings)),
        dump_level=capture.options.dump_level)


def saved_dump_source(layout: Layout, header_level: int | None) -> tuple[Layout, DumpLevel, list[str]]:
    """(layout without the source's VMCAP note, the dump level the source was saved at, warnings).

    A saved dump is a source like /proc/vmcore, but what its dump level left
    out cannot come back. Its VMCAP note described the old file (digests,
    format): the new dump gets its own.
    """
    note = find_note_fields(layout.notes)
    level = header_level
    if level is None:
        try:
            level = int((note or {}).get("DUMP_LEVEL") or 0)
        except ValueError:
            raise BadSource(f"{layout.source_name}: VMCAP note DUMP_LEVEL "
                            f"{note.get('DUMP_LEVEL')!r} is not a number") from None
    try:
        level = DumpLevel.of(level)
    except ValueError:
        raise BadSource(f"{layout.source_name}: saved at dump level {level}, not 0..31") from None
    warnings = []
    if note is not None and note.get("error_ranges"):
        warnings.append(f"the source lists {len(note['error_ranges'])} range(s) its capture "
                        "zero-filled after read errors; they stay zero here but are not listed "
                        "in the new dump's note")
    if note is not None:
        layout = replace(layout, notes=tuple(n for n in layout.notes if n.name != NOTE_NAME),
                         note_bytes=without_note(layout.note_bytes, layout.byte_order))
    return layout, level, warnings


def check_sequential_request(source_path: str, saved: SavedLevel, options: SaveOptions) -> None:
    """Refuse (exit 8) what a source read once, in order, cannot give."""
    why = None
    if saved.needs_struct_pages(options.dump_level):
        why = (f"dump level {options.dump_level} classifies pages the source kept "
               f"(dump level {saved.level}), which needs random access to its struct pages")
    elif options.retry_levels:
        why = "a dump level list may need a second pass"
    elif options.dmesg_path:
        why = "--dmesg reads the kernel log out of order"
    if why:
        raise Unsupported(f"{source_path} is compressed as a whole and is read once, in order: "
                          f"{why}; decompress it first")


def write_output(capture: Capture, out: OutputFile) -> tuple[list[str], ExclusionCounts]:
    """Write the dump in the capture's format; returns (warnings, pages excluded)."""
    options, layout = capture.options, capture.layout
    if options.output_format not in KDUMP_FORMATS:
        return write_elf(capture, out)
    from .kdumpsave import write_kdump

    # Page formats store each physical page once, in pfn order.
    plan = plan_copy(disjoint_segments(layout.segments), layout.page_size)
    classification = capture.classification
    return [], write_kdump(layout, plan, capture.copier(plan), out, options, capture.policy,
                           excluded=classification.excluded if classification is not None else None,
                           counts=_classified(classification))


def _abort_keeping(out: OutputFile, error: BaseException) -> None:
    """Abort the output and re-raise ``error``; if abort kept an incomplete dump,
    as an OutputError that says where it is and what it holds."""
    kept = out.abort(error)
    if kept is not None:
        raise OutputError(f"{error}; kept as an INCOMPLETE dump in {out.path}: {kept}") from None
    raise error
