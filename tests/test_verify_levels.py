"""`verify --source` at dump level 31, and sources whose PT_LOADs claim zero fill.

At levels with bits 2-16 a page missing from the dump may be an excluded
one, so verify classifies the source again (from the level the dump
records) and every other page must be there. The damage here is done the
way a writer bug would do it: the digests are recomputed afterwards, so
plain `verify` passes and only the comparison with the source can tell.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from test_verify_integrity import assert_reported, vmcap

from vmcap.fileio.mmapio import FileSource
from vmcap.formats.digest import PLACEHOLDER
from vmcap.formats.kdump import KdumpReader
from vmcap.source.layout import read_layout

from conftest import spec

VRAM, ROM = 0xFD000000, 0xFFFC0000
FORMATS = {"kdump-zstd": ["--format", "kdump", "--compress", "zstd"],
           "kdump-zlib": ["--format", "kdump", "--compress", "zlib"],
           "zelf": [], "elf": ["--format", "elf"]}
# disk_dump_header (64-bit): max_mapnr follows status, block_size, sub_hdr_size, bitmap_blocks.
HEADER_MAX_MAPNR = struct.calcsize("<8si" + "65s" * 6 + "6xqqIiiI")
SUB_MAX_MAPNR_64 = 96  # kdump_sub_header (lp64): the last of its 13 eight-byte fields


def save(source, out, *args) -> str:
    result = vmcap("save", "-q", *args, source, out)
    assert result.returncode == 0, result.stderr
    return str(out)


def mismatch(dump, source, address: int | None = None) -> str:
    """verify --source must fail with exit 7, one line naming ``address``."""
    result = vmcap("verify", "--source", source, dump)
    assert_reported(result, Path(dump).name, codes=(7,))
    if address is not None:
        assert f"physical address {address:#x}" in result.stderr, result.stderr
    return result.stderr


# --- recomputing digests after an edit (what a buggy writer would have recorded) ---------------


def _value_at(data: bytearray, key: str) -> int:
    return data.index(key.encode() + b"=") + len(key) + 1


def refresh_kdump_digests(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with KdumpReader(str(path)) as reader:
        descriptors = reader.descriptor_offset
    data_offset = int(data[_value_at(data, "DATA_OFFSET"):][:16], 16)
    for key, region in (("DESC_XXH64", data[descriptors:data_offset]),
                        ("DATA_XXH64", data[data_offset:])):
        at = _value_at(data, key)
        data[at:at + 16] = xxhash.xxh64_hexdigest(bytes(region)).encode()
    at = _value_at(data, "META_XXH64")
    data[at:at + 16] = PLACEHOLDER.encode()
    data[at:at + 16] = xxhash.xxh64_hexdigest(bytes(data[:descriptors])).encode()
    path.write_bytes(data)


def refresh_elf_digests(path: Path) -> None:
    data = bytearray(path.read_bytes())
    notes = read_layout(FileSource(str(path))).note_bytes
    notes_end = data.index(notes) + len(notes)
    at = _value_at(data, "DATA_XXH64")
    data[at:at + 16] = xxhash.xxh64_hexdigest(bytes(data[notes_end:])).encode()
    at = _value_at(data, "META_XXH64")
    data[at:at + 16] = PLACEHOLDER.encode()
    data[at:at + 16] = xxhash.xxh64_hexdigest(bytes(data[:notes_end])).encode()
    path.write_bytes(data)


# --- the real dump at -d 31 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def d31(real_vmcore, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("d31")
    return {name: save(real_vmcore, directory / name, "-d", "31", *args)
            for name, args in FORMATS.items()}


@pytest.mark.parametrize("name", list(FORMATS))
def test_d31_outputs_verify_with_their_source(d31, real_vmcore, name):
    result = vmcap("verify", "--json", "--source", real_vmcore, d31[name])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dump_level"] == 31
    assert report["excluded_bytes_not_compared"] > 256 << 20  # free pages, mostly
    assert report["compared_bytes"] > 64 << 20


def _edited_kdump(path: str, out: Path, edit) -> Path:
    data = bytearray(Path(path).read_bytes())
    with KdumpReader(path) as reader:
        edit(data, reader)
    out.write_bytes(data)
    refresh_kdump_digests(out)
    assert vmcap("verify", out).returncode == 0  # whole as a file: only --source can tell
    return out


def _second_bitmap(reader) -> int:
    bs = reader.page_size
    return (1 + reader.header.sub_header_blocks) * bs + reader.header.bitmap_blocks * bs // 2


def _nonzero_dumped_pfn(reader, skip: int = 200) -> int:
    """A dumped pfn whose page is not all zero, some way into the dump."""
    seen = 0
    for first, count in reader.iter_dumped_runs():
        for pfn in range(first, first + count):
            seen += 1
            if seen > skip and any(reader.read_page(pfn)):
                return pfn
    raise AssertionError("no non-zero dumped page")


@pytest.mark.parametrize("name", ["kdump-zstd", "kdump-zlib"])
def test_d31_kdump_missing_pages_are_mismatches(d31, real_vmcore, tmp_path, name):
    path = d31[name]

    def zero_second_bitmap(data, reader):
        start = _second_bitmap(reader)
        half = reader.header.bitmap_blocks * reader.page_size // 2
        data[start:start + half] = bytes(half)

    damaged = _edited_kdump(path, tmp_path / "zeroed", zero_second_bitmap)
    assert "is not in the dump" in mismatch(damaged, real_vmcore)

    # One page that should be there dropped, descriptor and all.
    with KdumpReader(path) as reader:
        lost = _nonzero_dumped_pfn(reader)

    def drop_one_page(data, reader):
        bit = _second_bitmap(reader) + lost // 8
        data[bit] &= ~(1 << lost % 8) & 0xFF
        index = sum(count for first, count in reader.iter_dumped_runs() if first + count <= lost)
        index += sum(max(0, lost - first) for first, count in reader.iter_dumped_runs()
                     if first < lost < first + count)
        at = reader.descriptor_offset + 24 * index
        end = reader.descriptor_offset + 24 * reader.page_counts()[1]
        data[at:end] = data[at + 24:end] + bytes(24)

    damaged = _edited_kdump(path, tmp_path / "dropped", drop_one_page)
    mismatch(damaged, real_vmcore, lost * 4096)

    # max_mapnr cut short, header and sub header: VRAM and ROM fall off.
    def cut_max_mapnr(data, reader):
        bs = reader.page_size
        assert reader.max_mapnr > ROM // bs
        struct.pack_into("<I", data, HEADER_MAX_MAPNR, VRAM // bs)
        struct.pack_into("<Q", data, bs + SUB_MAX_MAPNR_64, VRAM // bs)

    damaged = _edited_kdump(path, tmp_path / "cut", cut_max_mapnr)
    assert "not in the dump at all" in mismatch(damaged, real_vmcore, VRAM)


def test_d31_kdump_holding_an_excluded_page_is_a_mismatch(d31, real_vmcore, tmp_path):
    """An excluded page next to a dumped one takes its bit (and so its descriptor)."""
    path = d31["kdump-zstd"]
    with KdumpReader(path) as reader:
        runs = list(reader.iter_dumped_runs())
        # The pfn just before a run, when it is present (so excluded, not a hole).
        excluded = next(first - 1 for first, _ in runs if first and reader.is_present(first - 1))

    def swap(data, reader):
        base = _second_bitmap(reader)
        for pfn, on in ((excluded, True), (excluded + 1, False)):
            byte = base + pfn // 8
            data[byte] = data[byte] | 1 << pfn % 8 if on else data[byte] & ~(1 << pfn % 8) & 0xFF

    damaged = _edited_kdump(path, tmp_path / "swapped", swap)
    assert "excludes that page" in mismatch(damaged, real_vmcore, excluded * 4096)
    # Unfixed, the same bit makes the descriptor table run into the page data.
    def set_bit(data, reader):
        byte = _second_bitmap(reader) + excluded // 8
        data[byte] |= 1 << excluded % 8

    data = bytearray(Path(path).read_bytes())
    with KdumpReader(path) as reader:
        set_bit(data, reader)
    (tmp_path / "extra").write_bytes(data)
    assert_reported(vmcap("verify", "--source", real_vmcore, tmp_path / "extra"), "extra",
                    codes=(6, 7))


def test_d31_elf_without_a_pt_load_is_a_mismatch(d31, real_vmcore, tmp_path):
    path = tmp_path / "elf"
    shutil.copyfile(d31["elf"], path)
    layout = read_layout(FileSource(str(path)))
    vram = next(s for s in layout.segments if s.paddr == VRAM)
    data = bytearray(path.read_bytes())
    phdr = layout.e_phoff + 56 * (1 + vram.index)  # after the PT_NOTE
    assert struct.unpack_from("<IIQQQ", data, phdr)[4] == VRAM
    struct.pack_into("<I", data, phdr, 0)  # PT_NULL
    path.write_bytes(data)
    refresh_elf_digests(path)
    assert vmcap("verify", path).returncode == 0
    mismatch(path, real_vmcore, VRAM)


def test_d31_dumps_of_a_source_without_vram_and_rom_are_mismatches(real_vmcore, tmp_path):
    """The writers given a layout without the two high PT_LOADs (kdump: max_mapnr short)."""
    partial = tmp_path / "partial.elf"
    shutil.copyfile(real_vmcore, partial)
    partial.chmod(0o644)
    layout = read_layout(FileSource(str(partial)))
    with open(partial, "r+b") as f:
        for seg in layout.segments:
            if seg.paddr in (VRAM, ROM):
                f.seek(layout.e_phoff + 56 * (1 + seg.index))  # after the PT_NOTE
                assert struct.unpack("<I", f.read(4))[0] == 1
                f.seek(-4, os.SEEK_CUR)
                f.write(struct.pack("<I", 0))
    try:
        for name in ("kdump-zstd", "zelf"):
            dump = save(partial, tmp_path / name, "-d", "31", *FORMATS[name])
            assert vmcap("verify", dump).returncode == 0
            mismatch(dump, real_vmcore, VRAM)
    finally:
        partial.unlink()


# --- zero fill: p_memsz beyond p_filesz -------------------------------------------------------


def _with_memsz(path: str, index: int, memsz: int, out: Path) -> str:
    """A copy of a sample core whose PT_LOAD ``index`` claims ``memsz`` bytes."""
    data = bytearray(Path(path).read_bytes())
    layout = read_layout(FileSource(path))
    phdr = layout.e_phoff + 56 * (1 + index)  # phdr 0 is the PT_NOTE in samples
    assert struct.unpack_from("<I", data, phdr)[0] == 1
    struct.pack_into("<Q", data, phdr + 40, memsz)
    out.write_bytes(data)
    return str(out)


@pytest.fixture(scope="module")
def small_core(tmp_path_factory) -> str:
    from vmcap.sample import RamRange, build_vmcore

    path = tmp_path_factory.mktemp("zf") / "core"
    build_vmcore(str(path), spec([RamRange(0x1000, 0x9f000), RamRange(0x100000, 0x100000)],
                                 content="mixed"))
    return str(path)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_terabyte_of_zero_fill_is_saved_at_once_and_verified(small_core, tmp_path, name):
    huge = _with_memsz(small_core, 1, 1 << 40, tmp_path / "huge")
    out = tmp_path / name
    result = vmcap("save", "-q", "--json", *FORMATS[name], huge, out, timeout=30)
    assert result.returncode == 0, result.stderr
    assert os.stat(out).st_blocks * 512 < 64 << 20  # a 32 MiB 1st bitmap at most
    if name.startswith("kdump"):
        assert json.loads(result.stdout)["pages_excluded"]["zero_fill"] == (1 << 28) - 0x100
        with KdumpReader(str(out)) as reader:
            assert reader.page_counts() == ((1 << 28) + 0x9f, 0x9f + 0x100)
    else:
        from vmcap.source.dump import open_dump

        with open_dump(str(out)) as opened:
            seg = opened.layout.segments[1]
        assert (seg.filesz, seg.memsz) == (0x100000, 1 << 40)  # zero fill, not zeros
    verified = vmcap("verify", "--json", "--source", huge, out, timeout=30)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["zero_fill_bytes"] == (1 << 40) - 0x100000
    # Against the source without the claim, the dump has memory the source has not.
    assert "no segment of the source has" in mismatch(out, small_core, 0x200000)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_dump_that_drops_the_zero_fill_claim_is_a_mismatch(small_core, tmp_path, name):
    dump = save(small_core, tmp_path / name, *FORMATS[name])
    huge = _with_memsz(small_core, 1, 1 << 40, tmp_path / "huge")
    assert "zero fill of the source" in mismatch(dump, huge, 0x200000)
    # A smaller claim, not page aligned, too.
    more = _with_memsz(small_core, 1, 0x100000 + 0x1800, tmp_path / "more")
    mismatch(dump, more, 0x200000)


def test_zero_fill_past_the_kdump_limit_is_unsupported_at_once(small_core, tmp_path):
    huge = _with_memsz(small_core, 1, 1 << 46, tmp_path / "huge")
    result = vmcap("save", "-q", "--format", "kdump", huge, tmp_path / "out", timeout=30)
    assert_reported(result, "2**46 bytes of zero fill", codes=(8,))
    assert not (tmp_path / "out").exists()


def test_stored_zero_fill_must_be_zero(small_core, tmp_path):
    """A dump whose data lies where the source claims zero fill (filesz cut, memsz kept)."""
    dump = save(small_core, tmp_path / "dump", "--format", "elf")
    data = bytearray(Path(small_core).read_bytes())
    layout = read_layout(FileSource(small_core))
    phdr = layout.e_phoff + 56 * 2
    struct.pack_into("<Q", data, phdr + 32, 0x80000)  # p_filesz: the second half is zero fill
    (tmp_path / "cut").write_bytes(data)
    assert "is zero fill in the source" in mismatch(dump, str(tmp_path / "cut"))


def test_mark_present_after_staged_pages_keeps_their_bits(monkeypatch, tmp_path):
    """Staged pages set their bits when stored: a range in a later bitmap window must wait."""
    import numpy as np

    from vmcap.formats import kdump

    monkeypatch.setattr(kdump._StreamedBitmap, "WINDOW_BYTES", 64)  # 512 pfns a window
    info = kdump.KdumpHeaderInfo(machine="x86_64", elf_class=64, byte_order="little",
                                 page_size=4096, release="", nr_cpus=1, vmcoreinfo=b"", notes=b"")
    path = tmp_path / "out.kdump"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = kdump.KdumpWriter(fd, info, max_mapnr=4096, threads=1)
        batch = kdump.BATCH_BYTES // 4096
        writer.write_pages(0, np.full(batch * 4096, 7, dtype=np.uint8))  # stored at once
        writer.write_pages(batch, np.full(3 * 4096, 9, dtype=np.uint8))  # staged, not yet stored
        writer.mark_present(batch + 100, 2000)  # from the staged pages' window into later ones
        writer.close()
    finally:
        os.close(fd)
    with KdumpReader(str(path)) as reader:
        assert list(reader.iter_present_runs()) == [(0, batch + 3), (batch + 100, 2000)]
        assert list(reader.iter_dumped_runs()) == [(0, batch + 3)]
        assert reader.read_page(batch + 2) == bytes([9]) * 4096


def test_is_kdump_does_not_block_on_a_fifo(tmp_path):
    from vmcap.formats.kdump import is_kdump

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = f"from vmcap.formats.kdump import is_kdump; print(is_kdump({str(fifo)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=10, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert result.stdout.strip() == "False", result.stderr
    assert not is_kdump(tmp_path / "missing")
