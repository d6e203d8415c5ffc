"""rewrite_head on every sink (vmcap/formats/head.py): the head written first is replaced in
place once the data is written, and nothing else changes."""

from __future__ import annotations

import errno
import io
import os

import numpy as np
import pytest
import xxhash
from test_kdump import x86_64_info

from vmcap.errors import OutputError, OutputFull
from vmcap.fileio.output import OutputFile
from vmcap.formats.flattened import FlattenedFile, FlattenedWriter
from vmcap.formats.head import KdumpFile, SparseElfSink
from vmcap.formats.kdump import KdumpReader, KdumpWriter
from vmcap.formats.seekable import SeekableReader, SeekableWriter

HEAD = b"HEAD" + bytes(9000) + b"tail of the head"
NEW_HEAD = b"NEW!" + bytes(9000) + b"TAIL OF THE HEAD"
DATA = b"".join([os.urandom(8192), bytes(64 << 10), os.urandom(5000)])


def test_sparse_elf_sink(tmp_path):
    path = tmp_path / "out.elf"
    out = OutputFile(str(path))
    sink = SparseElfSink(out)
    sink.write_head(HEAD)
    sink.write(DATA[:20000])
    sink.write_zeros(1000)
    sink.write(DATA[20000:])
    with pytest.raises(ValueError, match="bytes"):
        sink.rewrite_head(NEW_HEAD + b"x")
    sink.rewrite_head(NEW_HEAD)
    assert sink.close() == len(HEAD) + len(DATA) + 1000
    out.commit()
    assert path.read_bytes() == NEW_HEAD + DATA[:20000] + bytes(1000) + DATA[20000:]
    # The data digest covers the bytes after the head, zeros included.
    assert sink.data_digest.hexdigest() == xxhash.xxh64_hexdigest(
        DATA[:20000] + bytes(1000) + DATA[20000:])
    # The zeros of the data are holes; the head's were allocated (rewritable on a full disk).
    assert os.stat(path).st_blocks * 512 < len(HEAD) + len(DATA)


def test_sparse_elf_sink_head_is_written_once(tmp_path):
    out = OutputFile(str(tmp_path / "x"))
    sink = SparseElfSink(out)
    with pytest.raises(ValueError, match="no head"):
        sink.rewrite_head(HEAD)
    sink.write_head(HEAD)
    with pytest.raises(ValueError, match="once"):
        sink.write_head(HEAD)
    out.abort()


def _zelf(path) -> bytes:
    with SeekableReader(str(path)) as reader:
        return b"".join(plain for _, plain in reader.iter_frames())


@pytest.mark.parametrize("threads", [1, 2])
def test_seekable_writer_rewrites_its_head_frame(tmp_path, threads):
    path = tmp_path / "out.zelf"
    out = OutputFile(str(path))
    writer = SeekableWriter(out, threads=threads, frame_bytes=16 << 10)
    writer.write_head(HEAD)
    writer.write(DATA)
    with pytest.raises(ValueError, match="bytes"):
        writer.rewrite_head(HEAD[:-1])
    writer.rewrite_head(NEW_HEAD)  # frames may still be in flight: they go out first
    stats = writer.close()
    out.position = stats.compressed_bytes
    out.commit()
    # Frames and seek table agree with the new head (checksums included).
    assert _zelf(path) == NEW_HEAD + DATA


def test_seekable_writer_without_a_head_has_none_to_rewrite():
    writer = SeekableWriter(io.BytesIO(), threads=1)
    writer.write_raw_frame(b"not a head")
    with pytest.raises(ValueError, match="no head frame"):
        writer.rewrite_head(b"not a head")


@pytest.mark.parametrize("threads", [1, 2])
def test_seekable_writer_head_after_a_cut(tmp_path, threads):
    """After a failed write the frames wholly written stay, the head is rewritten and
    the seek table of the kept frames closes the file; the sink's offset counts."""
    path = tmp_path / "cut.zelf"
    out = OutputFile(str(path))
    out.write(b"")  # an output that does not start at 0 for the writer is not vmcap's case
    writer = SeekableWriter(out, threads=threads, frame_bytes=16 << 10)
    writer.write_head(HEAD)
    writer.write(DATA)
    writer.write_raw_frame(b"x")  # every frame before it is written
    out.write(b"half a frame")  # what a failed write leaves
    kept = writer.cut_to_written_frames()
    assert kept == len(HEAD) + len(DATA) + 1
    writer.rewrite_head(NEW_HEAD)
    writer.close()
    out.commit()
    assert _zelf(path) == NEW_HEAD + DATA + b"x"


class _Pipe:
    """A sink with write() alone, as a pipe: positions count from the first byte."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += data


def test_flattened_writer_rewrites_offset_zero_last(tmp_path):
    stream = _Pipe()
    flat = FlattenedWriter(stream)
    flat.pwrite(HEAD, 0)
    flat.pwrite(DATA, len(HEAD))
    flat.rewrite_head(NEW_HEAD[:100])
    flat.close()
    path = tmp_path / "x.flat"
    path.write_bytes(bytes(stream.data))
    fd = os.open(path, os.O_RDONLY)
    try:
        image = FlattenedFile(fd, "x.flat")
        assert image.pread(len(HEAD) + len(DATA), 0) == NEW_HEAD[:100] + HEAD[100:] + DATA
    finally:
        os.close(fd)
    assert not FlattenedWriter.can_shrink and KdumpFile.can_shrink


def test_kdump_file_on_an_output(tmp_path):
    path = tmp_path / "k"
    out = OutputFile(str(path))
    sink = KdumpFile(out)
    sink.pwrite(b"data", 4096, "page data")
    sink.rewrite_head(b"HEAD")
    sink.truncate(5000)
    assert out.position == 5000  # the output's size follows the sink's
    out.commit()
    assert path.read_bytes() == b"HEAD" + bytes(4092) + b"data" + bytes(5000 - 4100)


def test_kdump_file_errors_are_output_errors(tmp_path, monkeypatch):
    sink = KdumpFile(os.open(tmp_path / "k", os.O_WRONLY | os.O_CREAT))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputFull, match="writing kdump page data at offset 0x2000"):
        sink.pwrite(b"x", 0x2000, "page data")
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(OutputError, match="no progress"):
        sink.rewrite_head(b"x")


def test_kdump_writer_finishes_through_its_sink(tmp_path):
    """A KdumpWriter on an OutputFile: the header block comes last through rewrite_head,
    the output's position is the file's size, and the file reads back."""
    path = tmp_path / "k.kdump"
    out = OutputFile(str(path))
    calls = []

    class Watched(KdumpFile):
        def rewrite_head(self, head) -> None:
            calls.append(bytes(head[:8]))
            super().rewrite_head(head)

    writer = KdumpWriter(Watched(out), x86_64_info(), max_mapnr=64, threads=1)
    pages = np.frombuffer(os.urandom(4096 * 3), dtype=np.uint8)
    writer.write_pages(5, pages)
    stats = writer.close()
    assert calls == [b"KDUMP   "]
    assert out.position == stats.file_bytes
    out.commit()
    assert os.path.getsize(path) == stats.file_bytes
    with KdumpReader(str(path)) as reader:
        assert reader.read_page(6) == pages[4096:8192].tobytes()
