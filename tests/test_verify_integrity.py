"""`vmcap verify` proves a dump whole: every corruption of a vmcap output is reported.

A corpus of small outputs in every format gets one byte flipped at many
offsets (every structural region plus a sample of data) and is cut short at
many points; plain `verify` must exit 6 (with --source, 6 or 7), print one
line and no traceback. Then the specific holes the issue named.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmcap.fileio.mmapio import FileSource
from vmcap.formats.kdump import KdumpReader
from vmcap.formats.seekable import SeekableReader
from vmcap.sample import build_vmcore
from vmcap.source.layout import read_layout

from conftest import have, spec

ROOT = Path(__file__).resolve().parents[1]
FORMATS = [("zelf", []), ("elf", ["--format", "elf"]), ("kdump-zstd", ["--format", "kdump", "--compress", "zstd"]),
           ("kdump-zlib", ["--format", "kdump", "--compress", "zlib"])]


def vmcap(*args, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("VMCAP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# Runs `vmcap verify` through the CLI's own entry point on each path given,
# in one interpreter (starting one per corrupted file would take minutes),
# and prints for each: exit code, then stderr, as a JSON line.
_BATCH_RUNNER = """
import contextlib, io, json, sys
from vmcap.commands import main
for path in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["verify", *([] if sys.argv[1] == "-" else ["--source", sys.argv[1]]), path],
                 prog_name="vmcap")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    print(json.dumps([code, err.getvalue()]), flush=True)
