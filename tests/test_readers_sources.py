"""Every dump vmcap reads is a `save` source: vmcores built by the fixtures, no outside tools.

The kdump files here are vmcap's own (and edited copies: older header
versions, the incomplete flag, QEMU's 64 KiB arm64 block size); the
flattened streams are written in makedumpfile's record order (header and
bitmaps first) and compressed whole with gzip, xz, zstd and lz4, as Debian's
kdump-tools leaves them. Damaged sources must give one line and a
documented exit code.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kdump import VMCOREINFO, mixed_pages, write_kdump, x86_64_info

from vmcap.describe import describe
from vmcap.errors import Unsupported
from vmcap.formats.flattened import FlattenedWriter
from vmcap.formats.kdump import DUMP_DH_COMPRESSED_INCOMPLETE, KdumpReader
from vmcap.save import SaveOptions, save
from vmcap.source.dump import open_dump
from vmcap.source.elfview import view_segments
from vmcap.verify import verify

from conftest import env_without_debug, spec

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["zelf", "elf", "kdump", "kdump-flat"]
HEADER_VERSION_OFFSET = 8
STATUS_OFFSET = 464 - 10 * 4  # disk_dump_header.status, 64-bit layout


def vmcap(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT,
                          env=env_without_debug(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess, codes) -> str:
    assert result.returncode in codes, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vmcap: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def physical(path, ranges) -> bytes:
    with open_dump(str(path)) as dump:
        return b"".join(dump.physical.read(paddr, length) for paddr, length in ranges)


@pytest.fixture
def source_vmcore(make_vmcore):
    path, info = make_vmcore(spec(content="mixed"))
    return path, info


@pytest.fixture
def kdump_of(tmp_path, source_vmcore):
    def make(compress="zlib", dump_level=0, name=None):
        out = tmp_path / (name or f"src-{compress}-{dump_level}.kdump")
        save(source_vmcore[0], str(out), SaveOptions(output_format="kdump", compress=compress,
                                                     dump_level=dump_level))
        return out
    return make


# -- the ELF view ---------------------------------------------------------------

def test_view_segments_put_undumped_pages_in_the_zero_fill_of_the_run_before():
    present = [(0, 10), (20, 5)]
    dumped = [(2, 3), (6, 1), (22, 1)]
    segments = [(s.paddr // 4096, s.filesz // 4096, s.memsz // 4096)
                for s in view_segments(present, dumped, 4096)]
    assert segments == [(0, 0, 2), (2, 3, 4), (6, 1, 4), (20, 0, 2), (22, 1, 3)]


@pytest.mark.parametrize("compress", ["zstd", "zlib", "lzo", "snappy", "none"])
@pytest.mark.parametrize("output_format", FORMATS)
def test_a_kdump_file_converts_to_every_format_with_every_byte(
        tmp_path, source_vmcore, kdump_of, compress, output_format):
    source = kdump_of(compress)
    out = tmp_path / f"out.{output_format}"
    save(str(source), str(out), SaveOptions(output_format=output_format))
    assert verify(str(out), str(source))["status"] == "ok"
    if output_format.startswith("kdump"):
        # Whole pages both: the original's fractional pages are covered whole.
        assert verify(str(out), source_vmcore[0])["status"] == "ok"
    ranges = [(s.paddr, s.filesz) for s in source_vmcore[1].segments]
    assert physical(out, ranges) == physical(source_vmcore[0], ranges)


def test_refiltering_a_level_1_kdump_at_31_without_struct_pages_keeps_level_1_content(
        tmp_path, source_vmcore, kdump_of):
    # The sample has no mem_map description: the kernel classes cannot be
    # known, so save falls back (with a warning), and the zero pages the
    # source left out stay out.
    source = kdump_of("zstd", 1)
    out = tmp_path / "out.zelf"
    summary = save(str(source), str(out), SaveOptions(dump_level=31))
    assert summary.dump_level == 1
    assert any("saved at dump level 1 instead" in w for w in summary.warnings)
    assert verify(str(out), str(source))["status"] == "ok"


def test_a_lower_level_is_refused_and_the_default_inherits_the_source_level(tmp_path, kdump_of):
    source = kdump_of("zlib", 1)
    with pytest.raises(Unsupported, match="saved at dump level 1"):
        save(str(source), str(tmp_path / "x.zelf"), SaveOptions(dump_level=0))
    assert not list(tmp_path.glob("x.zelf*"))
    line = one_error_line(vmcap("save", "-d", "0", source, tmp_path / "y.zelf"), {8})
    assert "-d 1" in line
    result = vmcap("save", "-q", source, tmp_path / "z.zelf")
    assert result.returncode == 0, result.stderr
    assert verify(str(tmp_path / "z.zelf"))["status"] == "ok"


def test_zelf_source_replaces_the_vmcap_note_instead_of_adding_one(tmp_path, source_vmcore):
    first, second = tmp_path / "a.zelf", tmp_path / "b.elf"
    save(source_vmcore[0], str(first), SaveOptions())
    save(str(first), str(second), SaveOptions(output_format="elf"))
    notes = [n["name"] for n in describe(str(second))["notes"]]
    assert notes.count("VMCAP") == 1
    result = verify(str(second), source_vmcore[0])
    assert result["status"] == "ok" and result["digest"] == "xxh64"


def test_elf_source_saved_with_zero_pages_dropped_gives_a_kdump_that_says_so(
        tmp_path, source_vmcore):
    # vmcap's ELF at -d 1 has no zero pages left: a kdump made from it must
    # not claim ZERO_PAGES=shared (verify --source would then miss them).
    elf, out = tmp_path / "a.elf", tmp_path / "b.kdump"
    save(source_vmcore[0], str(elf), SaveOptions(output_format="elf", dump_level=1))
    save(str(elf), str(out), SaveOptions(output_format="kdump", dump_level=1))
    assert describe(str(out))["vmcap"]["ZERO_PAGES"] == "exclude"
    assert verify(str(out), source_vmcore[0])["status"] == "ok"


# -- kdump header variants --------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
def test_every_header_version_is_read_and_converted(tmp_path, source_vmcore, kdump_of, version):
    source = kdump_of("zlib")
    data = bytearray(source.read_bytes())
    struct.pack_into("<i", data, HEADER_VERSION_OFFSET, version)
    old = tmp_path / f"v{version}.kdump"
    old.write_bytes(bytes(data))
    report = describe(str(old))
    assert report["kdump"]["header_version"] == version
    # VMCOREINFO is in the sub header from version 3, the notes from 4.
    assert bool(report["vmcoreinfo"]) == (version >= 3)
    out = tmp_path / f"v{version}.zelf"
    save(str(old), str(out), SaveOptions(page_size=4096))
    assert verify(str(out), str(source))["status"] == "ok"


def test_incomplete_flagged_kdump_is_described_refused_by_verify_and_still_a_source(
        tmp_path, source_vmcore, kdump_of):
    source = kdump_of("zlib")
    data = bytearray(source.read_bytes())
    (status,) = struct.unpack_from("<I", data, STATUS_OFFSET)
    struct.pack_into("<I", data, STATUS_OFFSET, status | DUMP_DH_COMPRESSED_INCOMPLETE)
    flagged = tmp_path / "incomplete.kdump"
    flagged.write_bytes(bytes(data))
    assert "incomplete" in describe(str(flagged))
    assert "incomplete" in one_error_line(vmcap("verify", flagged), {6})
    out = tmp_path / "out.elf"
    save(str(flagged), str(out), SaveOptions(output_format="elf"))
    assert verify(str(out), str(source))["status"] == "ok"


def test_qemu_arm64_style_64k_blocks_of_a_4k_page_kernel(tmp_path):
    # QEMU's dump-guest-memory stores arm64 memory in 64 KiB blocks whatever
    # the kernel's page size; VMCOREINFO says 4096.
    block = 64 << 10
    pages = mixed_pages(12, page_size=block)
    path = tmp_path / "qemu-arm64.kdump"
    write_kdump(path, x86_64_info(page_size=block), [(2, pages[:4]), (10, pages[4:])],
                max_mapnr=32, compress="zlib")
    assert b"PAGESIZE=4096" in VMCOREINFO
    with open_dump(str(path)) as dump:
        assert dump.page_size == 4096
        assert dump.ram_pfn_ranges == [(32, 96), (160, 288)]
        assert dump.max_pfn == 32 * 16
        assert dump.physical.read(10 * block + 4096, 8192) == pages[4].tobytes()[4096:12288]
    out = tmp_path / "out.kdump"
    save(str(path), str(out), SaveOptions(output_format="kdump"))
    with KdumpReader(str(out)) as converted:
        assert converted.page_size == 4096
        assert (converted.pread_physical(10 * block, 8 * block)
                == pages[4:].tobytes())


# -- compressed flattened streams ---------------------------------------------------

def makedumpfile_order_stream(kdump: Path, out: Path, record_bytes: int = 48 << 10) -> None:
    """The kdump file as a flattened stream in file order, as makedumpfile -F writes:
    header and bitmaps first, then descriptors and page data, in records."""
    data = kdump.read_bytes()
    with open(out, "wb") as stream:
        class Out:
            position = 0

            def write(self, chunk):
                stream.write(chunk)
                Out.position += len(chunk)

        writer = FlattenedWriter(Out())
        for at in range(0, len(data), record_bytes):
            chunk = data[at:at + record_bytes]
            if any(chunk):
                writer.pwrite(chunk, at)
        writer.truncate(len(data))
        writer.close()


def lz4_frame():
    return pytest.importorskip("lz4.frame")


WRAP = {
    "gzip": lambda data: gzip.compress(data, 1),
    "xz": lambda data: lzma.compress(data, preset=0),
    "zstd": lambda data: zstandard.ZstdCompressor(level=1).compress(data),
    "lz4": lambda data: lz4_frame().compress(data),
}


@pytest.fixture
def wrapped_stream(tmp_path, kdump_of):
    def make(wrapper: str, compress="zlib", dump_level=1):
        flat = tmp_path / "stream.flat"
        makedumpfile_order_stream(kdump_of(compress, dump_level), flat)
        out = tmp_path / f"dump.20260101.{wrapper}"
        out.write_bytes(WRAP[wrapper](flat.read_bytes()))
        return out
    return make


@pytest.mark.parametrize("wrapper", sorted(WRAP))
@pytest.mark.parametrize("output_format", ["zelf", "kdump"])
def test_a_wrapped_flattened_stream_is_a_save_source_read_once(
        tmp_path, kdump_of, wrapped_stream, wrapper, output_format):
    source = wrapped_stream(wrapper)
    with open_dump(str(source), stream=True) as dump:
        assert dump.container == "kdump-stream"
        assert dump.dump_level == 1 and dump.elf.sequential
    out = tmp_path / f"out.{output_format}"
    summary = save(str(source), str(out), SaveOptions(output_format=output_format,
                                                      inherit_level=True))
    assert summary.dump_level == 1
    assert verify(str(out), str(kdump_of("zlib", 1, name="same.kdump")))["status"] == "ok"


def test_a_wrapped_stream_refuses_what_needs_a_second_pass(tmp_path, wrapped_stream):
    source = wrapped_stream("gzip")
    for args in (["-d", "31"], ["-d", "1,31"], ["--dmesg", tmp_path / "log"]):
        line = one_error_line(vmcap("save", *args, source, tmp_path / "out.zelf"), {8})
        assert "read once, in order" in line and "decompress it first" in line
    assert not list(tmp_path.glob("out.zelf*"))


def test_vmcap_kdump_flat_compressed_is_refused_with_the_way_out(tmp_path, source_vmcore):
    flat = tmp_path / "vmcap.flat"
    save(source_vmcore[0], str(flat), SaveOptions(output_format="kdump-flat"))
    wrapped = tmp_path / "vmcap.flat.gz"
    wrapped.write_bytes(gzip.compress(flat.read_bytes(), 1))
    line = one_error_line(vmcap("save", wrapped, tmp_path / "out.zelf"), {8})
    assert "header is not its first record" in line and "makedumpfile -R" in line


def test_a_wrapped_file_that_is_not_a_flattened_stream_is_a_bad_source(tmp_path, source_vmcore):
    wrapped = tmp_path / "vmcore.xz"
    wrapped.write_bytes(lzma.compress(b"not a dump\n" * 1000, preset=0))
    line = one_error_line(vmcap("save", wrapped, tmp_path / "out.zelf"), {3})
    assert "not a flattened kdump stream" in line


# -- damaged sources --------------------------------------------------------------------

@pytest.fixture(scope="module")
def damage_sources(tmp_path_factory):
    """A small kdump file and its gzip-wrapped stream, for damaging."""
    from vmcap.sample import build_vmcore

    where = tmp_path_factory.mktemp("damage")
    core = where / "core"
    build_vmcore(str(core), spec(content="mixed"))
    kdump = where / "src.kdump"
    save(str(core), str(kdump), SaveOptions(output_format="kdump", compress="zlib"))
    flat = where / "src.flat"
    makedumpfile_order_stream(kdump, flat)
    return {"kdump": kdump.read_bytes(), "gzip": gzip.compress(flat.read_bytes(), 1),
            "flat": flat.read_bytes()}


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["kdump", "gzip", "flat"]), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=4))
def test_damaged_sources_give_one_line_and_a_documented_code(tmp_path, damage_sources, kind, cut,
                                                             flips):
    data = bytearray(damage_sources[kind])
    for where, xor in flips:
        data[int(where * (len(data) - 1))] ^= xor
    data = data[:max(1, int(cut * len(data)))] if cut < 1.0 else data
    source = tmp_path / f"damaged.{kind}"
    source.write_bytes(bytes(data))
    out = tmp_path / "out.zelf"
    if out.exists():
        os.unlink(out)
    result = vmcap("save", "-q", "--force", source, out)
    if result.returncode:
        one_error_line(result, {3, 4, 6, 8})
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.zelf")]


@pytest.mark.parametrize("field, value", [("offset", 1 << 50), ("size", 1 << 40)])
def test_a_damaged_record_header_in_a_wrapped_stream_is_refused_in_bounded_memory(
        tmp_path, damage_sources, field, value):
    flat = bytearray(damage_sources["flat"])
    # The last record before the end marker: page data.
    at = 4096
    while True:
        offset, size = struct.unpack_from(">qq", flat, at)
        following = at + 16 + size
        if struct.unpack_from(">qq", flat, following) == (-1, -1):
            break
        at = following
    struct.pack_into(">q", flat, at + (0 if field == "offset" else 8), value)
    source = tmp_path / "damaged.gz"
    source.write_bytes(gzip.compress(bytes(flat), 1))
    result = vmcap("save", source, tmp_path / "out.zelf")
    one_error_line(result, {6, 8})
    assert "out of memory" not in result.stderr


def test_compressed_files_that_are_not_streams_say_what_they_are(tmp_path, source_vmcore,
                                                                 wrapped_stream):
    zelf = tmp_path / "a.zelf"
    save(source_vmcore[0], str(zelf), SaveOptions(frame_bytes=1 << 20))
    cut = tmp_path / "cut.zelf"
    cut.write_bytes(zelf.read_bytes()[:zelf.stat().st_size // 2])
    assert "without a seek table" in one_error_line(vmcap("save", cut, tmp_path / "o"), {3})
    packed = tmp_path / "vmcore.gz"
    packed.write_bytes(gzip.compress(Path(source_vmcore[0]).read_bytes(), 1))
    assert "ELF core compressed whole with gzip" in one_error_line(
        vmcap("save", packed, tmp_path / "o"), {3})
    stream = wrapped_stream("xz")
    for command in ("inspect", "dmesg"):
        assert "compressed whole with xz" in one_error_line(vmcap(command, stream), {3})
    assert not (tmp_path / "o").exists()
