"""Where the copier cuts its mmap windows when file pages and physical pages are out of step."""

from __future__ import annotations

import pytest

from vmcap.fileio.mmapio import FileSource, RecordingSource
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
