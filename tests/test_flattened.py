"""makedumpfile's flattened format (vmcap/formats/flattened.py): writer, in-place reader, reassembly;
makedumpfile -F / -R and crash as oracles."""

from __future__ import annotations

import filecmp
import io
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kdump import x86_64_info

from vmcap.describe import describe
from vmcap.errors import BadSource, CorruptOutput, OutputError
from vmcap.fileio.mmapio import FileSource
from vmcap.formats.flattened import FlattenedFile, FlattenedWriter, reassemble
from vmcap.formats.kdump import KdumpReader, KdumpWriter
from vmcap.save import SaveOptions, save
from vmcap.source.dump import ElfMemory, detect_container, kernel_log, open_dump
from vmcap.source.layout import read_layout
from vmcap.verify import verify

from conftest import have, spec

PAGE = 4096
REPO = Path(__file__).resolve().parents[1]
needs_makedumpfile = pytest.mark.skipif(not have("makedumpfile"), reason="makedumpfile is not installed")


class MemoryStream:
    """A write-only stream (what FlattenedWriter needs of an OutputFile)."""

    def __init__(self):
        self.buffer = io.BytesIO()

    def write(self, data) -> None:
        self.buffer.write(data)


def flatten(records) -> bytes:
    stream = MemoryStream()
    writer = FlattenedWriter(stream)
    for offset, data in records:
        writer.pwrite(data, offset)
    writer.close()
    return stream.buffer.getvalue()


def painted(records) -> bytes:
    """What makedumpfile -R makes of the records: each written at its offset, in order."""
    size = max((offset + len(data) for offset, data in records if data), default=0)
    image = bytearray(size)
    for offset, data in records:
        image[offset:offset + len(data)] = data
    return bytes(image)


def open_flat(path) -> FlattenedFile:
    return FlattenedFile(os.open(path, os.O_RDONLY), str(path))


def makedumpfile_R(stream: Path, out: Path) -> None:
    with open(stream, "rb") as f:
        result = subprocess.run(["makedumpfile", "-R", str(out)], stdin=f, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stream_layout_is_makedumpfiles():
    stream = flatten([(0x2000, b"abc")])
    assert stream[:16] == b"makedumpfile\0\0\0\0"
    assert struct.unpack(">qq", stream[16:32]) == (1, 1)  # TYPE_FLAT_HEADER, VERSION_FLAT_HEADER
    assert stream[32:4096] == bytes(4064)
    assert stream[4096:] == struct.pack(">qq", 0x2000, 3) + b"abc" + struct.pack(">qq", -1, -1)


def test_empty_writes_make_no_record_and_truncate_only_extends():
    # A record of size 0 would end makedumpfile -R's reading before the end record.
    stream = MemoryStream()
    writer = FlattenedWriter(stream)
    writer.pwrite(b"", 100)
    writer.pwrite(b"xy", 10)
    writer.truncate(5000)
    writer.truncate(5000)
    with pytest.raises(ValueError):
        writer.truncate(4000)
    writer.close()
    data = stream.buffer.getvalue()
    assert data[4096:] == (struct.pack(">qq", 10, 2) + b"xy" + struct.pack(">qq", 4999, 1) + b"\0"
                           + struct.pack(">qq", -1, -1))


record_lists = st.lists(
    st.tuples(st.integers(0, 6000), st.integers(1, 700), st.integers(1, 255)),
    min_size=0, max_size=25)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=record_lists, reads=st.lists(st.tuples(st.integers(0, 7000), st.integers(0, 900)), max_size=8))
def test_random_records_read_back_as_sequential_reassembly(tmp_path, specs, reads):
    records = [(offset, bytes([fill]) * size) for offset, size, fill in specs]
    records += [(offset + 3, bytes(range(size % 256))) for offset, size, _ in specs[:3]]
    records = [(offset, data) for offset, data in records if data]
    expected = painted(records)
    path = tmp_path / "random.flat"
    path.write_bytes(flatten(records))
    flat = open_flat(path)
    try:
        assert flat.size == len(expected)
        assert flat.pread(len(expected) + 10, 0) == expected
        for offset, length in reads:
            assert flat.pread(length, offset) == expected[offset:offset + length]
    finally:
        os.close(flat._fd)
    out = tmp_path / "random.R"
    if out.exists():
        out.unlink()
    with open(path, "rb") as stream:
        assert reassemble(stream, str(out)) == len(expected)
    assert out.read_bytes() == expected
    assert (out.stat().st_mode & 0o777) == 0o600


OVERLAPPING = [(8192, b"A" * 5000), (0, b"B" * 100), (9000, b"C" * 10), (50, b"D" * 8200),
               (20000, b"E" * 3), (8100, b"F" * 200), (0, b"G")]