"""


def verify_many(paths, source=None) -> list[subprocess.CompletedProcess]:
    """`vmcap verify` on each path (in one subprocess), as CompletedProcess objects."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("VMCAP_DEBUG", None)
    run = subprocess.run([sys.executable, "-c", _BATCH_RUNNER, source or "-", *map(str, paths)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == len(paths)
    return [subprocess.CompletedProcess(["verify", p], code, "", err)
            for p, (code, err) in zip(paths, results)]


def assert_reported(result, what: str, codes=(6,)) -> None:
    assert result.returncode in codes, (f"{what}: exit {result.returncode}: {result.stdout[-300:]} "
                                        f"{result.stderr[-300:]}")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcap: error: "), f"{what}: {result.stderr!r}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


@pytest.fixture(scope="module")
def sample_source(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "vmcore"
    build_vmcore(str(path), spec(content="mixed"))
    return str(path)


def save(source, out, fmt_args, level) -> str:
    result = vmcap("save", "-q", *fmt_args, "-d", level, source, out)
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="module")
def outputs(sample_source, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("out")
    made = {}
    for name, args in FORMATS:
        for level in (0, 1):
            made[(name, level)] = save(sample_source, directory / f"{name}-d{level}", args, level)
    return made


def structural_offsets(path: str, name: str) -> list[int]:
    """Offsets of every structure of an output (a few bytes each) plus a data sample."""
    size = os.path.getsize(path)
    rng = np.random.default_rng(size)
    picks: set[int] = set(range(0, 64, 3)) | {size - 1, size - 4, size // 2}
    if name == "zelf":
        with SeekableReader(path) as reader:
            table_end = reader.frames[-1].compressed_offset + reader.frames[-1].compressed_size
            for frame in reader.frames:
                start = frame.compressed_offset
                picks |= {start, start + 4, start + 5, start + 8, start + 12, start + 13,
                          start + frame.compressed_size - 1, start + frame.compressed_size - 5}
                picks |= {int(x) for x in rng.integers(start, start + frame.compressed_size, 6)}
            picks |= set(range(table_end, size))  # every seek table byte
    elif name == "elf":
        layout = read_layout(FileSource(path))
        header_end = layout.e_phoff + 56 * (len(layout.segments) + 1)
        picks |= set(range(0, header_end, 5))
        notes_end = min(s.offset for s in layout.segments)
        picks |= {int(x) for x in rng.integers(header_end, notes_end, 40)}
        picks |= {int(x) for x in rng.integers(notes_end, size, 40)}
    else:
        with KdumpReader(path) as reader:
            bs = reader.page_size
            desc = reader.descriptor_offset
            dumped = reader.page_counts()[1]
        picks |= set(range(0, 0x1e0, 3))  # disk_dump_header
        picks |= set(range(bs, bs + 104, 2))  # sub header
        picks |= {int(x) for x in rng.integers(bs + 104, 2 * bs, 30)}  # notes
        picks |= {int(x) for x in rng.integers(2 * bs, desc, 30)}  # bitmaps
        picks |= {int(x) for x in rng.integers(desc, desc + 24 * dumped, 40)}  # descriptors
        picks |= {int(x) for x in rng.integers(desc + 24 * dumped, size, 40)}  # page data
    return sorted(p for p in picks if 0 <= p < size)


def flipped_copies(path: str, offsets, directory: Path) -> list[str]:
    data = Path(path).read_bytes()
    copies = []
    for offset in offsets:
        copy = directory / f"{Path(path).name}-flip-{offset:x}"
        damaged = bytearray(data)
        damaged[offset] ^= 0x5A
        copy.write_bytes(damaged)
        copies.append(str(copy))
    return copies


@pytest.mark.parametrize("name", [n for n, _ in FORMATS])
@pytest.mark.parametrize("level", [0, 1])
def test_every_flipped_byte_and_every_cut_is_reported(outputs, name, level, tmp_path):
    path = outputs[(name, level)]
    assert vmcap("verify", path).returncode == 0
    offsets = structural_offsets(path, name)
    copies = flipped_copies(path, offsets, tmp_path)
    size = os.path.getsize(path)
    for cut in sorted({1, 8, 64, 512, 4096, size // 3, size // 2, size - 4096, size - 13, size - 1}):
        if 0 < cut < size:
            short = tmp_path / f"cut-{cut:x}"
            shutil.copyfile(path, short)
            os.truncate(short, cut)
            copies.append(str(short))
    for copy, result in zip(copies, verify_many(copies)):
        assert_reported(result, f"{name} -d {level} {Path(copy).name}")
        os.unlink(copy)


def test_zstd_cli_restores_zelf_with_checksums(outputs, tmp_path):
    if not have("zstd"):
        pytest.skip("zstd is not installed")
    zelf, elf = outputs[("zelf", 0)], outputs[("elf", 0)]
    with SeekableReader(zelf) as reader:
        assert reader.has_checksums
    plain = tmp_path / "plain"
    subprocess.run(["zstd", "-q", "-d", zelf, "-o", str(plain)], check=True)
    restored = read_layout(FileSource(str(plain)))
    assert [(s.paddr, s.filesz) for s in restored.segments] == \
        [(s.paddr, s.filesz) for s in read_layout(FileSource(elf)).segments]
    assert vmcap("verify", "--source", str(plain), elf).returncode == 0


def test_files_without_checksums_or_digests_still_verify(outputs, tmp_path):
    """An older zelf: seek table without checksums (descriptor 0), header frame without one."""
    zelf = Path(outputs[("zelf", 0)]).read_bytes()
    with SeekableReader(outputs[("zelf", 0)]) as reader:
        frames = reader.frames
    parts, entries = [], []
    for frame in frames:
        body = zelf[frame.compressed_offset:frame.compressed_offset + frame.compressed_size]
        if body[4] == 0xE4:  # the raw header frame: drop its content checksum
            body = body[:4] + b"\xe0" + body[5:-4]
        parts.append(body)
        entries.append(struct.pack("<II", len(body), frame.decompressed_size))
    table = b"".join(entries) + struct.pack("<IBI", len(frames), 0, 0x8F92EAB1)
    old = tmp_path / "old.zelf"
    old.write_bytes(b"".join(parts) + struct.pack("<II", 0x184D2A5E, len(table)) + table)
    result = vmcap("verify", "--json", old)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digest"] == "none"
    # A plain ELF whose note has no digest lines (vmcap before digests).
    elf = bytearray(Path(outputs[("elf", 0)]).read_bytes())
    for key in (b"META_XXH64=", b"DATA_XXH64="):
        at = elf.index(key)
        end = elf.index(b"\n", at) + 1
        # Drop the line; the note keeps its size (NUL padding), the data does not move.
        note_end = elf.index(b"\0", at)
        elf[at:note_end] = elf[end:note_end] + bytes(end - at)
    old_elf = tmp_path / "old.elf"
    old_elf.write_bytes(bytes(elf))
    result = vmcap("verify", "--json", old_elf)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digest"] == "none"


def test_streamed_elf_says_its_digest_is_unknown(sample_source, tmp_path):
    out = tmp_path / "streamed.elf"
    with open(out, "wb") as f:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "vmcap", "save", "-q", "--format", "elf",
                                 sample_source, "-"], stdout=subprocess.PIPE, env=env, cwd=ROOT)
        shutil.copyfileobj(proc.stdout, f)
        assert proc.wait() == 0
    result = vmcap("verify", "--json", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digest"] == "unknown"


def _without_segment(source: str, index: int, out: Path) -> str:
    """A copy of the source whose PT_LOAD ``index`` became PT_NULL."""
    data = bytearray(Path(source).read_bytes())
    layout = read_layout(FileSource(source))
    phdr = layout.e_phoff + 56 * (1 + index)  # phdr 0 is the PT_NOTE in samples
    assert struct.unpack_from("<I", data, phdr)[0] == 1
    struct.pack_into("<I", data, phdr, 0)
    out.write_bytes(data)
    return str(out)


@pytest.mark.parametrize("name", ["zelf", "kdump-zstd"])
def test_dump_missing_a_segment_is_a_mismatch_with_source(sample_source, tmp_path, name):
    args = dict(FORMATS)[name]
    partial_source = _without_segment(sample_source, 1, tmp_path / "partial")
    dump = save(partial_source, tmp_path / "dump", args, 0)
    assert vmcap("verify", dump).returncode == 0  # whole, as a file
    assert_reported(vmcap("verify", "--source", sample_source, dump), name, codes=(7,))


def _kdump_copy(path: str, out: Path, edit) -> str:
    data = bytearray(Path(path).read_bytes())
    with KdumpReader(path) as reader:
        edit(data, reader)
    out.write_bytes(data)
    return str(out)


def test_kdump_structure_damage_is_corrupt_and_missing_pages_a_mismatch(outputs, sample_source,
                                                                        tmp_path):
    path = outputs[("kdump-zstd", 0)]

    def size_4097(data, reader):
        struct.pack_into("<I", data, reader.descriptor_offset + 24 * 3 + 8, 4097)

    def zero_second_bitmap(data, reader):
        bs = reader.page_size
        half = reader.header.bitmap_blocks * bs // 2
        start = (1 + reader.header.sub_header_blocks) * bs + half
        data[start:start + half] = bytes(half)

    def cut_max_mapnr(data, reader):
        struct.pack_into("<I", data, 0x1c8 + 16, reader.max_mapnr // 2)  # header max_mapnr

    for edit in (size_4097, zero_second_bitmap, cut_max_mapnr):
        damaged = _kdump_copy(path, tmp_path / edit.__name__, edit)
        assert_reported(vmcap("verify", damaged), edit.__name__)
        assert_reported(vmcap("verify", "--source", sample_source, damaged), edit.__name__,
                        codes=(6, 7))


# --- dump level 31: the real dump's outputs, with excluded runs, split PT_LOADs, bitmap gaps ----

# Flips one byte of PATH in place, runs `vmcap verify PATH`, restores the
# byte; for each offset prints exit code and stderr as a JSON line. In place:
# copying a 70 MB output once per offset would write gigabytes.
_IN_PLACE_RUNNER = """
import contextlib, io, json, os, sys
from vmcap.commands import main
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
for offset in map(int, sys.argv[2:]):
    byte = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([byte[0] ^ 0x5A]), offset)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["verify", path], prog_name="vmcap")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    os.pwrite(fd, byte, offset)
    print(json.dumps([offset, code, err.getvalue()]), flush=True)
"""

D31_FORMATS = [("zelf", []), ("elf", ["--format", "elf"]),
               ("kdump-zstd", ["--format", "kdump", "--compress", "zstd"])]


@pytest.fixture(scope="module")
def d31_outputs(real_vmcore, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("d31")
    return {name: save(real_vmcore, directory / name, args, 31) for name, args in D31_FORMATS}


@pytest.mark.parametrize("name", [n for n, _ in D31_FORMATS])
def test_every_structure_of_a_d31_output_is_checked(d31_outputs, name, tmp_path):
    path = d31_outputs[name]
    offsets = structural_offsets(path, name)
    # Every region keeps its share: a stride over the sorted picks, capped for time.
    offsets = offsets[::max(1, len(offsets) // 160)]
    work = tmp_path / name
    shutil.copyfile(path, work)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("VMCAP_DEBUG", None)
    run = subprocess.run([sys.executable, "-c", _IN_PLACE_RUNNER, str(work), *map(str, offsets)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == len(offsets)
    for offset, code, err in results:
        assert_reported(subprocess.CompletedProcess(["verify"], code, "", err),
                        f"{name} -d 31 flip at {offset:#x}")
    assert vmcap("verify", work).returncode == 0  # every byte restored
