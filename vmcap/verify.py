"""`vmcap verify` and `vmcap decompress`: reading vmcap's outputs back."""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from .dumpfile import ElfPhysicalView, detect_container, open_elf_source
from .errors import BadSource, VerifyMismatch
from .elfwriter import find_vmcap_note
from .layout import read_layout
from .mmapio import FileSource
from .output import OutputFile, SparseSink

COMPARE_BYTES = 4 << 20


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length buffers (vectorised)."""
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return int(diff[0])


def verify(dump_path: str, source_path: str | None = None) -> dict:
    """Check a dump's container; with a source, compare every segment byte."""
    container = detect_container(dump_path)
    result: dict = {"dump": dump_path, "container": container}
    if container in ("kdump", "kdump-flat"):
        from .kdumpsave import verify_kdump

        return verify_kdump(dump_path, source_path)
    if container == "unknown":
        raise BadSource(f"{dump_path}: not a vmcore vmcap can read (no ELF, zstd or kdump "
                        "signature)")
    out_source = open_elf_source(dump_path)
    try:
        if container == "zstd-seekable":
            frames = 0
            for _ in out_source.reader.iter_frames():
                frames += 1
            result["frames"] = frames
            result["decompressed_bytes"] = out_source.size
        layout = read_layout(out_source)
        result["segments"] = len(layout.segments)
        if source_path is not None:
            dump_level = int((find_vmcap_note(layout.notes) or {}).get("DUMP_LEVEL") or 0)
            result.update(compare_with_source(ElfPhysicalView(layout, out_source), source_path,
                                              stored_only=bool(dump_level & ~1)))
    finally:
        out_source.close()
    result["status"] = "ok"
    return result


def _intersect(start: int, end: int, ranges: list[tuple[int, int]]):
    """Parts of [start, end) inside the sorted, disjoint (paddr, length) ranges."""
    i = bisect_right(ranges, (start, float("inf"))) - 1
    i = max(i, 0)
    while i < len(ranges) and ranges[i][0] < end:
        lo = max(start, ranges[i][0])
        hi = min(end, ranges[i][0] + ranges[i][1])
        if lo < hi:
            yield lo, hi
        i += 1


def compare_with_source(view, source_path: str, *, stored_only: bool = False) -> dict:
    """Compare every byte of every source segment with the output's physical memory.

    Excluded pages read as zeros from the output. At dump levels that only
    drop zero pages (0, 1) that is checked too: the source must be zero
    there. When kernel page classes were excluded (``stored_only``), only
    the bytes the output stored are compared, and the rest is counted.
    """
    source = FileSource(source_path)
    compared = 0
    try:
        src_layout = read_layout(source)
        # When the output keeps the source's segments one for one, compare
        # each with its own twin: overlapping PT_LOADs (kernel text over RAM)
        # are each copied whole.
        out_segments = getattr(getattr(view, "layout", None), "segments", ())
        twins = (len(out_segments) == len(src_layout.segments) and all(
            (a.paddr, a.filesz, a.memsz) == (b.paddr, b.filesz, b.memsz)
            for a, b in zip(out_segments, src_layout.segments)))
        stored = sorted(view.stored_ranges()) if stored_only else None
        total = 0
        for seg in src_layout.segments:
            total += seg.filesz
            parts = ([(seg.paddr, seg.end)] if stored is None
                     else list(_intersect(seg.paddr, seg.end, stored)))
            for lo, hi in parts:
                done = lo
                while done < hi:
                    n = min(COMPARE_BYTES, hi - done)
                    expected = source.pread(seg.offset + (done - seg.paddr), n)
                    if twins:
                        actual = view.read(done, n, segment=out_segments[seg.index])
                    else:
                        actual = view.read_physical(done, n)
                    if expected != actual:
                        at = _first_difference(expected, actual)
                        raise VerifyMismatch(
                            f"{source_path} segment {seg.index}: physical address "
                            f"{done + at:#x} differs (source {expected[at]:#04x}, output "
                            f"{actual[at]:#04x})")
                    done += n
                    compared += n
    finally:
        source.close()
    return {"source": source_path, "compared_bytes": compared,
            "excluded_bytes_not_compared": total - compared}


def decompress(dump_path: str, plain_path: str, *, force: bool = False) -> int:
    """Write the plain sparse ELF of a seekable-zstd dump; returns its size.

    The same sink as `save --format elf`: all-zero blocks become holes,
    OUT.part is renamed only when every frame decompressed and was written.
    """
    from .seekable import SeekableReader

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
