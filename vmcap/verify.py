"""`vmcap verify` and `vmcap decompress`: reading vmcap's outputs back."""

from __future__ import annotations

import numpy as np

from .dumpfile import ElfPhysicalView, detect_container, open_elf_source
from .errors import BadSource, OutputError, VerifyMismatch
from .layout import read_layout
from .mmapio import FileSource
from .output import OutputFile

COMPARE_BYTES = 4 << 20


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two equal-length buffers (vectorised)."""
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return int(diff[0])


def verify(dump_path: str, source_path: str | None = None) -> dict:
    """Check a dump's container; with a source, compare every segment byte."""
    container = detect_container(dump_path)
    result: dict = {"dump": dump_path, "container": container}
    if container == "kdump":
        from .kdumpsave import verify_kdump

        return verify_kdump(dump_path, source_path)
    if container not in ("elf", "zstd-seekable"):
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
            result.update(compare_with_source(ElfPhysicalView(layout, out_source),
                                              source_path))
    finally:
        out_source.close()
    result["status"] = "ok"
    return result


def compare_with_source(view, source_path: str) -> dict:
    """Compare every byte of every source segment with ``view.read(paddr, n)``.

    ``view`` is the output's physical memory (an ELF view, or a kdump reader
    adapter); zero-filled (excluded) ranges in the output must be zero in
    the source too, so exclusions are checked as well.
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
        for seg in src_layout.segments:
            done = 0
            while done < seg.filesz:
                n = min(COMPARE_BYTES, seg.filesz - done)
                expected = source.pread(seg.offset + done, n)
                if twins:
                    actual = view.read(seg.paddr + done, n, segment=out_segments[seg.index])
                else:
                    actual = view.read_physical(seg.paddr + done, n)
                if expected != actual:
                    at = _first_difference(expected, actual)
                    paddr = seg.paddr + done + at
                    raise VerifyMismatch(
                        f"{source_path} segment {seg.index}: physical address {paddr:#x} "
                        f"differs (source {expected[at]:#04x}, output {actual[at]:#04x})")
                done += n
                compared += n
    finally:
        source.close()
    return {"source": source_path, "compared_bytes": compared}


def decompress(dump_path: str, plain_path: str, *, force: bool = False) -> int:
    """Write the plain sparse ELF of a seekable-zstd dump; returns its size."""
    from .seekable import SeekableReader, decompress_to_file

    container = detect_container(dump_path)
    if container != "zstd-seekable":
        raise BadSource(f"{dump_path}: not a vmcap zelf file (container: {container})")
    reader = SeekableReader(dump_path)
    out = OutputFile(plain_path, force=force, mode=0o600)
    try:
        try:
            size = decompress_to_file(reader, out.fd, sparse=True)
        except OSError as e:
            raise OutputError(f"{out.part_path}: write failed: {e.strerror}") from None
        out.position = size
        out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        reader.close()
    return size
