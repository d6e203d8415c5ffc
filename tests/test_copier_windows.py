"""Where the copier cuts its mmap windows when file pages and physical pages are out of step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcap.fileio.mmapio import FileSource, RecordingSource
from vmcap.kernel.dumplevel import ExclusionCounts
from vmcap.kernel.pageclass import PfnBitmap
from vmcap.plan.copier import PlanCopier
from vmcap.plan.copyplan import MappedRange, plan_copy
from vmcap.sample import RamRange
from vmcap.save import SaveOptions, save
from vmcap.source.layout import read_layout

from conftest import spec

PAGE = 4096
MiB = 1 << 20

# "packed": QEMU's and makedumpfile -E's layout, each segment right after the previous one,
# so a segment's file offset is not its paddr modulo the page size.
PACKED = spec(ranges=(RamRange(0x100000, 5 * MiB + 3 * PAGE), RamRange(0x800000, 2 * MiB)),
              layout="packed", content="mixed", seed=3)


@pytest.mark.parametrize("window", [64 << 10, MiB, 3 * MiB + PAGE])
def test_windows_of_an_out_of_step_segment_end_on_physical_pages(make_vmcore, window):
    src, info = make_vmcore(PACKED)
    with FileSource(src) as plain:
        layout = read_layout(plain)
    assert {(s.paddr - s.offset) % PAGE for s in layout.segments} != {0}  # out of step
    plan = plan_copy(layout.segments, layout.page_size)
    mapped_steps = [s for s in plan.steps if type(s) is MappedRange]
    recorder = RecordingSource(FileSource(src))
    try:
        copier = PlanCopier(recorder, plan, window_bytes=window)
        chunks = [(c.paddr, c.length, bytes(c.data)) for c in copier if c.data is not None]
    finally:
        recorder.close()
    for paddr, length, data in chunks:
        assert data == info.expected_bytes(paddr, length), hex(paddr)
    for step in mapped_steps:
        ends = [paddr + length for paddr, length, _ in chunks if step.paddr <= paddr < step.paddr + step.length]
        assert ends[-1] == step.paddr + step.length
        # every chunk inside a mapped range ends on a physical page, so no page is split
        assert all(end % PAGE == 0 for end in ends[:-1]), [hex(e) for e in ends]
    maps = [c for c in recorder.calls if c.kind == "map"]
    assert maps
    for call in maps:
        assert any(s.offset <= call.offset and call.offset + call.length <= s.offset + s.length
                   for s in mapped_steps), call  # never beyond a mapped range
        assert call.offset % PAGE == 0 and call.length <= window + PAGE


def test_kdump_of_an_out_of_step_source_is_the_same_whatever_the_window(make_vmcore, tmp_path):
    src, _ = make_vmcore(PACKED)
    outputs = []
    for window in (64 << 10, MiB, 256 * MiB):
        out = tmp_path / f"out-{window}"
        summary = save(src, str(out), SaveOptions(output_format="kdump", window_bytes=window, threads=1))
        assert summary.mapped_bytes > 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


class Exclusion:
    """A -d 31 classification of a sample: a per-pfn mask, sliced and searched as CyclicExclusion is."""

    def __init__(self, mask):
        self.excluded = self
        self._mask = mask
        self.counts = ExclusionCounts(classes={"free": int(mask.sum())}, total_pages=len(mask))

    def __getitem__(self, pieces):
        return self._mask[pieces.start:pieces.stop]

    def count(self) -> int:
        return int(self._mask.sum())

    def first_clear(self, start: int, stop: int) -> int:
        kept = np.flatnonzero(~self._mask[start:stop])
        return start + int(kept[0]) if len(kept) else min(stop, len(self._mask))


@pytest.mark.parametrize("layout", ["proc", "packed"])
def test_kdump_does_not_map_windows_whose_pages_are_all_excluded(make_vmcore, tmp_path, monkeypatch, layout):
    """makedumpfile reads only the pages it dumps; /proc/vmcore maps a window's page
    tables eagerly: windows of excluded pages are marked present without being mapped,
    and the file is the same as when they are read and dropped."""
    import numpy as np

    import vmcap.kdumpsave
    import vmcap.save

    base = 0x100000
    src, _ = make_vmcore(spec(ranges=(RamRange(base, 12 * MiB),), layout=layout, content="mixed", seed=5))
    first_pfn = base // PAGE
    mask = np.zeros(first_pfn + 12 * MiB // PAGE, dtype=bool)
    gone = (first_pfn + 512, first_pfn + 3 * 512 + 100)  # over two whole 1 MiB windows
    mask[gone[0]:gone[1]] = True
    mask[first_pfn + 5:first_pfn + 3000:7] = True  # scattered: those windows are read
    monkeypatch.setattr(vmcap.save, "classify_source", lambda *args: Exclusion(mask))

    def run(name):
        recorder = RecordingSource(FileSource(src))
        summary = save(src, str(tmp_path / name), SaveOptions(output_format="kdump", dump_level=31, threads=1,
                                                               window_bytes=MiB), source=recorder)
        maps = [(c.offset, c.length) for c in recorder.calls if c.kind == "map"]
        return (tmp_path / name).read_bytes(), summary, maps

    skipped, summary, maps = run("skipped")
    monkeypatch.setattr(vmcap.kdumpsave.PageStream, "excluded_bytes", lambda self, paddr, length: 0)
    read, reference, all_maps = run("read")
    assert skipped == read
    assert summary.pages_excluded == reference.pages_excluded
    assert reference.mapped_bytes - summary.mapped_bytes >= 2 * MiB
    with FileSource(src) as plain:
        segment = read_layout(plain).segments[0]
    lo = segment.offset + (gone[0] * PAGE - segment.paddr)
    hi = segment.offset + (gone[1] * PAGE - segment.paddr)
    skipped_windows = [m for m in all_maps if lo <= m[0] and m[0] + m[1] <= hi]
    assert skipped_windows and not set(skipped_windows) & set(maps)


RUN_SOURCE = spec(ranges=(RamRange(0x100000, 6 * MiB),), layout="proc", content="mixed", seed=9)


@settings(max_examples=40, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 6 * MiB // PAGE), st.integers(1, 700)), max_size=6),
       window=st.sampled_from([64 << 10, MiB]))
def test_a_run_of_excluded_pages_is_one_skipped_chunk_and_never_mapped(tmp_path_factory, runs, window):
    """However many windows an excluded run spans, the copier skips it in one chunk, starts
    the next window on the first kept page, and maps nothing that holds only excluded pages."""
    from vmcap.sample import build_vmcore

    src = tmp_path_factory.getbasetemp() / "runs.core"
    if not src.exists():
        build_vmcore(str(src), RUN_SOURCE)
    base = 0x100000 // PAGE
    mask = np.zeros(base + 6 * MiB // PAGE, dtype=bool)
    for first, count in runs:
        mask[base + first:base + first + count] = True
    with FileSource(src) as plain:
        layout = read_layout(plain)
    plan = plan_copy(layout.segments, PAGE)

    bitmap = PfnBitmap(len(mask))
    edges = np.diff(mask.astype(np.int8), prepend=0, append=0)
    bitmap.set_ranges(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
    assert np.array_equal(bitmap.to_array(), mask)

    def skip(paddr, length):
        first = paddr // PAGE
        return (bitmap.first_clear(first, first + length // PAGE) - first) * PAGE if paddr % PAGE == 0 else 0

    recorder = RecordingSource(FileSource(src))
    try:
        chunks = [(c.paddr, c.length, c.skipped) for c in PlanCopier(recorder, plan, window_bytes=window, skip=skip)]
        maps = [(c.offset, c.length) for c in recorder.calls if c.kind == "map"]
    finally:
        recorder.close()
    assert [p + n for p, n, _ in chunks[:-1]] == [p for p, _, _ in chunks[1:]]  # contiguous
    for (paddr, length, skipped), after in zip(chunks, chunks[1:] + [None]):
        pages = mask[paddr // PAGE:(paddr + length) // PAGE]
        if skipped:
            assert pages.all() and length % PAGE == 0
            assert after is None or not after[2]  # maximal: a skipped run is one chunk
            assert after is None or not mask[(paddr + length) // PAGE]
        else:
            assert not pages[0], hex(paddr)  # a window starts on a kept page
    segment = layout.segments[0]
    for offset, length in maps:
        first = (segment.paddr + offset - segment.offset) // PAGE
        assert not mask[first:first + length // PAGE].all()
