"""`vmcap demo`: a sample vmcore with fractional pages, saved and audited.

The save runs through a recording source, so the demo can show, not just
claim, that no non-RAM byte was read, that each fractional piece was read
once with pread and that no fractional page was mapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .fileio.mmapio import FileSource, RecordingSource
from .plan.copyplan import BufferedPiece, plan_copy
from .sample import build_vmcore, demo_spec
from .save import SaveOptions, SaveSummary, save
from .source.layout import read_layout


@dataclass(frozen=True)
class ReadAudit:
    reads: int  # pread calls during the save
    maps: int  # mmap windows during the save
    non_ram_bytes_touched: int
    fractional_pieces: int
    pieces_read_once: int
    fractional_pages_mapped: int


@dataclass(frozen=True)
class DemoRun:
    source: str
    output: str
    summary: SaveSummary


def _overlap(a_start: int, a_len: int, b_start: int, b_len: int) -> int:
    return max(0, min(a_start + a_len, b_start + b_len) - max(a_start, b_start))


def build_and_save(directory: str) -> tuple[DemoRun, ReadAudit]:
    """Build the sample in ``directory``, save it through a recording source, audit the reads."""
    source_path = os.path.join(directory, "demo-vmcore")
    output_path = os.path.join(directory, "demo-vmcore.zelf")
    info = build_vmcore(source_path, demo_spec())
    recorder = RecordingSource(FileSource(source_path))
    summary = save(source_path, output_path, SaveOptions(force=True), source=recorder)

    with FileSource(source_path) as plain:
        layout = read_layout(plain)
    plan = plan_copy(layout.segments, layout.page_size)
    page = layout.page_size
    non_ram = sum(_overlap(call.offset, call.length, offset, length)
                  for call in recorder.calls for offset, length in info.non_ram_file_ranges)
    pieces = [step for step in plan.steps if isinstance(step, BufferedPiece)]
    read_once = sum(1 for step in pieces
                    if [(c.kind, c.length) for c in recorder.calls if c.offset == step.offset]
                    == [("pread", step.length)])
    fractional_file_pages = {p.offset - p.offset % page
                             for f in plan.fractional_pages for p in f.pieces}
    mapped = sum(1 for call in recorder.calls if call.kind == "map"
                 for file_page in range(call.offset, call.offset + call.length, page)
                 if file_page in fractional_file_pages)
    audit = ReadAudit(
        reads=sum(1 for c in recorder.calls if c.kind == "pread"),
        maps=sum(1 for c in recorder.calls if c.kind == "map"),
        non_ram_bytes_touched=non_ram, fractional_pieces=len(pieces),
        pieces_read_once=read_once, fractional_pages_mapped=mapped)
    return DemoRun(source_path, output_path, summary), audit