@needs_makedumpfile
def test_overlapping_records_later_wins_as_makedumpfile_R_does(tmp_path):
    path = tmp_path / "overlap.flat"
    path.write_bytes(flatten(OVERLAPPING))
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    makedumpfile_R(path, theirs)
    with open(path, "rb") as stream:
        reassemble(stream, str(ours))
    assert theirs.read_bytes() == ours.read_bytes() == painted(OVERLAPPING)
    flat = open_flat(path)
    assert flat.pread(flat.size, 0) == painted(OVERLAPPING)
    os.close(flat._fd)


def _damaged_streams():
    good = flatten([(0, b"x" * 100), (4096, b"y" * 10)])
    end = struct.pack(">qq", -1, -1)
    return {
        "no end record": good[:-16],
        "cut inside a record": good[:4096 + 16 + 50],
        "record of size 0": good[:4096] + struct.pack(">qq", 0, 0) + end,
        "negative offset": good[:4096] + struct.pack(">qq", -5, 3) + b"abc" + end,
        "record past end of file": good[:4096] + struct.pack(">qq", 0, 1 << 40) + b"abc" + end,
        "header only": good[:4096],
        "header cut short": good[:1000],
    }


@pytest.mark.parametrize("name", list(_damaged_streams()))
def test_damaged_stream_is_corrupt_and_reassembly_leaves_nothing(tmp_path, name):
    path = tmp_path / "damaged.flat"
    path.write_bytes(_damaged_streams()[name])
    assert detect_container(str(path)) == "kdump-flat"
    with pytest.raises(CorruptOutput):
        KdumpReader(path)
    out = tmp_path / "out"
    with open(path, "rb") as stream, pytest.raises(CorruptOutput):
        reassemble(stream, str(out))
    assert not out.exists() and not Path(str(out) + ".part").exists()


def test_not_flattened_is_bad_source_and_output_rules_hold(tmp_path):
    path = tmp_path / "not.flat"
    path.write_bytes(b"makedumpfilf" + bytes(5000))
    assert detect_container(str(path)) == "unknown"
    with open(path, "rb") as stream, pytest.raises(BadSource):
        reassemble(stream, str(tmp_path / "out"))
    good = tmp_path / "good.flat"
    good.write_bytes(flatten([(0, b"x")]))
    with open(good, "rb") as stream, pytest.raises(OutputError):
        reassemble(stream, "-")
    (tmp_path / "exists").write_bytes(b"keep")
    with open(good, "rb") as stream, pytest.raises(OutputError, match="already exists"):
        reassemble(stream, str(tmp_path / "exists"))
    assert (tmp_path / "exists").read_bytes() == b"keep"


def test_flattened_kdump_writer_memory_is_bounded(tmp_path):
    """2^29 pfns (2 TiB) into a stream: memory stays a bitmap window, like the seekable writer."""

    class CountingStream:
        bytes = 0

        def write(self, data) -> None:
            self.bytes += len(memoryview(data))

    page = np.full(PAGE, 7, dtype=np.uint8).tobytes()
    sink = CountingStream()
    tracemalloc.start()
    try:
        flat = FlattenedWriter(sink)
        writer = KdumpWriter(flat, x86_64_info(), max_mapnr=1 << 29, max_pages_present=64)
        for pfn in range(0, 1 << 29, 1 << 23):
            writer.write_pages(pfn, page)
        stats = writer.close()
        flat.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    assert flat.file_bytes == stats.file_bytes


# -- vmcap save --format kdump-flat ----------------------------------------------

def assert_same_but_digests(plain, rebuilt):
    """Byte-identical but for the VMCAP note: a stream cannot be read back for
    the metadata digest, so a flattened output records its digests as unknown."""
    with KdumpReader(plain) as reader:
        notes_at, notes_len = reader.notes_offset, len(reader.notes)
    a, b = bytearray(plain.read_bytes()), bytearray(rebuilt.read_bytes())
    assert len(a) == len(b)
    assert b"META_XXH64=unknown" in b[notes_at:notes_at + notes_len]
    a[notes_at:notes_at + notes_len] = b[notes_at:notes_at + notes_len] = bytes(notes_len)
    assert a == b


@pytest.mark.parametrize("compress", ["zstd", "zlib", "lzo", "snappy", "none"])
def test_kdump_flat_reassembles_to_the_kdump_file_and_reads_in_place(make_vmcore, tmp_path, compress):
    src, _ = make_vmcore(spec())
    plain, flat = tmp_path / "plain.kdump", tmp_path / "out.flat"
    save(src, str(plain), SaveOptions(output_format="kdump", compress=compress))
    summary = save(src, str(flat), SaveOptions(output_format="kdump-flat", compress=compress))
    assert summary.bytes_written == flat.stat().st_size
    assert detect_container(str(flat)) == "kdump-flat"
    rebuilt = tmp_path / "rebuilt.kdump"
    with open(flat, "rb") as stream:
        reassemble(stream, str(rebuilt))
    assert_same_but_digests(plain, rebuilt)
    assert verify(str(rebuilt))["digest"] == "unknown"
    with KdumpReader(flat) as a, KdumpReader(plain) as b:
        assert a.flattened and not b.flattened
        assert a.file_bytes == b.file_bytes and a.header == b.header
        assert list(a.iter_dumped_runs()) == list(b.iter_dumped_runs())
        for first, count in a.iter_dumped_runs():
            assert a.pread_physical(first * PAGE, count * PAGE) == b.pread_physical(first * PAGE, count * PAGE)
    report = describe(str(flat))
    assert report["container"] == "kdump-flat" and report["kdump"]["compression"] == compress
    result = verify(str(flat), src)
    assert result["status"] == "ok" and result["container"] == "kdump-flat"


