"""kdump page codecs (vmcap/formats/pagecodecs.py): round trips, damaged data, and makedumpfile / crash / drgn
as oracles."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from test_kdump import RELEASE, descriptor_table, mixed_pages, write_kdump, x86_64_info

from vmcap.errors import CorruptOutput, Unsupported
from vmcap.fileio.mmapio import FileSource
from vmcap.formats.kdump import KdumpReader
from vmcap.formats.pagecodecs import PAGE_FLAG, PageDataError, PageDecoder, encode_pages, page_compressor
from vmcap.save import SaveOptions, save
from vmcap.source.dump import ElfMemory
from vmcap.source.layout import read_layout

from conftest import have

PAGE = 4096
COMPRESSED = ["zstd", "zlib", "lzo", "snappy"]


LZO_MODULES = ("lzo", "lzallright", "lzokay")  # in the order vmcap prefers them


def lzo_backends() -> list[str]:
    found = []
    for module in LZO_MODULES:
        try:
            __import__(module)
            found.append(module)
        except ImportError:
            pass
    return found


@pytest.fixture(params=lzo_backends())
def lzo_backend(request, monkeypatch):
    """Run a test with each installed LZO library (python-lzo, lzallright, lzokay: the first found)."""
    for preferred in LZO_MODULES[:LZO_MODULES.index(request.param)]:
        monkeypatch.setitem(sys.modules, preferred, None)  # import <preferred> -> ImportError
    return request.param


def decode_all(name: str, data: bytes, sizes: np.ndarray, flags: np.ndarray) -> np.ndarray:
    decoder = PageDecoder(PAGE)
    ends = np.cumsum(sizes)
    pages = [decoder.decode(int(flag), data[end - size:end])
             for flag, size, end in zip(flags.tolist(), sizes.tolist(), ends.tolist())]
    return np.frombuffer(b"".join(pages), dtype=np.uint8).reshape(-1, PAGE)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("name", COMPRESSED + ["none"])
def test_batch_round_trips_and_incompressible_pages_stay_raw(name, workers):
    pages = mixed_pages(64)
    rows = np.flatnonzero(pages.any(axis=1))  # the writer never stores zero pages' data
    compressor = page_compressor(name, None, workers)
    try:
        data, sizes, flags = encode_pages(compressor, PAGE_FLAG[name], pages, rows)
    finally:
        if compressor is not None:
            compressor.close()
    data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)  # "none": the pages themselves
    assert len(data) == sizes.sum()
    random_rows = rows % 4 == 1  # mixed_pages: every 4th page is random bytes
    assert (flags[random_rows] == 0).all() and (sizes[random_rows] == PAGE).all()
    if name != "none":
        assert (flags[~random_rows] == PAGE_FLAG[name]).all() and (sizes[~random_rows] < PAGE // 2).all()
    assert np.array_equal(decode_all(name, data, sizes, flags), pages[rows])


def test_lzo_backend_round_trip(lzo_backend):
    pages = mixed_pages(16, seed=3)
    rows = np.arange(16)
    compressor = page_compressor("lzo", None, 2)
    data, sizes, flags = encode_pages(compressor, PAGE_FLAG["lzo"], pages, rows)
    compressor.close()
    assert np.array_equal(decode_all("lzo", bytes(data), sizes, flags), pages)


@pytest.mark.skipif(not {"lzallright", "lzokay"} <= set(lzo_backends()),
                    reason="needs both lzallright and lzokay")
def test_lzo_libraries_read_each_others_pages():
    import lzallright
    import lzokay

    page = mixed_pages(4, seed=9)[2].tobytes()
    assert lzokay.decompress(lzallright.LZOCompressor().compress(page), PAGE) == page
    assert lzallright.LZOCompressor.decompress(lzokay.compress(page), output_size_hint=PAGE) == page


@pytest.mark.skipif(not {"lzo", "lzallright"} <= set(lzo_backends()), reason="needs python-lzo and lzallright")
def test_liblzo2_pages_are_read_by_the_other_lzo_library_and_compress_like_makedumpfile():
    import lzallright
    import lzo

    for page in mixed_pages(8, seed=5):
        unit = lzo.compress(page, 1, False)
        assert lzallright.LZOCompressor.decompress(unit, output_size_hint=PAGE) == page.tobytes()
    compressor = page_compressor("lzo", None, 1)
    pages = mixed_pages(8, seed=5)
    units = compressor.compress(pages, np.arange(8))
    assert [bytes(u) for u in units] == [lzo.compress(p, 1, False) for p in pages]  # lzo1x_1, as -l


def _damaged(name: str) -> list[bytes]:
    page = mixed_pages(4)[2]
    compressor = page_compressor(name, None, 1)
    try:
        unit = bytes(compressor.compress(page.reshape(1, PAGE), np.array([0]))[0])
        # A valid unit of two pages: decodes, but not to one page.
        other_size = bytes(compressor.compress(np.zeros((1, 2 * PAGE), np.uint8), np.array([0]))[0])
    finally:
        compressor.close()
    return [unit[:len(unit) // 2], b"\xff" * 40, other_size]


@pytest.mark.parametrize("name", COMPRESSED)
def test_damaged_or_wrong_size_page_data_is_page_data_error(name):
    decoder = PageDecoder(PAGE)
    for stored in _damaged(name):
        with pytest.raises(PageDataError):
            decoder.decode(PAGE_FLAG[name], stored)
    with pytest.raises(PageDataError, match="not 4096"):
        decoder.decode(0, bytes(100))
    with pytest.raises(PageDataError, match="unknown"):
        decoder.decode(0x40, bytes(100))


def test_missing_codec_library_is_unsupported_with_the_page_named(tmp_path, monkeypatch):
    path = tmp_path / "snappy.kdump"
    write_kdump(path, x86_64_info(), [(0, mixed_pages(8))], max_mapnr=16, compress="snappy")
    monkeypatch.setitem(sys.modules, "cramjam", None)
    with pytest.raises(Unsupported, match="cramjam"):
        page_compressor("snappy", None, 1)
    with KdumpReader(path) as reader:
        with pytest.raises(Unsupported, match=r"pfn 0x2 .*cramjam"):
            reader.read_page(2)


@pytest.mark.parametrize("name", ["lzo", "snappy"])
def test_kdump_round_trip_with_makedumpfile_flags(tmp_path, name):
    pages = mixed_pages(300, seed=1)
    path = tmp_path / f"{name}.kdump"
    stats = write_kdump(path, x86_64_info(), [(5, pages)], max_mapnr=400, compress=name, threads=2,
                        exclude_zero=True)
    flags = descriptor_table(path)["flags"]
    assert set(flags.tolist()) == {0, PAGE_FLAG[name]}
    assert stats.pages_stored_raw == int((flags == 0).sum())
    with KdumpReader(path) as reader:
        assert reader.header.compression == name
        assert reader.header.status == PAGE_FLAG[name]
        for i in range(300):
            page = reader.read_page(5 + i)
            assert page is None if not pages[i].any() else page == pages[i].tobytes()


def test_corrupt_lzo_page_in_a_kdump_is_corrupt_output_with_its_offset(tmp_path):
    path = tmp_path / "lzo.kdump"
    write_kdump(path, x86_64_info(), [(0, mixed_pages(8))], max_mapnr=8, compress="lzo",
                exclude_zero=True)
    table = descriptor_table(path)
    target = int(np.flatnonzero(table["flags"] == PAGE_FLAG["lzo"])[0])
    with open(path, "r+b") as f:
        f.seek(int(table["offset"][target]))
        f.write(b"\xff" * int(table["size"][target]))
    with KdumpReader(path) as reader:
        pfn = [p for p in range(8) if reader.is_dumped(p)][target]
        with pytest.raises(CorruptOutput, match=rf"pfn {pfn:#x} \(descriptor {target} at offset 0x"):
            reader.read_page(pfn)


@pytest.mark.skipif(not have("crash"), reason="crash is not installed")
@pytest.mark.parametrize("name", ["lzo", "snappy"])
def test_crash_reports_osrelease_of_lzo_and_snappy_files(tmp_path, name):
    path = tmp_path / f"crash.{name}.kdump"
    write_kdump(path, x86_64_info(), [(0x100, mixed_pages(64))], max_mapnr=0x200, compress=name)
    result = subprocess.run(["crash", "--osrelease", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == RELEASE


# -- the real dump --------------------------------------------------------------

@pytest.fixture(scope="session")
def real_kdumps(real_vmcore, tmp_path_factory):
    """{codec: vmcap kdump of the real dump at -d 1}, made once."""
    directory = tmp_path_factory.mktemp("codec-kdumps")
    made = {}
    for name in ("lzo", "snappy"):
        made[name] = str(directory / f"real.{name}.kdump")
        save(real_vmcore, made[name], SaveOptions(output_format="kdump", compress=name, dump_level=1))
    return made


def sampled_pfns(reader: KdumpReader, stride: int, limit: int | None = None):
    for first, count in reader.iter_dumped_runs():
        for pfn in range(first, first + count, stride):
            if limit is None or pfn < limit:
                yield pfn


@pytest.mark.slow
@pytest.mark.skipif(not have("makedumpfile"), reason="makedumpfile is not installed")
def test_makedumpfile_reads_the_kernel_log_from_vmcap_lzo_kdump(real_kdumps, real_vmcore_for_makedumpfile,
                                                                  tmp_path):
    theirs, ours = tmp_path / "source.txt", tmp_path / "lzo.txt"
    for source, out in ((real_vmcore_for_makedumpfile, theirs), (real_kdumps["lzo"], ours)):
        result = subprocess.run(["makedumpfile", "--dump-dmesg", str(source), str(out)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "sysrq triggered crash" in ours.read_text(errors="replace")
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.slow
def test_drgn_and_the_source_agree_with_vmcap_lzo_and_snappy_pages(real_kdumps, real_vmcore):
    drgn = pytest.importorskip("drgn")
    source = FileSource(real_vmcore)
    try:
        view = ElfMemory(read_layout(source), source)
        for name, path in real_kdumps.items():
            program = drgn.Program()
            program.set_core_dump(path)  # libkdumpfile: liblzo2 and libsnappy
            with KdumpReader(path) as reader:
                assert reader.header.compression == name
                checked = 0
                for pfn in sampled_pfns(reader, 61):
                    page = reader.read_page(pfn)
                    assert page == program.read(pfn * PAGE, PAGE, True), f"{name} pfn {pfn:#x}"
                    assert page == view.read(pfn * PAGE, PAGE), f"{name} pfn {pfn:#x}"
                    checked += 1
            assert checked > 2000
    finally:
        source.close()


@pytest.mark.slow
@pytest.mark.skipif(not have("crash"), reason="crash is not installed")
def test_crash_opens_vmcap_lzo_and_snappy_kdumps_of_the_real_dump(real_kdumps):
    for path in real_kdumps.values():
        result = subprocess.run(["crash", "--osrelease", path], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "6.1.0-56-amd64"


@pytest.mark.slow
def test_vmcap_reads_makedumpfile_lzo_kdump_as_the_source(real_vmcore_for_makedumpfile, tmp_path):
    if not have("makedumpfile"):
        pytest.skip("makedumpfile is not installed")
    features = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True).stdout
    if not re.search(r"^lzo\s+enabled", features, re.M):
        pytest.skip("makedumpfile built without lzo")
    out = tmp_path / "mdf.lzo.kdump"
    result = subprocess.run(["makedumpfile", "-l", "-d", "1", str(real_vmcore_for_makedumpfile), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    source = FileSource(str(real_vmcore_for_makedumpfile))
    try:
        view = ElfMemory(read_layout(source), source)
        with KdumpReader(out) as reader:
            assert reader.header.compression == "lzo"
            assert (descriptor_table(out)["flags"] == PAGE_FLAG["lzo"]).sum() > 10000
            checked = 0
            for pfn in sampled_pfns(reader, 13):
                assert reader.read_page(pfn) == view.read(pfn * PAGE, PAGE), f"pfn {pfn:#x}"
                checked += 1
            assert checked > 10000
    finally:
        source.close()
