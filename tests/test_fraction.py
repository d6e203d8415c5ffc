"""Planner properties: exact single coverage, safe mapping, fractional pages found."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmcap.formats.elf import Segment
from vmcap.plan.copyplan import BufferedPiece, MappedRange, ZeroFill, find_fractional_pages, plan_copy

# Small page sizes keep brute-force oracles cheap; the planner has no
# special case for any page size.
PAGE_SIZES = st.sampled_from([16, 64, 4096, 65536])


@st.composite
def segment_sets(draw):
    page = draw(PAGE_SIZES)
    layout = draw(st.sampled_from(["proc", "packed", "any"]))
    count = draw(st.integers(0, 12))
    segments = []
    cursor = page  # file offset for the next chunk (after a header page)
    for index in range(count):
        paddr = draw(st.integers(0, 40 * page))
        filesz = draw(st.integers(0, 6 * page))
        memsz = filesz + draw(st.sampled_from([0, 0, 0, 1, page, 3 * page + 5]))
        if layout == "proc":
            # fs/proc/vmcore.c: page-rounded chunk, p_offset inside it.
            chunk_start = paddr - paddr % page
            offset = cursor + (paddr - chunk_start)
            cursor += -(-(paddr + memsz) // page) * page - chunk_start
        elif layout == "packed":
            offset = cursor
            cursor += filesz
        else:
            offset = draw(st.integers(0, 60 * page))
        segments.append(Segment(index, paddr, paddr, offset, filesz, memsz))
    return page, segments


def brute_force_fractional(segments, page):
    """The definition: a page holding file data of some segment, covered whole by none."""
    pages = set()
    for s in segments:
        if not s.filesz:
            continue
        for addr in range(s.paddr - s.paddr % page, s.paddr + s.filesz, page):
            pages.add(addr)
    result = []
    for p in sorted(pages):
        covered = any(s.paddr <= p and s.paddr + s.filesz >= p + page for s in segments)
        if not covered:
            result.append(p)
    return result


@settings(max_examples=400, deadline=None)
@given(segment_sets())
def test_every_segment_byte_planned_exactly_once_in_order(case):
    page, segments = case
    plan = plan_copy(segments, page)
    by_segment = {s.index: [] for s in segments}
    for step in plan.steps:
        by_segment[step.segment].append(step)
    assert [step.segment for step in plan.steps] == sorted(step.segment for step in plan.steps)
    for s in segments:
        cursor = s.paddr
        for step in by_segment[s.index]:
            assert step.paddr == cursor, "steps must be contiguous and in order"
            if not isinstance(step, ZeroFill):
                # A file step reads exactly the segment's own bytes for its paddrs.
                assert step.offset - step.paddr == s.offset - s.paddr
                assert step.paddr + step.length <= s.paddr + s.filesz
            else:
                assert step.paddr >= s.paddr + s.filesz
            assert step.length > 0
            cursor += step.length
        assert cursor == s.paddr + s.memsz
    assert plan.memory_bytes == sum(s.memsz for s in segments)


@settings(max_examples=400, deadline=None)
@given(segment_sets())
def test_mapped_ranges_are_whole_file_pages_of_one_segment(case):
    page, segments = case
    plan = plan_copy(segments, page)
    for step in plan.steps:
        if isinstance(step, MappedRange):
            seg = segments[step.segment]
            assert step.offset % page == 0 and step.length % page == 0
            assert seg.offset <= step.offset
            assert step.offset + step.length <= seg.offset + seg.filesz


@settings(max_examples=400, deadline=None)
@given(segment_sets())
def test_buffered_reads_stay_inside_segment_data_and_are_not_whole_pages(case):
    page, segments = case
    plan = plan_copy(segments, page)
    for step in plan.steps:
        if isinstance(step, BufferedPiece):
            seg = segments[step.segment]
            assert seg.offset <= step.offset
            assert step.offset + step.length <= seg.offset + seg.filesz
            # Buffered pieces are the leftovers around whole pages: < 2 pages.
            assert step.length < 2 * page


@settings(max_examples=400, deadline=None)
@given(segment_sets())
def test_fractional_pages_match_the_definition(case):
    page, segments = case
    found = find_fractional_pages(segments, page)
    assert [f.paddr for f in found] == brute_force_fractional(segments, page)
    for frac in found:
        for piece in frac.pieces:
            seg = segments[piece.segment]
            assert frac.paddr <= piece.paddr and piece.paddr + piece.size <= frac.paddr + page
            assert seg.paddr <= piece.paddr and piece.paddr + piece.size <= seg.end
            assert piece.offset == seg.offset + (piece.paddr - seg.paddr)
        # Every segment with data in the page contributes its piece.
        touching = {s.index for s in segments
                    if s.filesz and s.paddr < frac.paddr + page and s.end > frac.paddr}
        assert {p.segment for p in frac.pieces} == touching
        # Two RAM ranges can fill a page between them: still fractional
        # (no single segment covers it), with no non-RAM byte.
        assert 0 < frac.ram_bytes <= page
        assert frac.non_ram_bytes == page - frac.ram_bytes


def test_proc_layout_fractional_pages_are_buffered_never_mapped():
    page = 4096
    # Two RAM ranges sharing page 0x2000, and one ending mid-page.
    segments = [Segment(0, 0x1000, 0, 0x1000, 0x1800, 0x1800),
                Segment(1, 0x2800, 0, 0x3800, 0x800 + 0x2000, 0x800 + 0x2000),
                Segment(2, 0x10000, 0, 0x7000, 0x1234, 0x1234)]
    plan = plan_copy(segments, page)
    assert [f.paddr for f in plan.fractional_pages] == [0x2000, 0x11000]
    assert [(p.segment, p.paddr, p.size) for p in plan.fractional_pages[0].pieces] == \
        [(0, 0x2000, 0x800), (1, 0x2800, 0x800)]
    mapped = [(s.offset, s.length) for s in plan.steps if isinstance(s, MappedRange)]
    assert mapped == [(0x1000, 0x1000), (0x4000, 0x2000), (0x7000, 0x1000)]
    buffered = [(s.paddr, s.length) for s in plan.steps if isinstance(s, BufferedPiece)]
    assert buffered == [(0x2000, 0x800), (0x2800, 0x800), (0x11000, 0x234)]


def test_overlapping_segments_page_covered_by_another_is_not_fractional():
    # The x86_64 kernel-text PT_LOAD overlaps a RAM PT_LOAD.
    segments = [Segment(0, 0x100000, 0, 0x1000, 0x400000, 0x400000),
                Segment(1, 0x200000, 0xffffffff81000000, 0x401000, 0x1800, 0x1800)]
    plan = plan_copy(segments, 4096)
    assert plan.fractional_pages == ()
    # The text segment's tail is still read with pread: its own file page is
    # not wholly inside its data.
    assert BufferedPiece(1, 0x201000, 0x402000, 0x800) in plan.steps


def test_empty_and_zero_size_segments():
    segments = [Segment(0, 0x1000, 0, 0x1000, 0, 0), Segment(1, 0x2000, 0, 0x1000, 0, 0x3000)]
    plan = plan_copy(segments, 4096)
    assert plan.steps == (ZeroFill(1, 0x2000, 0x3000),)
    assert plan.fractional_pages == ()


def test_64k_pages():
    page = 65536
    segments = [Segment(0, 0x10000 + 0x100, 0, page + 0x100, 3 * page, 3 * page)]
    plan = plan_copy(segments, page)
    assert [f.paddr for f in plan.fractional_pages] == [0x10000, 0x40000]
    assert MappedRange(0, 0x20000, 2 * page, 2 * page) in plan.steps


def test_hundred_thousand_segments_plan_is_complete():
    # A fragmented EFI memory map: every segment ends mid-page.
    page = 4096
    segments = []
    offset = page
    for i in range(100_000):
        paddr = i * 3 * page + 0x100
        segments.append(Segment(i, paddr, paddr, offset + 0x100, 2 * page, 2 * page))
        offset += 3 * page
    plan = plan_copy(segments, page)
    assert len(plan.fractional_pages) == 200_000
    assert plan.memory_bytes == 100_000 * 2 * page
    assert plan.buffered_bytes == 100_000 * page


@settings(max_examples=300, deadline=None)
@given(segment_sets())
def test_disjoint_segments_cover_the_same_memory_once(case):
    from vmcap.plan.copyplan import disjoint_segments, present_page_count

    page, segments = case
    disjoint = disjoint_segments(segments)
    union = set()
    for s in segments:
        union.update(range(s.paddr, s.paddr + s.memsz))
    seen = []
    for d in disjoint:
        src = segments[d.index]
        # Inside the source segment, same paddr->offset relation, file data kept.
        assert src.paddr <= d.paddr and d.paddr + d.memsz <= src.paddr + src.memsz
        assert d.offset - d.paddr == src.offset - src.paddr or d.filesz == 0
        assert d.paddr + d.filesz == min(src.paddr + src.filesz, d.paddr + d.memsz) or \
            d.filesz == 0
        seen.extend(range(d.paddr, d.paddr + d.memsz))
    assert sorted(seen) == seen and set(seen) == union and len(seen) == len(union)
    assert present_page_count(disjoint, page) == len({a // page for a in union})
