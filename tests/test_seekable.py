"""The zstd seekable format: round trips, the real zstd CLI as oracle, damaged files, sparse output."""

from __future__ import annotations

import array
import functools
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcap.errors import CorruptOutput, OutputError
from vmcap.formats.seekable import DEFAULT_FRAME_BYTES, SeekableReader, SeekableStats, SeekableWriter, is_seekable_zstd

from conftest import temp_outputs

PAGE = 4096
SMALL_FRAME = 16 * PAGE  # small frames keep multi-frame tests fast
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"
needs_zstd_cli = pytest.mark.skipif(not os.path.exists(ZSTD), reason="zstd CLI not installed")

SEEK_TABLE_FOOTER_BYTES = 9


def dump_like(size: int, seed: int = 0) -> bytes:
    """Pages as a dump has them: mostly zero, some random, some repetitive text."""
    rng = random.Random(seed)
    pages = []
    for _ in range(-(-size // PAGE)):
        kind = rng.randrange(4)
        if kind < 2:
            pages.append(bytes(PAGE))
        elif kind == 2:
            pages.append(rng.randbytes(PAGE))
        else:
            pages.append((b"kernel: task %d scheduled\n" % rng.randrange(1000)) * (PAGE // 16))
    return b"".join(pages)[:size]


def compress(chunks, **writer_options) -> tuple[bytes, SeekableStats]:
    sink = io.BytesIO()
    writer = SeekableWriter(sink, **writer_options)
    for chunk in chunks:
        writer.write(chunk)
    stats = writer.close()
    return sink.getvalue(), stats


def save(tmp_path, compressed: bytes, name: str = "out.zst") -> str:
    path = tmp_path / name
    path.write_bytes(compressed)
    return str(path)


def read_all(path: str) -> bytes:
    with SeekableReader(path) as reader:
        return b"".join(plain for _frame, plain in reader.iter_frames())


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "size", [0, 1, SMALL_FRAME - 1, SMALL_FRAME, SMALL_FRAME + 1, 5 * SMALL_FRAME + 123]
)
def test_round_trip_sizes_around_frame_boundaries(tmp_path, size, threads):
    data = dump_like(size, seed=size)
    compressed, stats = compress([data], threads=threads, frame_bytes=SMALL_FRAME)
    path = save(tmp_path, compressed)
    with SeekableReader(path) as reader:
        assert reader.size == size
        assert reader.pread(0, size + 10) == data
        assert len(reader.frames) == -(-size // SMALL_FRAME)
        assert all(frame.decompressed_size == SMALL_FRAME for frame in reader.frames[:-1])
        assert all(0 < frame.decompressed_size <= SMALL_FRAME for frame in reader.frames)
    assert stats == SeekableStats(
        frames=len(reader.frames), uncompressed_bytes=size, compressed_bytes=len(compressed)
    )


@pytest.mark.parametrize("size", [DEFAULT_FRAME_BYTES - 1, DEFAULT_FRAME_BYTES + 1])
def test_round_trip_default_frame_size(tmp_path, size):
    data = dump_like(size, seed=7)
    compressed, stats = compress([data], threads=2)
    assert stats.frames == -(-size // DEFAULT_FRAME_BYTES)
    assert read_all(save(tmp_path, compressed)) == data


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_write_sizes_including_memoryview_slices(tmp_path, threads):
    data = dump_like(7 * SMALL_FRAME + 999, seed=3)
    rng = random.Random(threads)
    pieces = []
    position = 0
    while position < len(data):
        size = rng.choice([1, 7, PAGE, PAGE + 1, SMALL_FRAME - 3, SMALL_FRAME, 3 * SMALL_FRAME + 5])
        piece = data[position : position + size]
        wrap = rng.choice([bytes, bytearray, lambda b: memoryview(bytearray(b"xx" + b + b"yy"))[2:-2]])
        pieces.append(wrap(piece))
        position += size
    compressed, stats = compress(pieces, threads=threads, frame_bytes=SMALL_FRAME)
    assert stats.uncompressed_bytes == len(data)
    assert read_all(save(tmp_path, compressed)) == data


def test_write_accepts_views_with_wider_items(tmp_path):
    words = array.array("I", range(10_000))
    compressed, _ = compress([words, memoryview(words)[5:9]], threads=1, frame_bytes=SMALL_FRAME)
    assert read_all(save(tmp_path, compressed)) == words.tobytes() + words[5:9].tobytes()


@pytest.mark.parametrize("threads", [1, 2])
def test_caller_may_reuse_its_buffer_after_write(tmp_path, threads):
    # The copy layer hands out views of one mmap window and then moves the window.
    window = bytearray(3 * SMALL_FRAME)
    sink = io.BytesIO()
    expected = []
    with SeekableWriter(sink, threads=threads, frame_bytes=SMALL_FRAME) as writer:
        for fill in range(1, 9):
            window[:] = bytes([fill]) * len(window)
            writer.write(memoryview(window)[PAGE:])
            expected.append(bytes(window[PAGE:]))
    assert read_all(save(tmp_path, sink.getvalue())) == b"".join(expected)


def test_parallel_output_is_identical_whatever_the_pool_size():
    data = dump_like(9 * SMALL_FRAME + 17, seed=11)
    parallel, _ = compress([data], threads=2, frame_bytes=SMALL_FRAME)
    many, _ = compress([data], threads=4, frame_bytes=SMALL_FRAME)
    assert parallel == many


def test_streamed_frames_hold_what_pooled_frames_hold(tmp_path):
    """One thread streams each frame (no content size in its header, the seek table has it);
    the frames and their seek table entries cut the data where a pool's do, and zstd -d
    and the reader restore the same bytes."""
    data = dump_like(9 * SMALL_FRAME + 17, seed=11)
    single, _ = compress([data], threads=1, frame_bytes=SMALL_FRAME)
    parallel, _ = compress([data], threads=2, frame_bytes=SMALL_FRAME)
    assert single != parallel  # not the same bytes: the headers differ
    frames = []
    for name, blob in (("single.zst", single), ("parallel.zst", parallel)):
        with SeekableReader(save(tmp_path, blob, name)) as reader:
            frames.append(reader.frames)
    assert [(f.decompressed_size, f.checksum) for f in frames[0]] == \
        [(f.decompressed_size, f.checksum) for f in frames[1]]
    assert zstandard.frame_content_size(single) == -1
    assert zstandard.frame_content_size(parallel) == SMALL_FRAME
    assert read_all(save(tmp_path, single, "s.zst")) == data
    if shutil.which("zstd"):
        plain = subprocess.run(["zstd", "-dc", save(tmp_path, single, "z.zst")],
                               capture_output=True, check=True).stdout
        assert plain == data


def test_default_threads_follow_cpu_count(tmp_path):
    data = dump_like(3 * SMALL_FRAME + 1, seed=12)
    compressed, stats = compress([data], frame_bytes=SMALL_FRAME)
    assert stats.frames == 4
    assert read_all(save(tmp_path, compressed)) == data


def test_close_is_repeatable_and_leaves_sink_open():
    sink = io.BytesIO()
    writer = SeekableWriter(sink, threads=2, frame_bytes=SMALL_FRAME)
    writer.write(b"abc")
    first = writer.close()
    assert writer.close() == first
    assert not sink.closed
    with pytest.raises(ValueError):
        writer.write(b"more")


def frames_from_another_writer() -> tuple[bytes, bytes]:
    """A seekable file as other tools may write it: no content sizes, a skippable frame in between."""
    streaming = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True)
    first, second = b"first frame " * 100, b"second frame " * 50
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"notes"
    frames = [(streaming.compress(first), len(first)), (skippable, 0), (streaming.compress(second), len(second))]
    table = b"".join(struct.pack("<II", len(compressed), size) for compressed, size in frames)
    seek_frame = struct.pack("<II", 0x184D2A5E, len(table) + 9) + table + struct.pack("<IBI", 3, 0, 0x8F92EAB1)
    return b"".join(compressed for compressed, _ in frames) + seek_frame, first + second


def test_reader_accepts_frames_without_content_size_and_skippable_frames(tmp_path):
    compressed, data = frames_from_another_writer()
    path = save(tmp_path, compressed)
    with SeekableReader(path) as reader:
        assert [frame.decompressed_size for frame in reader.frames] == [1200, 0, 650]
        assert reader.pread(1190, 20) == data[1190:1210]
    assert read_all(path) == data


# --------------------------------------------------------------------------
# The real zstd CLI as oracle


@needs_zstd_cli
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [0, 1, 6 * SMALL_FRAME + 5])
def test_zstd_cli_decompresses_to_the_input(tmp_path, size, threads):
    data = dump_like(size, seed=size + threads)
    path = save(tmp_path, compress([data], threads=threads, frame_bytes=SMALL_FRAME)[0])
    result = subprocess.run([ZSTD, "-d", "-c", path], capture_output=True, check=True)
    assert result.stdout == data
    subprocess.run([ZSTD, "-t", "-q", path], check=True)


# --------------------------------------------------------------------------
# Random access


@functools.lru_cache(maxsize=None)
def sample_file() -> tuple[str, bytes]:
    """One multi-frame file with uneven frames (frame size not a page multiple), shared by property tests."""
    import tempfile

    data = dump_like(11 * 10_000 + 4321, seed=5)
    compressed, _ = compress([data], threads=2, frame_bytes=10_000)
    directory = tempfile.mkdtemp(prefix="vmcap-seekable-")
    path = os.path.join(directory, "sample.zst")
    with open(path, "wb") as out:
        out.write(compressed)
    return path, data


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, 130_000), length=st.integers(0, 40_000))
def test_pread_matches_original_for_any_range(offset, length):
    path, data = sample_file()
    with SeekableReader(path) as reader:
        assert reader.pread(offset, length) == data[offset : offset + length]


def test_sequential_small_reads_decompress_each_frame_once():
    path, data = sample_file()
    with SeekableReader(path) as reader:
        calls = []
        decompress = reader._decompress_frame
        reader._decompress_frame = lambda frame: calls.append(frame.index) or decompress(frame)
        pieces = [reader.pread(offset, 1000) for offset in range(0, reader.size, 1000)]
    assert b"".join(pieces) == data
    assert calls == list(range(len(reader.frames)))


def test_reader_leaves_a_passed_fd_open():
    path, data = sample_file()
    fd = os.open(path, os.O_RDONLY)
    try:
        with SeekableReader(fd) as reader:
            assert reader.pread(5, 10) == data[5:15]
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_frame_entries_describe_contiguous_frames():
    path, data = sample_file()
    with SeekableReader(path) as reader:
        frames = reader.frames
    assert [frame.index for frame in frames] == list(range(len(frames)))
    for previous, frame in zip(frames, frames[1:]):
        assert frame.compressed_offset == previous.compressed_offset + previous.compressed_size
        assert frame.decompressed_offset == previous.decompressed_offset + previous.decompressed_size
    assert frames[-1].decompressed_offset + frames[-1].decompressed_size == len(data)


# --------------------------------------------------------------------------
# Zeros


@pytest.mark.parametrize("threads", [1, 2])
def test_write_zeros_equals_writing_zero_bytes(threads):
    def build(write_zeros: bool) -> bytes:
        sink = io.BytesIO()
        with SeekableWriter(sink, threads=threads, frame_bytes=SMALL_FRAME) as writer:
            for n in (5, 3 * SMALL_FRAME + 11, 0, SMALL_FRAME - 16, 2 * SMALL_FRAME):
                writer.write(b"data")
                if write_zeros:
                    writer.write_zeros(n)
                else:
                    writer.write(bytes(n))
        return sink.getvalue()

    assert build(write_zeros=True) == build(write_zeros=False)


def test_write_zeros_of_many_frames_reads_back_as_zeros(tmp_path):
    sink = io.BytesIO()
    with SeekableWriter(sink, threads=2, frame_bytes=SMALL_FRAME) as writer:
        writer.write(b"\x01" * 10)
        writer.write_zeros(40 * SMALL_FRAME + 3)
        writer.write(b"\x02")
    with SeekableReader(save(tmp_path, sink.getvalue())) as reader:
        assert reader.size == 10 + 40 * SMALL_FRAME + 3 + 1
        assert reader.pread(0, reader.size) == b"\x01" * 10 + bytes(40 * SMALL_FRAME + 3) + b"\x02"


def test_write_zeros_does_not_allocate_the_whole_run():
    zero_bytes = 256 << 20
    sink = io.BytesIO()
    tracemalloc.start()
    try:
        writer = SeekableWriter(sink, threads=1)
        writer.write_zeros(zero_bytes)
        stats = writer.close()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.uncompressed_bytes == zero_bytes
    assert peak < 4 * DEFAULT_FRAME_BYTES


# --------------------------------------------------------------------------
# Write failures


class FailingSink:
    def __init__(self, fail_after: int):
        self.written = 0
        self.fail_after = fail_after

    def write(self, data) -> int:
        if self.written + len(data) > self.fail_after:
            raise OSError(28, "No space left on device")
        self.written += len(data)
        return len(data)


@pytest.mark.parametrize("threads", [1, 2])
def test_sink_failure_raises_output_error_and_stays_failed(threads):
    writer = SeekableWriter(FailingSink(fail_after=100), threads=threads, frame_bytes=SMALL_FRAME)
    with pytest.raises(OutputError, match="No space left on device"):
        for _ in range(20):
            writer.write(random.Random(1).randbytes(SMALL_FRAME))
        writer.close()
    with pytest.raises(OutputError):
        writer.write(b"x")
    with pytest.raises(OutputError):
        writer.close()


def test_raw_file_partial_writes_are_completed(tmp_path):
    data = dump_like(3 * SMALL_FRAME, seed=2)
    path = tmp_path / "raw.zst"
    with open(path, "wb", buffering=0) as raw:
        with SeekableWriter(raw, threads=1, frame_bytes=SMALL_FRAME) as writer:
            writer.write(data)
    assert read_all(str(path)) == data


def test_exception_inside_with_block_leaves_no_seek_table(tmp_path):
    sink = io.BytesIO()
    with pytest.raises(RuntimeError):
        with SeekableWriter(sink, threads=2, frame_bytes=SMALL_FRAME) as writer:
            writer.write(dump_like(3 * SMALL_FRAME))
            raise RuntimeError("source read failed")
    assert not is_seekable_zstd(save(tmp_path, sink.getvalue() + b"\0" * 32))


# --------------------------------------------------------------------------
# Damaged files: always CorruptOutput with a one-line message, never a raw exception


def assert_corrupt(path: str) -> CorruptOutput:
    with pytest.raises(CorruptOutput) as caught:
        read_all(path)
    assert "\n" not in str(caught.value)
    return caught.value


def small_sample() -> tuple[bytes, bytes]:
    data = dump_like(4 * SMALL_FRAME + 100, seed=9)
    return compress([data], threads=1, frame_bytes=SMALL_FRAME)[0], data


@pytest.mark.parametrize("keep", [0, 1, 8, 16, 17, 100, -1, -9, -17, -30])
def test_truncated_file_is_corrupt(tmp_path, keep):
    compressed, _ = small_sample()
    assert_corrupt(save(tmp_path, compressed[:keep]))


def test_flipped_byte_inside_a_frame_names_the_frame(tmp_path):
    compressed, _ = small_sample()
    path = save(tmp_path, compressed)
    with SeekableReader(path) as reader:
        frame = reader.frames[2]
    damaged = bytearray(compressed)
    damaged[frame.compressed_offset + frame.compressed_size // 2] ^= 0x55
    path = save(tmp_path, bytes(damaged), "damaged.zst")
    error = assert_corrupt(path)
    assert f"frame 2 at offset {frame.compressed_offset}" in str(error)
    with SeekableReader(path) as reader:
        assert reader.pread(0, 10) == small_sample()[1][:10]  # other frames stay readable
        with pytest.raises(CorruptOutput):
            reader.pread(frame.decompressed_offset, 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # Anywhere, or in the seek table at the end, where one byte covers a whole frame.
    position=st.one_of(st.integers(0, 10**9), st.integers(-60, -1)),
    mask=st.integers(1, 255),
)
def test_any_flipped_byte_is_detected_or_harmless(tmp_path, position, mask):
    compressed, data = small_sample()
    damaged = bytearray(compressed)
    damaged[position % len(damaged)] ^= mask
    path = save(tmp_path, bytes(damaged))
    try:
        restored = read_all(path)
    except CorruptOutput:
        return
    # Some header bits (e.g. a larger window size) do not change the content.
    assert restored == data


def test_bad_footer_magic_is_corrupt(tmp_path):
    compressed, _ = small_sample()
    error = assert_corrupt(save(tmp_path, compressed[:-1] + b"\x00"))
    assert "magic" in str(error)


def test_absurd_frame_count_is_corrupt(tmp_path):
    compressed, _ = small_sample()
    footer = struct.pack("<IBI", 0xFFFFFFFF, 0, 0x8F92EAB1)
    error = assert_corrupt(save(tmp_path, compressed[:-SEEK_TABLE_FOOTER_BYTES] + footer))
    assert "frames" in str(error)


def test_reserved_descriptor_bits_are_corrupt(tmp_path):
    compressed, _ = small_sample()
    damaged = bytearray(compressed)
    damaged[-5] = 0x04
    assert_corrupt(save(tmp_path, bytes(damaged)))


def test_huge_decompressed_size_in_seek_table_is_corrupt(tmp_path):
    # One frame claiming 2 GiB must be refused before anything is allocated.
    table = struct.pack("<II", 13, 0x80000000)
    seek_frame = struct.pack("<II", 0x184D2A5E, len(table) + 9) + table + struct.pack("<IBI", 1, 0, 0x8F92EAB1)
    assert_corrupt(save(tmp_path, b"\x28\xb5\x2f\xfd" + bytes(9) + seek_frame))


def test_seek_table_sizes_not_matching_file_is_corrupt(tmp_path):
    compressed, _ = small_sample()
    error = assert_corrupt(save(tmp_path, b"\0" + compressed))
    assert "add up" in str(error)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=200), with_magic=st.booleans())
