"""`vmcap save`: every segment byte out, fractional pieces read once, clean failures."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys

import pytest

from vmcap.errors import OutputError, SourceIOError
from vmcap.fileio.mmapio import FileSource, MmapRefused, RecordingSource
from vmcap.formats.note import note_fields
from vmcap.plan.copyplan import BufferedPiece, MappedRange, plan_copy
from vmcap.sample import RamRange, expected_bytes
from vmcap.save import SaveOptions, save
from vmcap.source.dump import open_dump
from vmcap.source.layout import read_layout

from conftest import FRACTIONAL_RANGES, error_lines, have, small_tmpfs, spec, temp_outputs


def read_output(path):
    """(layout, view) of a vmcap output, compressed or plain."""
    dump = open_dump(path)
    return dump.layout, dump.physical


def assert_output_matches(out_path, sample_spec, src_layout):
    """Every segment's bytes in the output equal the RAM content the builder wrote."""
    layout, view = read_output(out_path)
    assert len(layout.segments) == len(src_layout.segments)
    for src, got in zip(src_layout.segments, layout.segments):
        assert (got.paddr, got.vaddr, got.filesz, got.memsz, got.flags) == \
            (src.paddr, src.vaddr, src.filesz, src.memsz, src.flags)
        # p_offset shares its offset within a page with p_paddr.
        assert (got.offset - got.paddr) % layout.page_size == 0
        if src.filesz:
            data = view.read_segment(got, src.paddr, src.filesz)
            assert data == expected_bytes(sample_spec, src.paddr, src.filesz), src
        if src.memsz > src.filesz:
            assert view.read_segment(got, src.paddr + src.filesz, src.memsz - src.filesz) \
                == bytes(src.memsz - src.filesz)
    # Every source note is kept, plus vmcap's.
    src_notes = [(n.name, n.type, n.desc) for n in src_layout.notes]
    out_notes = [(n.name, n.type, n.desc) for n in layout.notes]
    assert out_notes[:len(src_notes)] == src_notes
    assert out_notes[-1][0] == "VMCAP"
    return layout


FIXTURES = {
    "fractional": spec(),
    "packed saved core": spec(layout="packed"),
    "aligned offsets": spec(layout="aligned"),
    "64k pages": spec([RamRange(0x10000 + 0x100, 0x30000), RamRange(0x50000, 0x20000 + 0x80)],
                      page_size=65536, machine=183),
    "elf32 big endian": spec(elf_class=32, byte_order="big", machine=20),
    "filesz < memsz": spec([RamRange(0x100000, 0x5000, filesz=0x2800),
                            RamRange(0x200000, 0x3000, filesz=0)]),
    "mixed content": spec(content="mixed"),
    "10000 segments": spec([RamRange(0x1000 * (2 * i) + 0x100, 0x200) for i in range(10_000)]),
}


@pytest.mark.parametrize("fmt", ["zelf", "elf"])
@pytest.mark.parametrize("kind", list(FIXTURES))
def test_round_trip(make_vmcore, tmp_path, kind, fmt):
    sample_spec = FIXTURES[kind]
    src, _ = make_vmcore(sample_spec)
    out = str(tmp_path / f"out.{fmt}")
    summary = save(src, out, SaveOptions(output_format=fmt, threads=2, frame_bytes=1 << 20))
    with FileSource(src) as source:
        src_layout = read_layout(source)
    assert_output_matches(out, sample_spec, src_layout)
    assert summary.bytes_read == sum(s.filesz for s in src_layout.segments)
    assert not temp_outputs(tmp_path)


@pytest.mark.skipif(not have("zstd"), reason="zstd CLI not installed")
def test_zstd_cli_restores_what_vmcap_decompress_writes(make_vmcore, tmp_path):
    from vmcap.verify import decompress

    src, _ = make_vmcore(spec(content="mixed"))
    out = str(tmp_path / "out.zelf")
    save(src, out, SaveOptions(frame_bytes=1 << 20))
    by_zstd = tmp_path / "by-zstd.elf"
    subprocess.run(["zstd", "-d", "-q", out, "-o", str(by_zstd)], check=True)
    by_vmcap = tmp_path / "by-vmcap.elf"
    decompress(out, str(by_vmcap))
    assert by_zstd.read_bytes() == by_vmcap.read_bytes()
    # The plain file is a valid ELF core in its own right.
    with FileSource(str(by_zstd)) as plain:
        assert len(read_layout(plain).segments) == len(FRACTIONAL_RANGES)


