"""Dumps made by the real producers, read and re-filtered by vmcap.

makedumpfile 1.7.2 (Debian; zlib -c, lzo -l, snappy -p where built in, ELF -E,
flattened -F) and upstream makedumpfile with zstd (-z; only where
/usr/local/bin/makedumpfile-upstream is installed) write their formats from
the real dump. vmcap must read each in inspect, verify, dmesg and
--mem-usage, and `save` must take each as a source: converted to every
output format, and re-filtered keeping exactly the pages makedumpfile keeps
when it re-filters the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmcap.describe import describe
from vmcap.formats.kdump import KdumpReader
from vmcap.kernel.dmesg import format_makedumpfile
from vmcap.save import SaveOptions, save
from vmcap.source.dump import kernel_log, open_dump
from vmcap.verify import verify

from conftest import env_without_debug, have

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = Path("/usr/local/bin/makedumpfile-upstream")

pytestmark = pytest.mark.skipif(not have("makedumpfile"), reason="makedumpfile not installed")


def vmcap(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT,
                          env=env_without_debug(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def makedumpfile(*args, tool: str = "makedumpfile", stdout=None) -> None:
    result = subprocess.run([tool, *map(str, args)], stdout=stdout or subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert result.returncode == 0, (args, result.stderr[-2000:])


@pytest.fixture(scope="module")
def produced(real_vmcore_for_makedumpfile, tmp_path_factory) -> dict[str, Path]:
    """name -> a file makedumpfile wrote from the real dump."""
    source = real_vmcore_for_makedumpfile
    where = tmp_path_factory.mktemp("produced")
    files = {}
    for name, options in (("zlib-d31", ["-c", "-d", "31"]), ("lzo-d31", ["-l", "-d", "31"]),
                          ("snappy-d31", ["-p", "-d", "31"]), ("zlib-d1", ["-c", "-d", "1"]),
                          ("elf-d31", ["-E", "-d", "31"])):
        files[name] = where / name
        makedumpfile(*options, source, files[name])
    files["flat-lzo-d31"] = where / "flat-lzo-d31"
    with open(files["flat-lzo-d31"], "wb") as stream:
        makedumpfile("-F", "-l", "-d", "31", source, stdout=stream)
    if UPSTREAM.exists():
        files["zstd-d31"] = where / "zstd-d31"
        makedumpfile("-z", "-d", "31", source, files["zstd-d31"], tool=str(UPSTREAM))
    return files


@pytest.fixture(scope="module")
def reference_dmesg(real_vmcore_for_makedumpfile, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dmesg") / "makedumpfile.txt"
    makedumpfile("--dump-dmesg", real_vmcore_for_makedumpfile, out)
    return out.read_text("utf-8", "surrogateescape")


PRODUCED = ["zlib-d31", "lzo-d31", "snappy-d31", "zlib-d1", "elf-d31", "flat-lzo-d31", "zstd-d31"]


def each(produced, name) -> Path:
    if name not in produced:
        pytest.skip(f"{name}: {UPSTREAM} is not installed")
    return produced[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRODUCED)
def test_every_produced_format_is_read_by_inspect_verify_dmesg_and_mem_usage(
        produced, reference_dmesg, real_vmcore_for_makedumpfile, name):
    path = str(each(produced, name))
    report = describe(path)
    assert report["osrelease"] == "6.1.0-56-amd64"
    assert verify(path)["status"] == "ok"
    with open_dump(path) as dump:
        assert format_makedumpfile(kernel_log(dump)) == reference_dmesg
    # The page classes come from struct pages, which every dump level keeps.
    assert describe(path, mem_usage=True)["mem_usage"] == \
        describe(str(real_vmcore_for_makedumpfile), mem_usage=True)["mem_usage"]


def dumped_bitmap_and_pages(path: Path):
    with KdumpReader(str(path)) as reader:
        runs = list(reader.iter_dumped_runs())
        page = reader.page_size
        contents = b"".join(reader.pread_physical(first * page, count * page)
                            for first, count in runs)
        return runs, list(reader.iter_present_runs()), contents


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zlib-d1", "lzo-d31", "flat-lzo-d31"])
def test_refiltering_keeps_exactly_the_pages_makedumpfile_keeps(produced, tmp_path, name):
    source = each(produced, name)
    theirs, ours = tmp_path / "theirs.kdump", tmp_path / "ours.kdump"
    if name.startswith("flat"):
        # makedumpfile re-filters only a seekable kdump file: it reads the
        # reassembled one, vmcap reads the stream in place.
        rearranged = tmp_path / "rearranged.kdump"
        with open(source, "rb") as stream:
            subprocess.run(["makedumpfile", "-R", str(rearranged)], stdin=stream, check=True,
                           capture_output=True)
        makedumpfile("-c", "-d", "31", rearranged, theirs)
    else:
        makedumpfile("-c", "-d", "31", source, theirs)
    save(str(source), str(ours), SaveOptions(output_format="kdump", compress="zlib",
                                             dump_level=31))
    their_runs, their_present, their_pages = dumped_bitmap_and_pages(theirs)
    our_runs, our_present, our_pages = dumped_bitmap_and_pages(ours)
    assert our_present == their_present
    assert our_runs == their_runs
    assert our_pages == their_pages
    assert verify(str(ours), str(source))["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["zelf", "elf", "kdump", "kdump-flat"])
def test_lzo_kdump_converts_to_every_format_at_dump_level_31(
        produced, tmp_path, output_format):
    out = tmp_path / f"out.{output_format}"
    result = vmcap("save", "-q", "--format", output_format, "-d", "31", produced["lzo-d31"], out)
    assert result.returncode == 0, result.stderr
    # makedumpfile left out the non-RAM PT_LOADs of the real dump: the kdump
    # file itself is the source to compare with.
    checked = verify(str(out), str(produced["lzo-d31"]))
    assert checked["status"] == "ok" and checked["dump_level"] == 31
    with open_dump(str(out)) as converted, open_dump(str(produced["lzo-d31"])) as original:
        assert kernel_log(converted) == kernel_log(original)


@pytest.mark.slow
def test_zelf_and_elf_outputs_are_sources_too_and_their_note_is_replaced(real_vmcore, tmp_path):
    first, second, third = tmp_path / "a.zelf", tmp_path / "b.elf", tmp_path / "c.kdump"
    save(real_vmcore, str(first), SaveOptions(dump_level=1))
    save(str(first), str(second), SaveOptions(output_format="elf", dump_level=31))
    save(str(second), str(third), SaveOptions(output_format="kdump", dump_level=31))
    for path in (second, third):
        result = verify(str(path), real_vmcore)
        assert result["status"] == "ok" and result["dump_level"] == 31
        notes = describe(str(path))["notes"]
        assert [n["name"] for n in notes].count("VMCAP") == 1


@pytest.mark.slow
def test_a_level_without_the_source_bits_is_refused_in_one_line(produced, tmp_path):
    out = tmp_path / "out.zelf"
    result = vmcap("save", "-d", "1", produced["zlib-d31"], out)
    assert result.returncode == 8
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "saved at dump level 31" in lines[0] and "-d 31" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    # A list is refused as a whole: its last level would be written at a level never asked for.
    assert vmcap("save", "-d", "31,1", produced["zlib-d31"], out).returncode == 8


@pytest.mark.slow
def test_without_dump_level_a_saved_dump_keeps_its_own_and_each_stored_page_is_read_once(
        produced, tmp_path):
    out = tmp_path / "out.kdump"
    result = vmcap("save", "--json", "--format", "kdump", produced["zlib-d31"], out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dump_level"] == 31
    with KdumpReader(str(produced["zlib-d31"])) as source, KdumpReader(str(out)) as saved:
        assert saved.header.dump_level == 31
        present, dumped = source.page_counts()
        assert saved.page_counts() == (present, dumped)
    # Pages the source did not store are zero fill, never read; a kdump
    # output finds zero pages while it copies: each stored page is read once.
    assert summary["bytes_read"] == dumped * 4096
    assert summary["memory_bytes"] == present * 4096


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["gzip", "xz", "zstd", "lz4"])
def test_makedumpfile_flattened_stream_compressed_whole_is_a_save_source(
        produced, tmp_path, wrapper):
    """kdump-tools' `compress` of makedumpfile -F output: read once, in order."""
    if not have(wrapper):
        pytest.skip(f"{wrapper} is not installed")
    if wrapper == "lz4":
        pytest.importorskip("lz4.frame")
    wrapped = tmp_path / f"dump.202601010000.{wrapper}"
    with open(produced["flat-lzo-d31"], "rb") as stream, open(wrapped, "wb") as out:
        subprocess.run([wrapper, "-c", "-1"], stdin=stream, stdout=out, check=True)
    converted = tmp_path / "out.zelf"
    result = vmcap("save", "-q", wrapped, converted)
    assert result.returncode == 0, result.stderr
    checked = verify(str(converted), str(produced["lzo-d31"]))
    assert checked["status"] == "ok" and checked["dump_level"] == 31


