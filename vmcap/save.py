"""`vmcap save`: source headers -> layout -> plan -> copy -> writer.

This module wires the stages together and measures the run; it prints
nothing (the CLI renders the returned ``SaveSummary``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .copy import DEFAULT_WINDOW_BYTES, CopyStats, PlanCopier
from .elfwriter import ElfStreamWriter, OutputSegment, plan_elf_image, vmcap_note
from .errors import OutputError
from .fraction import CopyPlan, plan_copy
from .layout import Layout, read_layout
from .mmapio import FileSource, Source
from .output import OutputFile, SparseSink

FORMATS = ("zelf", "elf", "kdump")


@dataclass(frozen=True)
class SaveOptions:
    output_format: str = "zelf"
    level: int = 3
    threads: int = 0  # 0: all cores
    frame_bytes: int = 4 << 20
    window_bytes: int = DEFAULT_WINDOW_BYTES
    on_error: str = "fail"
    force: bool = False
    page_size: int | None = None
    allow_mmap: bool = True
    dump_level: int = 0
    compress: str = "zstd"  # kdump page compression


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
    ratio: float
    seconds: float
    mb_per_s: float
    mapped_bytes: int
    buffered_bytes: int
    zero_fill_bytes: int
    fractional_pages: int
    mmap_fallbacks: int
    error_ranges: tuple[dict, ...]
    pages_excluded: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def _aligned_notes(layout: Layout) -> bytes:
    notes = layout.note_bytes
    return notes + b"\0" * (-len(notes) % 4)


def write_elf(layout: Layout, plan: CopyPlan, copier: PlanCopier, out: OutputFile,
              options: SaveOptions) -> list[str]:
    """Stream an ELF core (compressed or sparse plain) into ``out``; returns warnings."""
    warnings = []
    source_notes = _aligned_notes(layout)
    note_args = dict(source=layout.source_name, page_size=layout.page_size,
                     output_format=options.output_format)
    # Errors are only known at the end; a stream we cannot rewrite must not
    # claim there were none.
    may_fail_over = options.on_error == "zero"
    first_note = vmcap_note(layout.byte_order, **note_args,
                            error_ranges=None if may_fail_over and not out.seekable else ())
    segments = [OutputSegment(s.paddr, s.vaddr, 0, s.filesz, s.memsz, s.flags)
                for s in layout.segments]
    image = plan_elf_image(layout, segments, len(source_notes) + len(first_note),
                           layout.page_size)
    if options.output_format == "zelf":
        from .seekable import SeekableWriter

        sink = SeekableWriter(out, level=options.level, threads=options.threads,
                              frame_bytes=options.frame_bytes)
        # Headers and notes go in an uncompressed frame of known size, so the
        # vmcap note can be rewritten in place at the end.
        head_offset = out.position
        writer = ElfStreamWriter(sink, image, source_notes + first_note,
                                 write_head=sink.write_raw_frame)
    else:
        sink = SparseSink(out)
        writer = ElfStreamWriter(sink, image, source_notes + first_note)
    for chunk in copier:
        if chunk.data is not None:
            writer.write_segment(chunk.segment, chunk.paddr, chunk.data)
    writer.finish()
    sink.close()

    errors = copier.stats.error_ranges
    if errors:
        final_note = vmcap_note(layout.byte_order, **note_args, error_ranges=errors)
        if not out.seekable:
            warnings.append("read errors were zero-filled but cannot be recorded in the "
                            "note of a streamed output; they are listed in this summary")
        elif options.output_format == "zelf":
            from .seekable import raw_frame

            out.pwrite(raw_frame(image.header + source_notes + final_note), head_offset)
        else:
            out.pwrite(final_note, image.vmcap_note_offset)
    return warnings


def save(source_path: str, output_path: str, options: SaveOptions = SaveOptions(), *,
         progress: Callable[[int, int], None] | None = None,
         source: Source | None = None) -> SaveSummary:
    """Capture ``source_path`` into ``output_path`` ("-" for stdout).

    ``progress(done_bytes_increment, total_bytes)`` is called as bytes are read.
    ``source`` replaces the file source (tests pass an instrumented one).
    """
    started = time.monotonic()
    if options.output_format not in FORMATS:
        raise ValueError(f"unknown format {options.output_format!r}")
    if source is None:
        source = FileSource(source_path, allow_mmap=options.allow_mmap)
    try:
        layout = read_layout(source, page_size=options.page_size)
        plan = plan_copy(layout.segments, layout.page_size)
        total = plan.file_bytes
        report = (lambda n: progress(n, total)) if progress else None
        copier = PlanCopier(source, plan, window_bytes=options.window_bytes,
                            on_error=options.on_error, progress=report)
        if options.output_format == "kdump" and output_path == "-":
            raise OutputError("--format kdump needs a seekable output file, not stdout")
        out = OutputFile(output_path, force=options.force)
        try:
            pages_excluded: dict = {}
            warnings: list[str] = []
            if options.output_format == "kdump":
                from .kdumpsave import write_kdump

                pages_excluded = write_kdump(layout, plan, copier, out, options)
            else:
                warnings = write_elf(layout, plan, copier, out, options)
            out.commit()
        except BaseException:
            out.abort()
            raise
    finally:
        source.close()

    stats: CopyStats = copier.stats
    seconds = max(time.monotonic() - started, 1e-9)
    written = out.position
    return SaveSummary(
        source=source_path, output=output_path, format=options.output_format,
        page_size=layout.page_size, segments=len(layout.segments),
        memory_bytes=plan.memory_bytes, bytes_read=stats.bytes_read, bytes_written=written,
        ratio=round(stats.bytes_read / written, 3) if written else 0.0,
        seconds=round(seconds, 3), mb_per_s=round(stats.bytes_read / seconds / 1e6, 1),
        mapped_bytes=stats.mapped_bytes, buffered_bytes=stats.buffered_bytes,
        zero_fill_bytes=stats.zero_fill_bytes, fractional_pages=len(plan.fractional_pages),
        mmap_fallbacks=stats.mmap_fallbacks,
        error_ranges=tuple({"paddr": e.paddr, "length": e.length, "reason": e.reason}
                           for e in stats.error_ranges),
        pages_excluded=pages_excluded, warnings=layout.warnings + tuple(warnings))