def test_fractional_piece_read_once_never_mapped(make_vmcore, tmp_path):
    sample_spec = spec()
    src, info = make_vmcore(sample_spec)
    with FileSource(src) as plain:
        layout = read_layout(plain)
    plan = plan_copy(layout.segments, layout.page_size)
    assert len(plan.fractional_pages) == 4

    recorder = RecordingSource(FileSource(src))
    save(src, str(tmp_path / "out"), SaveOptions(), source=recorder)
    page = layout.page_size
    header_end = info.notes_offset + info.notes_size
    data_calls = [c for c in recorder.calls if c.offset >= header_end]

    # Each buffered piece read exactly once, by one pread of exactly its bytes.
    for step in plan.steps:
        if isinstance(step, BufferedPiece):
            hits = [c for c in data_calls if c.offset == step.offset]
            assert [(c.kind, c.length) for c in hits] == [("pread", step.length)], step
    # No file page holding a fractional page's bytes was ever mapped.
    fractional_file_pages = {p.offset - p.offset % page
                             for f in plan.fractional_pages for p in f.pieces}
    for call in data_calls:
        if call.kind == "map":
            mapped_pages = set(range(call.offset, call.offset + call.length, page))
            assert not mapped_pages & fractional_file_pages, call
    # No byte outside the segments' file data was read or mapped.
    for call in recorder.calls:
        for offset, length in info.non_ram_file_ranges:
            assert call.offset + call.length <= offset or offset + length <= call.offset, \
                (call, offset, length)
    # The mapped share is what the plan says.
    assert sum(c.length for c in data_calls if c.kind == "map") == plan.mapped_bytes
    mapped_steps = {(s.offset, s.length) for s in plan.steps if isinstance(s, MappedRange)}
    assert mapped_steps


class RefusingSource(FileSource):
    """A source whose every mmap is refused (a pipe-like device, a strict kernel)."""

    def map(self, offset, length):
        raise MmapRefused("Operation not supported")


def test_mmap_refused_falls_back_to_pread_with_identical_output(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec(content="mixed"))
    normal, fallback = str(tmp_path / "normal"), str(tmp_path / "fallback")
    first = save(src, normal, SaveOptions())
    second = save(src, fallback, SaveOptions(), source=RefusingSource(src))
    assert open(normal, "rb").read() == open(fallback, "rb").read()
    assert first.mmap_fallbacks == 0 and first.mapped_bytes > 0
    assert second.mmap_fallbacks > 0 and second.mapped_bytes == 0


class FaultySource(RefusingSource):
    """Reads of one file range fail with EIO, as a bad page of old memory would."""

    def __init__(self, path, bad_offset, bad_length):
        super().__init__(path)
        self.bad = (bad_offset, bad_offset + bad_length)

    def pread_into(self, buffer, offset):
        if offset < self.bad[1] and self.bad[0] < offset + len(buffer):
            raise SourceIOError(f"{self.name}: read error at file offset {offset:#x}: "
                                "Input/output error", offset=offset)
        super().pread_into(buffer, offset)


def _bad_page(info):
    seg = info.segments[1]  # 0x100000, whole pages
    return seg, seg.offset + 0x3000, 0x1000


def test_read_error_fails_cleanly_by_default(make_vmcore, tmp_path):
    src, info = make_vmcore(spec())
    seg, bad_offset, bad_length = _bad_page(info)
    out = str(tmp_path / "out")
    with pytest.raises(SourceIOError) as error:
        save(src, out, SaveOptions(), source=FaultySource(src, bad_offset, bad_length))
    assert f"{seg.paddr + 0x3000:#x}" in str(error.value)
    assert not os.path.exists(out) and not temp_outputs(tmp_path)


@pytest.mark.parametrize("fmt", ["zelf", "elf"])
def test_on_error_zero_records_the_range(make_vmcore, tmp_path, fmt):
    sample_spec = spec()
    src, info = make_vmcore(sample_spec)
    seg, bad_offset, bad_length = _bad_page(info)
    out = str(tmp_path / "out")
    summary = save(src, out, SaveOptions(output_format=fmt, on_error="zero"),
                   source=FaultySource(src, bad_offset, bad_length))
    bad_paddr = seg.paddr + 0x3000
    assert summary.error_ranges == ({"paddr": bad_paddr, "length": 0x1000,
                                     "reason": "Input/output error"},)
    layout, view = read_output(out)
    note = [n for n in layout.notes if n.name == "VMCAP"][0]
    recorded = note_fields(note.desc)
    assert recorded["ERROR_RANGES"] == "1"
    assert recorded["error_ranges"] == [{"paddr": bad_paddr, "length": 0x1000,
                                         "reason": "Input/output error"}]
    assert view.read(bad_paddr, 0x1000) == bytes(0x1000)
    # Everything around the bad page is intact.
    assert view.read(bad_paddr - 0x1000, 0x1000) == expected_bytes(sample_spec,
                                                                   bad_paddr - 0x1000, 0x1000)
    assert view.read(bad_paddr + 0x1000, 0x1000) == expected_bytes(sample_spec,
                                                                   bad_paddr + 0x1000, 0x1000)


@pytest.mark.parametrize("fmt", ["zelf", "elf"])
def test_disk_full_fails_cleanly(make_vmcore, tmp_path, monkeypatch, fmt):
    src, _ = make_vmcore(spec(content="mixed"))
    out = str(tmp_path / "out")
    real_write = os.write
    written = [0]

    def filling_write(fd, data):
        if written[0] > 200_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, data)
        written[0] += n
        return n

    monkeypatch.setattr("vmcap.fileio.output.os.write", filling_write)
    with pytest.raises(OutputError, match="No space left on device") as error:
        save(src, out, SaveOptions(output_format=fmt, threads=1, frame_bytes=64 << 10))
    # Kept as a flagged incomplete dump when its metadata could be written
    # (the plain ELF's, in place; here every later write() fails, so not the
    # zelf seek table): tests/test_incomplete.py. Never a temporary file.
    assert os.path.exists(out) == ("INCOMPLETE" in str(error.value)) == (fmt == "elf")
    assert not temp_outputs(tmp_path)