@needs_makedumpfile
def test_kdump_flat_to_a_pipe_is_what_makedumpfile_R_rebuilds(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    plain = tmp_path / "plain.kdump"
    save(src, str(plain), SaveOptions(output_format="kdump", compress="zlib"))
    rebuilt = tmp_path / "rebuilt.kdump"
    code = ("import sys; from vmcap.save import save, SaveOptions; "
            "save(sys.argv[1], '-', SaveOptions(output_format='kdump-flat', compress='zlib'))")
    producer = subprocess.Popen([sys.executable, "-c", code, src], stdout=subprocess.PIPE, cwd=REPO)
    consumer = subprocess.run(["makedumpfile", "-R", str(rebuilt)], stdin=producer.stdout,
                              capture_output=True, text=True, timeout=120)
    producer.stdout.close()
    assert producer.wait(timeout=60) == 0
    assert consumer.returncode == 0, consumer.stdout + consumer.stderr
    assert_same_but_digests(plain, rebuilt)


def test_reassemble_reads_a_pipe(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    flat, plain = tmp_path / "out.flat", tmp_path / "plain.kdump"
    save(src, str(flat), SaveOptions(output_format="kdump-flat", compress="snappy"))
    save(src, str(plain), SaveOptions(output_format="kdump", compress="snappy"))
    cat = subprocess.Popen(["cat", str(flat)], stdout=subprocess.PIPE)
    try:
        reassemble(cat.stdout, str(tmp_path / "rebuilt"))
    finally:
        cat.stdout.close()
        cat.wait(timeout=60)
    assert_same_but_digests(plain, tmp_path / "rebuilt")


# -- the real dump ---------------------------------------------------------------

@pytest.mark.slow
@needs_makedumpfile
def test_makedumpfile_and_crash_read_vmcap_flat_stream_of_the_real_dump(real_vmcore,
                                                                        real_vmcore_for_makedumpfile,
                                                                        tmp_path):
    flat = tmp_path / "real.flat"
    save(real_vmcore, str(flat), SaveOptions(output_format="kdump-flat", compress="lzo", dump_level=1))
    rebuilt = tmp_path / "real.kdump"
    makedumpfile_R(flat, rebuilt)
    theirs, ours = tmp_path / "source.txt", tmp_path / "rebuilt.txt"
    for source, out in ((real_vmcore_for_makedumpfile, theirs), (rebuilt, ours)):
        result = subprocess.run(["makedumpfile", "--dump-dmesg", str(source), str(out)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "sysrq triggered crash" in ours.read_text(errors="replace")
    assert ours.read_bytes() == theirs.read_bytes()
    if have("crash"):
        result = subprocess.run(["crash", "--osrelease", str(rebuilt)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "6.1.0-56-amd64", result.stderr
    # vmcap reads the kernel log from the stream in place.
    with open_dump(str(flat)) as dump:
        assert dump.container == "kdump-flat"
        texts = [record.text for record in kernel_log(dump)]
    assert b"Kernel panic - not syncing: sysrq triggered crash" in texts


@pytest.mark.slow
@needs_makedumpfile
def test_makedumpfile_F_stream_reassembles_identically_and_reads_as_the_source(
        real_vmcore_for_makedumpfile, tmp_path):
    source_path = str(real_vmcore_for_makedumpfile)
    flat = tmp_path / "mdf.flat"
    with open(flat, "wb") as out:
        result = subprocess.run(["makedumpfile", "-F", "-c", "-d", "1", source_path], stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs, ours = tmp_path / "theirs.kdump", tmp_path / "ours.kdump"
    makedumpfile_R(flat, theirs)
    with open(flat, "rb") as stream:
        reassemble(stream, str(ours))
    assert filecmp.cmp(theirs, ours, shallow=False)

    source = FileSource(source_path)
    try:
        view = ElfMemory(read_layout(source), source)
        with KdumpReader(flat) as reader:
            assert reader.flattened and reader.header.compression == "zlib"
            checked = 0
            for first, count in reader.iter_dumped_runs():
                for pfn in range(first, first + count, 13):
                    assert reader.read_page(pfn) == view.read(pfn * PAGE, PAGE), f"pfn {pfn:#x}"
                    checked += 1
            assert checked > 10000
    finally:
        source.close()