@pytest.fixture(scope="module")
def split_set(real_vmcore_for_makedumpfile, tmp_path_factory) -> list[Path]:
    where = tmp_path_factory.mktemp("split")
    parts = [where / f"dump.{i}" for i in range(3)]
    # 32 MiB split blocks: the real dump's 512 MiB spread over three files.
    makedumpfile("--split", "--splitblock-size", "32", "-l", "-d", "31",
                 real_vmcore_for_makedumpfile, *parts)
    return parts


@pytest.mark.slow
def test_a_split_set_is_one_dump_for_dmesg_and_save(split_set, produced, reference_dmesg,
                                                    tmp_path):
    with KdumpReader(str(split_set[1])) as middle:
        assert middle.split_range[0] > 0 and middle.page_counts()[1] > 0
    # Any order: the sub headers say which pfns each file holds.
    given = [split_set[2], split_set[0], split_set[1]]
    result = vmcap("dmesg", *given)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_dmesg
    out = tmp_path / "joined.kdump"
    result = vmcap("save", "-q", "--format", "kdump", *given, out)
    assert result.returncode == 0, result.stderr
    joined = dumped_bitmap_and_pages(out)
    assert joined == dumped_bitmap_and_pages(produced["lzo-d31"])
    assert verify(str(out), str(produced["lzo-d31"]))["status"] == "ok"