def test_garbage_is_corrupt(tmp_path, garbage, with_magic):
    if with_magic:
        garbage += struct.pack("<I", 0x8F92EAB1)
    assert_corrupt(save(tmp_path, garbage))


@needs_zstd_cli
def test_plain_zstd_file_is_not_seekable(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(dump_like(50_000))
    subprocess.run([ZSTD, "-q", "-f", str(plain), "-o", str(tmp_path / "plain.zst")], check=True)
    assert not is_seekable_zstd(str(tmp_path / "plain.zst"))
    assert_corrupt(str(tmp_path / "plain.zst"))


# --------------------------------------------------------------------------
# is_seekable_zstd


def test_is_seekable_zstd_accepts_our_files(tmp_path):
    path = save(tmp_path, small_sample()[0])
    assert is_seekable_zstd(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert is_seekable_zstd(fd)
    finally:
        os.close(fd)
    assert is_seekable_zstd(save(tmp_path, compress([])[0], "empty.zst"))


@pytest.mark.parametrize("content", [b"", b"\x7fELF" + bytes(100), b"\x28\xb5\x2f\xfd", bytes(4096)])
def test_is_seekable_zstd_rejects_other_files(tmp_path, content):
    assert not is_seekable_zstd(save(tmp_path, content, "other"))


# --------------------------------------------------------------------------
# vmcap decompress (verify.decompress: the zelf frames through output.SparseSink)


@pytest.mark.parametrize("frame_bytes", [SMALL_FRAME, 10_000])
def test_decompress_is_sparse_and_identical(tmp_path, frame_bytes):
    from vmcap.verify import decompress

    data = bytes(64 * PAGE) + dump_like(40 * PAGE, seed=4) + bytes(100 * PAGE + 5)
    path = save(tmp_path, compress([data], threads=2, frame_bytes=frame_bytes)[0])
    out = tmp_path / "plain"
    assert decompress(str(path), str(out)) == len(data)
    assert out.read_bytes() == data
    allocated = os.stat(out).st_blocks * 512
    assert allocated < len(data) // 2


def test_decompress_to_a_pipe_writes_zeros_too(tmp_path):
    data = bytes(10 * PAGE) + dump_like(10 * PAGE, seed=8)
    path = save(tmp_path, compress([data], frame_bytes=SMALL_FRAME)[0])
    result = subprocess.run([sys.executable, "-m", "vmcap", "decompress", str(path), "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    assert result.stdout == data


def test_decompress_stops_at_a_corrupt_frame(tmp_path):
    from vmcap.verify import decompress

    compressed, _ = small_sample()
    damaged = bytearray(compressed)
    damaged[len(compressed) // 2] ^= 0xFF
    path = save(tmp_path, bytes(damaged))
    with pytest.raises(CorruptOutput):
        decompress(str(path), str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists() and not temp_outputs(tmp_path)


def test_decompress_write_failure_raises_output_error(tmp_path, monkeypatch):
    import errno

    from vmcap.verify import decompress

    path = save(tmp_path, small_sample()[0])

    def failing_write(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("vmcap.fileio.output.os.write", failing_write)
    with pytest.raises(OutputError):
        decompress(str(path), str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists() and not temp_outputs(tmp_path)


@pytest.mark.parametrize("size", [0, 1, 128 << 10, (128 << 10) + 1, 500_000])
def test_raw_frame_is_a_valid_zstd_frame_whose_size_depends_only_on_length(size):
    from vmcap.formats.seekable import raw_frame

    data = os.urandom(size)
    frame = raw_frame(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    assert len(raw_frame(bytes(size))) == len(frame)


def test_write_raw_frame_between_compressed_frames(tmp_path):
    path = tmp_path / "mixed.zst"
    head = b"H" * 1000
    with open(path, "wb") as f:
        writer = SeekableWriter(f, threads=2, frame_bytes=4096)
        writer.write_raw_frame(head)
        writer.write(b"A" * 10000)
        writer.write_raw_frame(b"middle")
        writer.write(b"B" * 5000)
        writer.close()
    expected = head + b"A" * 10000 + b"middle" + b"B" * 5000
    with SeekableReader(str(path)) as reader:
        assert reader.size == len(expected)
        assert reader.pread(0, reader.size) == expected
    if shutil.which("zstd"):
        out = subprocess.run(["zstd", "-d", "-c", str(path)], capture_output=True, check=True)
        assert out.stdout == expected