def test_existing_output_is_not_overwritten_without_force(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec())
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        save(src, str(out), SaveOptions())
    assert out.read_bytes() == b"precious"
    save(src, str(out), SaveOptions(force=True))
    assert out.read_bytes() != b"precious"


@pytest.mark.parametrize("fmt", ["zelf", "elf"])
def test_mapped_bytes_pass_through_a_userspace_buffer(make_vmcore, tmp_path, monkeypatch, fmt):
    """9p in a capture kernel: write() straight from a /proc/vmcore mapping gives EFAULT."""
    src, _ = make_vmcore(spec())
    real_write = os.write
    owners = set()

    def checking_write(fd, data):
        owner = memoryview(data).obj
        owners.add(type(owner).__name__)
        if isinstance(owner, mmap.mmap):
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return real_write(fd, data)

    monkeypatch.setattr("vmcap.fileio.output.os.write", checking_write)
    summary = save(src, str(tmp_path / "out"), SaveOptions(output_format=fmt))
    assert summary.mapped_bytes > 0
    assert "mmap" not in owners


def test_stdout_stream_round_trip(make_vmcore, tmp_path):
    sample_spec = spec(content="mixed")
    src, _ = make_vmcore(sample_spec)
    out = tmp_path / "streamed.zelf"
    with open(out, "wb") as stdout:
        # A pipe, as in `vmcap save /proc/vmcore - | ssh host 'cat > dump'`.
        producer = subprocess.Popen([sys.executable, "-m", "vmcap", "save", "--quiet", src, "-"],
                                    stdout=subprocess.PIPE)
        consumer = subprocess.run(["cat"], stdin=producer.stdout, stdout=stdout)
        producer.stdout.close()
        assert producer.wait() == 0 and consumer.returncode == 0
    with FileSource(src) as source:
        assert_output_matches(str(out), sample_spec, read_layout(source))


def test_real_dump_round_trip(real_vmcore, tmp_path):
    from vmcap.verify import verify

    out = str(tmp_path / "real.zelf")
    summary = save(real_vmcore, out, SaveOptions())
    assert summary.bytes_read == 553779200
    result = verify(out, real_vmcore)
    assert result["compared_bytes"] == 553779200 and result["status"] == "ok"
    layout, _ = read_output(out)
    assert layout.e_phoff == 64 and layout.osrelease == "6.1.0-56-amd64"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs: a real full disk. Needs root (CI and the capture kernel have it)."""
    with small_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("fmt", ["zelf", "elf", "kdump"])
def test_real_full_disk_fails_cleanly(make_vmcore, tiny_filesystem, fmt):
    src, _ = make_vmcore(spec([RamRange(0x100000, 8 << 20)], content="mixed"))
    out = tiny_filesystem / "out"
    result = subprocess.run([sys.executable, "-m", "vmcap", "save", "--format", fmt, src,
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 5, result.stderr
    assert "No space left on device" in result.stderr and len(error_lines(result.stderr)) == 1
    # An incomplete dump is kept as OUT when it holds memory; never a temporary file.
    kept = [p.name for p in tiny_filesystem.iterdir()]
    assert kept == (["out"] if "INCOMPLETE" in result.stderr else [])


def test_truncated_zelf_is_a_clear_error(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec(content="mixed"))
    out = tmp_path / "out.zelf"
    save(src, str(out), SaveOptions(frame_bytes=1 << 20))
    cut = tmp_path / "cut.zelf"
    cut.write_bytes(out.read_bytes()[:out.stat().st_size // 2])
    for command in (["inspect"], ["verify"], ["dmesg"]):
        result = subprocess.run([sys.executable, "-m", "vmcap", *command, str(cut)],
                                capture_output=True, text=True)
        # verify judges a vmcap output: a damaged one is corrupt (6), not a bad source.
        assert result.returncode == (6 if command == ["verify"] else 3), (command, result.stderr)
        assert "without a seek table" in result.stderr and len(error_lines(result.stderr)) == 1


def test_elf32_output_past_4_gib_is_refused(make_vmcore):
    from vmcap.errors import Unsupported
    from vmcap.formats.elfwriter import OutputSegment, plan_elf_image

    src, _ = make_vmcore(spec(elf_class=32, byte_order="big", machine=20))
    with FileSource(src) as source:
        layout = read_layout(source)
    # Overlapping PT_LOADs are each written whole: 3 x 2 GiB of data.
    big = [OutputSegment(0, 0, 0, 0x80000000, 0x80000000, 7)] * 3
    with pytest.raises(Unsupported, match="use --format kdump"):
        plan_elf_image(layout, big, 64, 4096)
    plan_elf_image(layout, big[:1], 64, 4096)  # 2 GiB is fine