@pytest.mark.slow
def test_part_of_a_split_set_is_refused_in_one_line(split_set, tmp_path):
    for args in ([split_set[1]], [split_set[0], split_set[2]]):
        result = vmcap("save", *args, tmp_path / "out.zelf")
        assert result.returncode == 3, result.stderr
        line, = result.stderr.strip().splitlines()
        assert "split set" in line or "gap" in line
    result = vmcap("dmesg", split_set[0])
    assert result.returncode == 3 and "give all the set's files together" in result.stderr
    # Each file alone is still whole as a file: verify checks its own pages.
    assert verify(str(split_set[1]))["status"] == "ok"


@pytest.mark.slow
def test_the_makedumpfile_front_end_adds_the_source_bits_as_makedumpfile_does(produced, tmp_path):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    makedumpfile("-c", "-d", "1", produced["lzo-d31"], theirs)
    result = vmcap("makedumpfile", "-c", "-d", "1", produced["lzo-d31"], ours)
    assert result.returncode == 0, result.stderr
    with KdumpReader(str(theirs)) as a, KdumpReader(str(ours)) as b:
        assert a.header.dump_level == b.header.dump_level == 31
    assert dumped_bitmap_and_pages(ours) == dumped_bitmap_and_pages(theirs)


@pytest.mark.slow
def test_a_mounted_split_set_is_the_single_file_makedumpfile_wrote(split_set, produced, tmp_path):
    """`vmcap mount A B C DIR`: the files of a --split set, given in any order, serve the same
    plain ELF core as the one file makedumpfile writes with the same options."""
    from test_mount import _MISSING, mounted, same_file

    if _MISSING is not None and not os.environ.get("CI"):
        pytest.skip(f"no usable FUSE here ({_MISSING})")
    with mounted([produced["lzo-d31"]], tmp_path / "one") as (single, _), \
            mounted([split_set[1], split_set[2], split_set[0]], tmp_path / "set") as (core, _):
        assert os.path.getsize(core) == os.path.getsize(single) > 50 << 20
        assert same_file(core, single)
