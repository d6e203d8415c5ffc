"""kdump output, zero-page exclusion (-d 1) in every format, the kernel log."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcap.fileio.mmapio import FileSource
from vmcap.formats.elf import Segment
from vmcap.formats.kdump import KdumpReader
from vmcap.plan.copyplan import find_fractional_pages
from vmcap.plan.exclude import MIN_EXCLUDED_RUN, ExcludedRun, split_segments
from vmcap.sample import RamRange, expected_bytes
from vmcap.save import SaveOptions, save
from vmcap.source.layout import read_layout
from vmcap.verify import verify

from conftest import env_without_debug, error_lines, spec, temp_outputs

PAGE = 4096


def layout_of(path):
    with FileSource(path) as source:
        return read_layout(source)


# ------------------------------------------------------------- split_segments

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_split_segments_keep_every_byte_that_is_not_excluded(data):
    page = 16
    filesz = data.draw(st.integers(1, 40)) * page + data.draw(st.integers(0, page - 1))
    memsz = filesz + data.draw(st.sampled_from([0, 0, 5, 3 * page]))
    seg = Segment(0, 8 * page, 0xff00 + 8 * page, 3 * page, filesz, memsz)
    # Runs on the page grid inside the file data, sorted, not touching.
    cursor, runs = seg.paddr, []
    while True:
        gap = data.draw(st.integers(0, 6)) * page
        length = data.draw(st.integers(1, 8)) * page
        start = cursor + gap
        if start + length > seg.paddr + filesz or data.draw(st.booleans()):
            break
        runs.append(ExcludedRun(0, start, length))
        cursor = start + length + page
    pieces = split_segments([seg], runs)
    excluded = {a for r in runs for a in range(r.paddr, r.paddr + r.length)}
    in_file, in_memory = [], []
    for piece in pieces:
        assert piece.vaddr - piece.paddr == seg.vaddr - seg.paddr
        assert piece.offset - piece.paddr == seg.offset - seg.paddr or piece.filesz == 0
        in_file.extend(range(piece.paddr, piece.paddr + piece.filesz))
        in_memory.extend(range(piece.paddr, piece.paddr + piece.memsz))
    # Memory is covered exactly once; file data is everything but the runs.
    assert in_memory == list(range(seg.paddr, seg.paddr + seg.memsz))
    assert set(in_file) == set(range(seg.paddr, seg.paddr + filesz)) - excluded
    assert [p.index for p in pieces] == list(range(len(pieces)))


def test_short_zero_runs_are_written_long_runs_split_trailing_runs_zero_filled(make_vmcore,
                                                                                tmp_path):
    # 300 zero pages between data, 10 zero pages between data, zero tail.
    long_run = MIN_EXCLUDED_RUN + 44
    ranges = [RamRange(0x100000, (1 + long_run + 1 + 10 + 1 + 20) * PAGE)]
    sample_spec = spec(ranges, content="zero")
    src, info = make_vmcore(sample_spec)
    # Put data pages where the test wants them.
    with open(src, "r+b") as f:
        base = info.segments[0].offset
        for page_index in (0, 1 + long_run, 1 + long_run + 1 + 10):
            f.seek(base + page_index * PAGE)
            f.write(b"\x42" * PAGE)
    out = str(tmp_path / "out.elf")
    summary = save(src, out, SaveOptions(output_format="elf", dump_level=1))
    loads = [(s.paddr - 0x100000) // PAGE for s in layout_of(out).segments]
    files = [s.filesz // PAGE for s in layout_of(out).segments]
    mems = [s.memsz // PAGE for s in layout_of(out).segments]
    # First PT_LOAD: the data page + the long run as zero fill; second: the
    # data page, 10 zero pages written as they are, the data page, then the
    # 20-page zero tail as zero fill.
    assert loads == [0, 1 + long_run]
    assert files == [1, 12] and mems == [1 + long_run, 12 + 20]
    # The 10 zero pages written as they are count as kept in a short run.
    assert summary.pages_excluded == {"zero": long_run + 20, "kept_in_short_runs": 10}
    assert verify(out, src)["status"] == "ok"


@pytest.mark.parametrize("fmt", ["zelf", "elf", "kdump"])
def test_dump_level_1_round_trip_verifies_against_source(make_vmcore, tmp_path, fmt):
    src, _ = make_vmcore(spec(content="mixed"))
    out = str(tmp_path / f"out.{fmt}")
    summary = save(src, out, SaveOptions(output_format=fmt, dump_level=1))
    # kdump keeps zero pages readable through one shared stored page.
    assert summary.pages_excluded["zero_shared" if fmt == "kdump" else "zero"] > 0
    result = verify(out, src)
    assert result["status"] == "ok" and result["compared_bytes"] == summary.memory_bytes


def test_kernel_page_classes_need_vmcoreinfo_and_say_which_key(make_vmcore, tmp_path):
    # The sample has VMCOREINFO but no mem_map description: nothing to classify with.
    src, _ = make_vmcore(spec())
    out = tmp_path / "out"
    # --strict: today's refusal, exit 8, nothing written.
    result = subprocess.run([sys.executable, "-m", "vmcap", "save", "--strict", "-d", "31", src,
                             str(out)], capture_output=True, text=True, env=env_without_debug())
    assert result.returncode == 8, result.stderr
    assert len(error_lines(result.stderr)) == 1 and "VMCOREINFO" in result.stderr
    assert not out.exists() and not temp_outputs(tmp_path)
    # Without it, a scripted capture still ends with a dump: level 1, a warning naming the key.
    for fmt in ("zelf", "kdump"):
        target = tmp_path / f"out.{fmt}"
        result = subprocess.run([sys.executable, "-m", "vmcap", "save", "--json", "--format", fmt,
                                 "-d", "31", src, str(target)],
                                capture_output=True, text=True, env=env_without_debug())
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["dump_level"] == 1
        assert any("VMCOREINFO" in w and "dump level 1" in w for w in summary["warnings"])
        assert "warning:" in result.stderr and "VMCOREINFO" in result.stderr
        report = json.loads(subprocess.run([sys.executable, "-m", "vmcap", "inspect", "--json",
                                            str(target)], capture_output=True, text=True,
                                           check=True).stdout)
        assert report["vmcap"]["DUMP_LEVEL"] == "1"
        if fmt == "kdump":
            assert report["kdump"]["dump_level"] == 1


# makedumpfile 1.7.2 on the same dump (copy with program headers at 64), -d 31.
MAKEDUMPFILE_D31 = {"cache": 3752, "cache_private": 0, "user": 18, "free": 106113}


@pytest.mark.parametrize("fmt", ["kdump", "elf", "zelf"])
def test_dump_level_31_on_the_real_dump(real_vmcore, tmp_path, fmt):
    out = str(tmp_path / f"d31.{fmt}")
    summary = save(real_vmcore, out, SaveOptions(output_format=fmt, dump_level=31))
    for name, pages in MAKEDUMPFILE_D31.items():
        assert summary.pages_excluded[name] == pages
    assert summary.pages_excluded["zero_shared" if fmt == "kdump" else "zero"] > 0
    result = verify(out, real_vmcore)
    assert result["status"] == "ok"
    # Excluded kernel pages cannot be compared; everything stored is.
    assert result["compared_bytes"] + result["excluded_bytes_not_compared"] == 553779200
    assert result["excluded_bytes_not_compared"] >= sum(MAKEDUMPFILE_D31.values()) * PAGE * 0.9
    # The log survives filtering.
    text = subprocess.run([sys.executable, "-m", "vmcap", "dmesg", out], capture_output=True,
                          text=True, check=True).stdout
    assert "sysrq triggered crash" in text


def test_inspect_mem_usage_counts_like_makedumpfile(real_vmcore):
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "vmcap", "inspect", "--mem-usage", "--json", real_vmcore],
        capture_output=True, text=True, check=True).stdout)
    rows = {row["type"]: row["pages"] for row in report["mem_usage"]}
    assert rows["NON_PRI_CACHE"] == 3752 and rows["USER"] == 18 and rows["FREE"] == 106113
    assert sum(rows.values()) == 131040


# ------------------------------------------------------------------ kdump

@pytest.mark.parametrize("compress", ["zstd", "zlib", "none"])
def test_kdump_keeps_every_ram_byte_of_fractional_pages(make_vmcore, tmp_path, compress):
    sample_spec = spec()
    src, _ = make_vmcore(sample_spec)
    out = str(tmp_path / "out.kdump")
    save(src, out, SaveOptions(output_format="kdump", compress=compress))
    layout = layout_of(src)
    fractional = find_fractional_pages(layout.segments, PAGE)
    assert len(fractional) == 4
    with KdumpReader(out) as reader:
        for frac in fractional:
            page = reader.read_page(frac.paddr // PAGE)
            assert page is not None, f"fractional page {frac.paddr:#x} missing"
            ram = bytearray(PAGE)
            for piece in frac.pieces:
                at = piece.paddr - frac.paddr
                ram[at:at + piece.size] = expected_bytes(sample_spec, piece.paddr, piece.size)
            # RAM bytes kept, the non-RAM part zero (never the poison).
            assert page == bytes(ram)
        present, dumped = reader.page_counts()
        assert present == dumped
    assert verify(out, src)["status"] == "ok"


def test_kdump_overlapping_segments_store_each_page_once(make_vmcore, tmp_path):
    ranges = [RamRange(0x100000, 0x400000),
              RamRange(0x200000, 0x1800, vaddr=0xffffffff81000000)]
    src, _ = make_vmcore(spec(ranges))
    out = str(tmp_path / "out.kdump")
    save(src, out, SaveOptions(output_format="kdump"))
    with KdumpReader(out) as reader:
        assert reader.page_counts() == (0x400, 0x400)
    assert verify(out, src)["status"] == "ok"


def test_kdump_to_stdout_is_refused(make_vmcore):
    src, _ = make_vmcore(spec())
    result = subprocess.run([sys.executable, "-m", "vmcap", "save", "--format", "kdump", src,
                             "-"], capture_output=True, text=True, env=env_without_debug())
    assert result.returncode == 2 and "seekable" in result.stderr


@pytest.mark.parametrize("zero_pages", ["shared", "exclude"])
def test_kdump_zero_pages_shared_or_excluded(make_vmcore, tmp_path, zero_pages):
    src, _ = make_vmcore(spec(content="mixed"))
    out = str(tmp_path / "out.kdump")
    summary = save(src, out, SaveOptions(output_format="kdump", dump_level=1,
                                         zero_pages=zero_pages))
    with KdumpReader(out) as reader:
        present, dumped = reader.page_counts()
    if zero_pages == "shared":
        assert present == dumped and summary.pages_excluded["zero_shared"] > 0
    else:
        assert dumped == present - summary.pages_excluded["zero"]
    assert verify(out, src)["status"] == "ok"


def test_inspect_and_verify_a_kdump_file_through_the_cli(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec(content="mixed"))
    out = str(tmp_path / "out.kdump")
    subprocess.run([sys.executable, "-m", "vmcap", "save", "-q", "--format", "kdump", "-d", "1",
                    "--zero-pages", "exclude", src, out], check=True)
    report = json.loads(subprocess.run([sys.executable, "-m", "vmcap", "inspect", "--json", out],
                                       capture_output=True, text=True, check=True).stdout)
    assert report["container"] == "kdump"
    assert report["kdump"]["dump_level"] == 1
    assert report["kdump"]["pages_dumped"] < report["kdump"]["pages_present"]
    assert report["osrelease"] == "6.1.0-vmcap-sample"
    assert report["vmcap"]["SOURCE"] == src
    result = subprocess.run([sys.executable, "-m", "vmcap", "verify", "--json", "--source", src,
                             out], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "ok"


def test_corrupt_kdump_page_is_reported_by_verify(make_vmcore, tmp_path):
    src, _ = make_vmcore(spec(content="mixed"))
    out = tmp_path / "out.kdump"
    save(src, str(out), SaveOptions(output_format="kdump"))
    data = bytearray(out.read_bytes())
    # Flip bytes in the middle of the page data.
    for i in range(len(data) - 200_000, len(data) - 199_000):
        data[i] ^= 0xff
    out.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "vmcap", "verify", "--source", src, str(out)],
                            capture_output=True, text=True, env=env_without_debug())
    assert result.returncode in (6, 7), result.stderr
    assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------- kernel log

def test_dmesg_on_every_format_of_the_real_dump(real_vmcore, tmp_path):
    outputs = {}
    for fmt in ("zelf", "kdump"):
        outputs[fmt] = str(tmp_path / f"real.{fmt}")
        save(real_vmcore, outputs[fmt], SaveOptions(output_format=fmt, dump_level=1))
    texts = [subprocess.run([sys.executable, "-m", "vmcap", "dmesg", path], capture_output=True,
                            text=True, check=True).stdout
             for path in (real_vmcore, *outputs.values())]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0].count("\n") == 427
    assert "Kernel panic - not syncing: sysrq triggered crash" in texts[0]
    records = json.loads(subprocess.run([sys.executable, "-m", "vmcap", "dmesg", "--json",
                                         real_vmcore], capture_output=True, text=True,
                                        check=True).stdout)
    assert len(records) == 423 and records[0]["text"].startswith("Linux version 6.1.0-56")
    assert set(records[0]) == {"seq", "ts_nsec", "level", "facility", "caller", "text"}


def test_save_writes_the_kernel_log_beside_the_dump(real_vmcore, tmp_path):
    log = tmp_path / "dmesg.txt"
    summary = save(real_vmcore, str(tmp_path / "out"), SaveOptions(dmesg_path=str(log)))
    assert summary.dmesg == str(log) and summary.dmesg_records == 423
    assert "sysrq triggered crash" in log.read_text()


def test_save_goes_on_when_the_kernel_log_cannot_be_read(make_vmcore, tmp_path):
    # The sample's VMCOREINFO has no printk symbols: the dump still gets saved.
    src, _ = make_vmcore(spec())
    log = tmp_path / "dmesg.txt"
    summary = save(src, str(tmp_path / "out"), SaveOptions(dmesg_path=str(log)))
    assert summary.dmesg is None and not log.exists()
    assert any("kernel log not saved" in w for w in summary.warnings)
    assert verify(str(tmp_path / "out"), src)["status"] == "ok"


def test_dmesg_without_vmcoreinfo_is_a_clear_error(make_vmcore):
    src, _ = make_vmcore(spec(vmcoreinfo={}))
    result = subprocess.run([sys.executable, "-m", "vmcap", "dmesg", src], capture_output=True,
                            text=True, env=env_without_debug())
    assert result.returncode == 8, result.stderr
    assert len(error_lines(result.stderr)) == 1 and "VMCOREINFO" in result.stderr


def _pages_with_data(path: str) -> set[int]:
    """pfns whose stored content is not all zero (makedumpfile keeps zero pages
    in its 2nd bitmap, pointing at one shared zero page; vmcap leaves them out)."""
    pfns = set()
    with KdumpReader(path) as reader:
        for first, count in reader.iter_dumped_runs():
            for pfn in range(first, first + count):
                if any(reader.read_page(pfn)):
                    pfns.add(pfn)
    return pfns


def test_dump_level_31_selects_the_same_pages_as_makedumpfile(real_vmcore_for_makedumpfile,
                                                              tmp_path):
    import time

    source = str(real_vmcore_for_makedumpfile)
    theirs = tmp_path / "mdf.kdump"
    started = time.monotonic()
    subprocess.run(["makedumpfile", "-c", "-d", "31", source, str(theirs)], check=True,
                   capture_output=True)
    their_seconds = time.monotonic() - started
    ours = tmp_path / "vmcap.formats.kdump"
    summary = save(source, str(ours), SaveOptions(output_format="kdump", dump_level=31))
    assert summary.fractional_pages == 0  # so no difference comes from fractional pages
    ours_pfns, their_pfns = _pages_with_data(str(ours)), _pages_with_data(str(theirs))
    # makedumpfile clamps max_mapnr to the end of the last memory section that
    # has a mem_map (0x20000 pfns = 512 MiB here), so it drops the PT_LOADs
    # above RAM: QEMU's VGA VRAM at 0xfd000000 and BIOS ROM at 0xfffc0000.
    # vmcap keeps every PT_LOAD byte. Below the clamp, the selections are equal.
    clamp = 0x20000
    with KdumpReader(str(theirs)) as reader:
        assert reader.header.max_mapnr == clamp
    assert {pfn for pfn in ours_pfns if pfn < clamp} == their_pfns
    above = {pfn for pfn in ours_pfns if pfn >= clamp}
    assert above and all(0xfd000 <= pfn < 0xfe000 or 0xfffc0 <= pfn < 0x100000 for pfn in above)
    print(f"\n-d 31: vmcap keeps {len(above)} non-zero pages above makedumpfile's clamp")
    # No bigger than makedumpfile's, even carrying those pages.
    assert ours.stat().st_size <= theirs.stat().st_size
    print(f"\n-d 31 kdump: makedumpfile -c {theirs.stat().st_size} bytes {their_seconds:.2f} s; "
          f"vmcap zstd {ours.stat().st_size} bytes {summary.seconds:.2f} s")


class RecordingPageWriter:
    """Stands in for KdumpWriter: checks pfn order, records pages and present-only pfns."""

    def __init__(self, page_size):
        self.page_size = page_size
        self.pages = {}
        self.present_only = set()
        self.next_pfn = 0

    def write_pages(self, pfn, data):
        data = bytes(data)
        assert pfn >= self.next_pfn and len(data) % self.page_size == 0
        for i in range(len(data) // self.page_size):
            self.pages[pfn + i] = data[i * self.page_size:(i + 1) * self.page_size]
        self.next_pfn = pfn + len(data) // self.page_size

    def mark_present(self, pfn, count):
        assert pfn >= self.next_pfn
        self.present_only.update(range(pfn, pfn + count))
        self.next_pfn = pfn + count


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_page_stream_assembles_pages_from_any_chunking(data):
    import numpy as np

    from vmcap.kdumpsave import PageStream

    page = 16
    # Disjoint ranges in address order, some zero fill, cut into random chunks.
    cursor, chunks, memory, zero_fill = 0, [], {}, set()
    for _ in range(data.draw(st.integers(1, 6))):
        start = cursor + data.draw(st.integers(0, 3 * page))
        length = data.draw(st.integers(1, 5 * page))
        zero = data.draw(st.booleans())
        content = bytes(length) if zero else bytes((start + i) % 251 + 1 for i in range(length))
        for i in range(length):
            memory[start + i] = content[i]
        cut = start
        while cut < start + length:
            n = min(start + length - cut, data.draw(st.integers(1, 2 * page)))
            piece = None if zero else memoryview(content)[cut - start:cut - start + n]
            chunks.append((cut, n, piece))
            if zero:  # whole pages of one zero-fill chunk: present, not dumped
                zero_fill.update(range(-(-cut // page), (cut + n) // page))
            cut += n
        cursor = start + length
    max_pfn = cursor // page + 1
    excluded = np.array(data.draw(st.lists(st.booleans(), min_size=max_pfn, max_size=max_pfn)))
    writer = RecordingPageWriter(page)
    stream = PageStream(writer, page, excluded)
    for paddr, length, piece in chunks:
        stream.add(paddr, length, piece)
    stream.close()

    touched = {addr // page for addr in memory}
    assert set(writer.pages) | writer.present_only == touched
    assert not set(writer.pages) & writer.present_only
    for pfn in touched:
        if excluded[pfn] or pfn in zero_fill:
            assert pfn in writer.present_only
            continue
        # RAM bytes where a range put them, zeros in the rest of the page.
        expected = bytes(memory.get(pfn * page + i, 0) for i in range(page))
        assert writer.pages[pfn] == expected


def test_kdump_bitmaps_are_streamed_in_bounded_memory(make_vmcore, tmp_path):
    # RAM at 4 TiB: 2^30 pfns, two 128 MiB bitmaps in the file (holes). Held
    # in memory they would be 256 MiB; streamed, the capture stays small.
    src, _ = make_vmcore(spec([RamRange(0x1000, 0x3000), RamRange(1 << 42, 0x2000)]))
    out = tmp_path / "out.kdump"
    # A parent of its own, so RUSAGE_CHILDREN is this save's peak alone.
    measure = ("import resource, subprocess, sys; "
               "subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "vmcap", "save",
                             "-q", "--format", "kdump", src, str(out)],
                            capture_output=True, text=True, check=True)
    peak_mib = int(result.stdout) / 1024
    assert peak_mib < 150, peak_mib
    assert out.stat().st_blocks * 512 < 64 << 20  # sparse: the bitmaps are mostly holes
    with KdumpReader(str(out)) as reader:
        assert reader.page_counts() == (5, 5)
        assert reader.read_page((1 << 42) // PAGE) is not None


def test_kdump_refuses_address_spaces_whose_bitmaps_would_not_fit(make_vmcore, tmp_path):
    # RAM at 64 TiB: 2^34 pfns, two 2 GiB bitmaps. ELF formats still work.
    src, _ = make_vmcore(spec([RamRange(0x1000, 0x3000), RamRange(1 << 46, 0x2000)]))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "vmcap", "save", "--format", "kdump", src,
                             str(out)], capture_output=True, text=True, env=env_without_debug())
    assert result.returncode == 8, result.stderr
    assert "use --format zelf or elf" in result.stderr and len(error_lines(result.stderr)) == 1
    assert not out.exists() and not temp_outputs(tmp_path)
    assert verify_after_save(src, tmp_path / "out.zelf")


def verify_after_save(src, out) -> bool:
    save(src, str(out), SaveOptions())
    return verify(str(out), src)["status"] == "ok"
