"""The fast paths of issue 11 give the same bytes and digests as the plain ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from test_kdump import elf_note, mixed_pages, x86_64_info

import vmcap.formats.digest as digest_module
from vmcap.formats.digest import PLACEHOLDER, file_digest, sparse_file_digest
from vmcap.formats.kdump import KdumpReader, KdumpWriter

PAGE = 4096


def test_sparse_file_digest_equals_file_digest(tmp_path):
    path = tmp_path / "holes"
    written = [(5000, 9000), (1 << 20, (1 << 20) + 4096), (3 << 20, (3 << 20) + 17)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        rng = np.random.default_rng(1)
        for lo, hi in written:
            os.pwrite(fd, rng.integers(1, 256, hi - lo, dtype=np.uint8).tobytes(), lo)
        os.ftruncate(fd, 5 << 20)
        for start, end in [(0, 5 << 20), (6000, (3 << 20) + 5), (9000, 1 << 20), (0, 1)]:
            assert sparse_file_digest(fd, start, end, written) == file_digest(fd, start, end)
    finally:
        os.close(fd)


def test_kdump_meta_digest_reads_only_written_bitmap_windows(tmp_path, monkeypatch):
    """A 4 TiB address space (2 x 128 MiB of bitmap) with a few pages: the META
    digest must not read the bitmaps' holes back, and must still be the XXH64
    of the file's bytes [0, descriptor_offset) that verify computes."""
    max_mapnr = 1 << 30
    text = b"VMCAP_TEST\nMETA_XXH64=" + PLACEHOLDER.encode() + b"\n"
    info = x86_64_info()
    info = type(info)(**{**info.__dict__, "notes": info.notes + elf_note(b"VMCAP", 1, text)})
    recorded = {}

    def notes_with_digests(values):
        recorded.update(values)
        return info.notes.replace(PLACEHOLDER.encode(), values["META_XXH64"].encode())

    read = []
    real_pread = os.pread
    monkeypatch.setattr(digest_module.os, "pread",
                        lambda fd, n, at: read.append(n) or real_pread(fd, n, at))
    path = tmp_path / "sparse.kdump"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = KdumpWriter(fd, info, max_mapnr=max_mapnr, max_pages_present=64, threads=1)
        writer.write_pages(5, mixed_pages(8).tobytes())
        writer.write_pages(max_mapnr // 2 + 3, mixed_pages(8, seed=2).tobytes())
        writer.write_pages(max_mapnr - 8, mixed_pages(8, seed=3).tobytes())
        writer.close(notes_with_digests)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert sum(read) < 8 << 20  # three 1 MiB windows per bitmap, the headers and notes
    with KdumpReader(str(path)) as reader:
        end = reader.descriptor_offset
        assert end > 256 << 20
    raw_head = Path(path).read_bytes()[:PAGE * 4]
    blank_at = raw_head.index(b"META_XXH64=") + len("META_XXH64=")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_digest(fd, 0, end, blank_at=blank_at) == recorded["META_XXH64"]
    finally:
        os.close(fd)


def _kdump_bytes(path: Path, splits, pages: np.ndarray, first_pfn: int, **options) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = KdumpWriter(fd, x86_64_info(), threads=1, **options)
        at = 0
        for n in splits:
            writer.write_pages(first_pfn + at, pages[at:at + n].tobytes())
            at += n
        writer.close()
    finally:
        os.close(fd)
    return path.read_bytes()


def test_kdump_output_does_not_depend_on_how_pages_are_split(tmp_path):
    """Chunks stored directly, staged ones and batches cut anywhere give the same file;
    the run crosses a bitmap window (8 Mi pfns) so contiguous bits span two windows."""
    pages = mixed_pages(1500)
    first_pfn = (8 << 20) - 700
    options = dict(max_mapnr=16 << 20, max_pages_present=1500)
    for exclude_zero in (False, True):
        one_by_one = _kdump_bytes(tmp_path / "a", [1] * 1500, pages, first_pfn,
                                  exclude_zero=exclude_zero, **options)
        for splits in ([1500], [3, 64, 1, 63, 1024, 345], [1100, 400], [65] * 23 + [5]):
            assert sum(splits) == 1500
            assert _kdump_bytes(tmp_path / "b", splits, pages, first_pfn,
                                exclude_zero=exclude_zero, **options) == one_by_one, splits
    with KdumpReader(str(tmp_path / "b")) as reader:
        assert list(reader.iter_present_runs()) == [(first_pfn, 1500)]
        assert reader.read_page(first_pfn + 1).hex() == pages[1].tobytes().hex()


def _kdump_with_gaps(path: Path, pages: np.ndarray, first_pfn: int, kept: int, gap: int,
                     **options) -> tuple[bytes, int]:
    """Runs of `kept` pages written, `gap` pages marked present between them (-d 31's
    pattern); the file and how many batches the writer stored."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = KdumpWriter(fd, x86_64_info(), threads=1, **options)
        batches = []
        store = writer._store.store_batch
        writer._store.store_batch = lambda pfns, *a, **k: batches.append(len(pfns)) or store(pfns, *a, **k)
        pfn, at = first_pfn, 0
        while at < len(pages):
            writer.write_pages(pfn, pages[at:at + kept].tobytes())
            writer.mark_present(pfn + kept, gap)
            pfn, at = pfn + kept + gap, at + kept
        writer.close()
    finally:
        os.close(fd)
    return path.read_bytes(), len(batches)


def test_pages_kept_between_excluded_runs_are_stored_in_full_batches(tmp_path):
    """Excluded runs (mark_present) no longer cut the staging batch: 1200 pages in runs
    of 3 between runs of 5 excluded ones take 5 batches, not 400; the 1st bitmap
    (set as pages are staged) and the 2nd (as they are stored) stay right across a
    bitmap window (2 Mi pfns)."""
    pages = mixed_pages(1200)
    first_pfn = (2 << 20) - 1000
    options = dict(max_mapnr=8 << 20, max_pages_present=1200)
    for exclude_zero in (False, True):
        _, batches = _kdump_with_gaps(tmp_path / "a", pages, first_pfn, 3, 5,
                                      exclude_zero=exclude_zero, **options)
        assert batches <= -(-1200 // 256), batches
        with KdumpReader(str(tmp_path / "a")) as reader:
            assert list(reader.iter_present_runs()) == [(first_pfn, 400 * 8)]
            for i in range(1200):
                pfn = first_pfn + (i // 3) * 8 + i % 3
                stored = bool(pages[i].any()) or not exclude_zero
                assert reader.is_dumped(pfn) == stored, i
                if stored:
                    assert reader.read_page(pfn) == pages[i].tobytes(), i
            for run in range(400):
                assert not any(reader.is_dumped(first_pfn + run * 8 + k) for k in range(3, 8))


def test_runs_from_mask_reads_the_mask_in_bounded_pieces():
    """A segment of 2**22 pages is read <= 2**20 pfns at a time, with runs that
    cross the pieces joined; the mask ends before the segment does."""
    from vmcap.formats.elf import Segment
    from vmcap.plan.exclude import MIN_EXCLUDED_RUN, ExcludedRun, runs_from_mask

    pfns = 1 << 22
    MASK_PIECE_PFNS = 1 << 20  # the memory bound asked of runs_from_mask
    full = np.zeros(pfns, dtype=bool)
    full[MASK_PIECE_PFNS - 300:MASK_PIECE_PFNS + 300] = True  # one run across a piece edge
    full[5000:5000 + MIN_EXCLUDED_RUN - 1] = True  # too short: kept
    full[3 << 20:(3 << 20) + 1000] = True

    class Mask:
        sizes = []

        def __getitem__(self, piece):
            self.sizes.append(piece.stop - piece.start)
            return full[piece.start:min(piece.stop, pfns - 7)]

    first_pfn = 0x100
    segment = Segment(index=0, paddr=first_pfn * PAGE, vaddr=0, offset=0,
                      filesz=(pfns - first_pfn) * PAGE, memsz=(pfns - first_pfn) * PAGE)
    mask = Mask()
    runs = runs_from_mask([segment], mask, PAGE)
    assert max(mask.sizes) <= MASK_PIECE_PFNS
    assert runs == [ExcludedRun(0, (MASK_PIECE_PFNS - 300) * PAGE, 600 * PAGE),
                    ExcludedRun(0, (3 << 20) * PAGE, 1000 * PAGE)]


def test_seekable_default_threads_are_the_usable_cpus(monkeypatch):
    """threads=0 means the CPUs this process may run on (a capture kernel's
    nr_cpus=1 or a taskset), not every CPU of the machine."""
    import io

    import vmcap.formats.seekable as seekable

    monkeypatch.setattr(seekable.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(seekable.os, "cpu_count", lambda: 64)
    writer = seekable.SeekableWriter(io.BytesIO(), frame_bytes=1 << 16)
    try:
        assert writer._pool is None  # one CPU: compress in the calling thread, no pool
    finally:
        writer.close()
    monkeypatch.setattr(seekable.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    writer = seekable.SeekableWriter(io.BytesIO(), frame_bytes=1 << 16)
    try:
        assert writer._threads == 3
    finally:
        writer.close()


def test_excluded_pages_in_runs_are_counted_in_bounded_pieces():
    """save counts the class-excluded pfns inside each excluded run; one run can
    span a terabyte, so the mask is sliced at most 2**20 pfns at a time."""
    from vmcap.save import _count_set

    full = np.zeros(1 << 22, dtype=bool)
    full[100:(1 << 21) + 5] = True
    sizes = []

    class Mask:
        def __getitem__(self, piece):
            sizes.append(piece.stop - piece.start)
            return full[piece]

    assert _count_set(Mask(), 50, 1 << 22) == (1 << 21) + 5 - 100
    assert max(sizes) <= 1 << 20 and len(sizes) == 4
