"""Bad input never hangs or crashes vmcap: one line, a documented exit code, no leftovers.

Two kinds of sources are damaged here:

* synthetic vmcores from vmcap.sample, whose VMCOREINFO carries the real 6.1
  kernel's keys (so -d 31 and dmesg get as far as the page tables, which hold
  random bytes there);
* a "mini" copy of the real dump, when present: only the physical pages that
  dmesg and -d 31 read, so its kernel structures are real and small enough to
  copy and damage many times.

Every reading command runs as a subprocess with a timeout. The exit code must
be one README documents for bad input (never 1, the internal-error code),
stderr must hold exactly one error line and no traceback, and a failed save
must leave nothing in its output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import stat
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcap import sample
from vmcap.errors import VmcapError

from conftest import env_without_debug, spec

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 20
DOCUMENTED_EXIT_CODES = {0, 3, 4, 5, 6, 7, 8}
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")

# The VMCOREINFO keys of Debian's 6.1.0-56-amd64 that -d 31 and dmesg use (the real dump's values).
KERNEL_INFO = {
    "OSRELEASE": "6.1.0-56-amd64", "PAGESIZE": "4096",
    "SYMBOL(swapper_pg_dir)": "ffffffff95410000", "SYMBOL(init_top_pgt)": "ffffffff95410000",
    "NUMBER(phys_base)": "-14680064", "NUMBER(pgtable_l5_enabled)": "1",
    "KERNELOFFSET": "12a00000", "NUMBER(KERNEL_IMAGE_SIZE)": "1073741824", "NUMBER(sme_mask)": "0",
    "SYMBOL(mem_section)": "ff2c2fa91f257000", "LENGTH(mem_section)": "262144",
    "SIZE(mem_section)": "32", "OFFSET(mem_section.section_mem_map)": "0",
    "NUMBER(SECTION_SIZE_BITS)": "27", "NUMBER(MAX_PHYSMEM_BITS)": "52",
    "SIZE(page)": "64", "OFFSET(page.flags)": "0", "OFFSET(page.mapping)": "24",
    "OFFSET(page.lru)": "8", "OFFSET(page._mapcount)": "48", "OFFSET(page.private)": "40",
    "OFFSET(page.compound_dtor)": "16", "OFFSET(page.compound_order)": "17",
    "OFFSET(page.compound_head)": "8", "LENGTH(zone.free_area)": "11",
    "NUMBER(PG_lru)": "4", "NUMBER(PG_private)": "13", "NUMBER(PG_swapcache)": "10",
    "NUMBER(PG_swapbacked)": "19", "NUMBER(PG_slab)": "9", "NUMBER(PG_hwpoison)": "23",
    "NUMBER(PG_head_mask)": "65536", "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)": "-129",
    "NUMBER(HUGETLB_PAGE_DTOR)": "2", "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)": "-257",
    "SYMBOL(prb)": "ffffffff954643e0", "SIZE(printk_ringbuffer)": "88",
    "OFFSET(printk_ringbuffer.desc_ring)": "0", "OFFSET(printk_ringbuffer.text_data_ring)": "48",
    "OFFSET(prb_desc_ring.count_bits)": "0", "OFFSET(prb_desc_ring.descs)": "8",
    "OFFSET(prb_desc_ring.infos)": "16", "OFFSET(prb_desc_ring.head_id)": "24",
    "OFFSET(prb_desc_ring.tail_id)": "32", "SIZE(prb_desc)": "24",
    "OFFSET(prb_desc.state_var)": "0", "OFFSET(prb_desc.text_blk_lpos)": "8",
    "OFFSET(prb_data_blk_lpos.begin)": "0", "OFFSET(prb_data_blk_lpos.next)": "8",
    "SIZE(printk_info)": "88", "OFFSET(printk_info.seq)": "0", "OFFSET(printk_info.ts_nsec)": "8",
    "OFFSET(printk_info.text_len)": "16", "OFFSET(printk_info.caller_id)": "20",
    "OFFSET(prb_data_ring.size_bits)": "0", "OFFSET(prb_data_ring.data)": "8",
    "OFFSET(atomic_long_t.counter)": "0", "CRASHTIME": "1700000000",
}
# Values a damaged note may hold instead of a number.
BAD_NUMBERS = ("0", "3", "-1", str(1 << 40), str(1 << 64), "9" * 5000, "0x", "garbage\x01")
# Keys whose damage reaches each reader: layout, sparsemem, struct page, the page tables, dmesg.
DAMAGED_KEYS = (
    "PAGESIZE", "NUMBER(SECTION_SIZE_BITS)", "NUMBER(MAX_PHYSMEM_BITS)", "SIZE(mem_section)",
    "OFFSET(mem_section.section_mem_map)", "SIZE(page)", "OFFSET(page.flags)",
    "OFFSET(page._mapcount)", "NUMBER(PG_lru)", "NUMBER(PG_head_mask)", "LENGTH(zone.free_area)",
    "LENGTH(mem_section)", "SYMBOL(mem_section)", "SYMBOL(init_top_pgt)", "NUMBER(phys_base)",
    "NUMBER(KERNEL_IMAGE_SIZE)", "NUMBER(sme_mask)", "SYMBOL(prb)", "SIZE(printk_ringbuffer)",
    "OFFSET(printk_ringbuffer.desc_ring)", "OFFSET(printk_ringbuffer.text_data_ring)",
    "SIZE(prb_desc)", "OFFSET(prb_desc.state_var)", "SIZE(printk_info)",
    "OFFSET(printk_info.text_len)", "OFFSET(prb_data_ring.size_bits)", "OFFSET(atomic_long_t.counter)",
    "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)", "OFFSET(page.compound_order)", "OSRELEASE", "CRASHTIME",
)


# --- running vmcap --------------------------------------------------------------------------


def run_vmcap(*args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT,
                          env=env_without_debug(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def check_outcome(args, result: subprocess.CompletedProcess, out_dir: Path | None = None) -> None:
    """A documented exit code, no traceback, one error line; a failure leaves out_dir empty."""
    what = f"vmcap {' '.join(map(str, args))[:300]}: exit {result.returncode}, stderr {result.stderr[-2000:]!r}"
    assert result.returncode in DOCUMENTED_EXIT_CODES, what
    assert "Traceback" not in result.stderr, what
    assert "internal error" not in result.stderr, what
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    if result.returncode == 0:
        assert not errors, what
    else:
        assert len(errors) == 1, what
        assert len(errors[0]) < 2000, what
        if out_dir is not None:
            assert not list(out_dir.iterdir()), what


def reading_commands(source: Path, out_dir: Path, zelf: Path | None) -> list[tuple[list, Path | None]]:
    """Every command that reads a dump: (arguments, the directory a failure must leave empty)."""
    commands = [
        (["inspect", source], None),
        (["inspect", "--mem-usage", "--json", source], None),
        (["dmesg", source], None),
        (["save", "-q", "-d", "31", "--format", "kdump", source, out_dir / "k" / "out.kdump"],
         out_dir / "k"),
        (["save", "-q", "--threads", "1", source, out_dir / "z" / "out.zelf"], out_dir / "z"),
    ]
    if zelf is not None:
        commands.append((["verify", "-q", zelf, "--source", source], None))
    return commands


def run_all(items: list[tuple[list, Path | None]], workers: int = 2) -> None:
    """Run commands a few at a time; each must end well within TIMEOUT."""
    for _, out_dir in items:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def one(item):
        args, out_dir = item
        try:
            result = run_vmcap(*args)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vmcap {' '.join(map(str, args))[:300]} hung (over {TIMEOUT} s)")
        return args, result, out_dir

    with ThreadPoolExecutor(workers) as pool:
        for args, result, out_dir in pool.map(one, items):
            check_outcome(args, result, out_dir)


# --- damaging an ELF core -------------------------------------------------------------------


def phdrs_of(data: bytes) -> tuple[int, int, list[tuple]]:
    fields = EHDR.unpack_from(data, 0)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    return phoff, phnum, [PHDR.unpack_from(data, phoff + i * phentsize) for i in range(phnum)]


def note_regions(data: bytes) -> list[tuple[int, int]]:
    _, _, phdrs = phdrs_of(data)
    return [(p[2], p[5]) for p in phdrs if p[0] == 4]


def mutants(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """Truncations and field damage of one ELF64 LE core, deterministic for rng's seed."""
    out: list[tuple[str, bytes]] = []
    phoff, phnum, phdrs = phdrs_of(data)
    notes = note_regions(data)
    note_off, note_len = notes[0]
    load_offsets = [p[2] for p in phdrs if p[0] == 1]
    cuts = {0, 15, 17, 63, phoff + 3, phoff + 56 * phnum - 1, note_off + 2,
            note_off + note_len // 2, note_off + note_len - 7, load_offsets[0] + 1,
            (load_offsets[-1] + len(data)) // 2, len(data) - 1, rng.randrange(len(data))}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        out.append((f"cut at {cut}", data[:cut]))

    def patched(where: int, fmt: str, value: int) -> bytes:
        copy = bytearray(data)
        struct.pack_into(fmt, copy, where, value)
        return bytes(copy)

    # ELF header fields: e_ident class/data, e_type, e_machine, e_phoff, e_shoff, e_phentsize, e_phnum.
    for where, fmt, values in ((4, "B", (3,)), (5, "B", (2,)), (16, "<H", (2,)),
                               (18, "<H", (183, 0xFFFF)), (32, "<Q", (0, 65, 1 << 63, len(data))),
                               (40, "<Q", (1 << 63,)), (54, "<H", (1, 0xFFFF)),
                               (56, "<H", (0, 0xFFFF, 60000))):
        for value in values:
            out.append((f"ehdr[{where}]={value:#x}", patched(where, fmt, value)))
    # Program header fields of the PT_NOTE and of two PT_LOADs.
    big = (1 << 64) - 1
    for i in sorted({0, phnum - 1}):
        base = phoff + i * 56
        for field, at in (("p_type", 0), ("p_offset", 8), ("p_paddr", 24), ("p_filesz", 32),
                          ("p_memsz", 40)):
            fmt = "<I" if at == 0 else "<Q"
            value = rng.choice((1, 4) if at == 0 else (big, 1 << 63, 1 << 52, rng.randrange(1 << 40)))
            out.append((f"phdr {i} {field}={value:#x}", patched(base + at, fmt, value)))
    # Note headers: namesz, descsz of the first notes.
    position = note_off
    for _ in range(3):
        namesz, descsz, _ = NHDR.unpack_from(data, position)
        for at, value in ((rng.choice((0, 4)), 0xFFFFFFFF), (4, rng.choice((note_len, 0)))):
            out.append((f"note at {position:#x} +{at}={value:#x}", patched(position + at, "<I", value)))
        position += 12 + (namesz + 3 & ~3) + (descsz + 3 & ~3)
    # Random byte flips in the headers and notes.
    for _ in range(4):
        copy = bytearray(data)
        for _ in range(4):
            at = rng.randrange(min(len(data), note_off + note_len))
            copy[at] ^= 1 << rng.randrange(8)
        out.append(("flips", bytes(copy)))
    return out


def vmcoreinfo_variants(rng: random.Random, count: int) -> list[tuple[str, dict]]:
    """KERNEL_INFO with one key damaged: every bad value, each on a few keys."""
    variants = []
    for value in BAD_NUMBERS:
        for key in rng.sample(DAMAGED_KEYS, count):
            variants.append((f"{key}={value[:20]}", {**KERNEL_INFO, key: value}))
    return variants


# --- a small copy of the real dump with its kernel structures --------------------------------


@dataclasses.dataclass
class MiniDump:
    path: Path
    ranges: list[tuple[int, int, int]]  # (paddr, length, file offset) of each PT_LOAD
    reads: list[tuple[int, int]]  # (paddr, length) of each kernel-structure read, in order
    notes: list  # the real dump's notes but VMCOREINFO
    vmcoreinfo: dict
    log: list


def page_ranges(reads: list[tuple[int, int]], page: int = 4096) -> list[tuple[int, int]]:
    spans = sorted((p // page * page, -(-(p + n) // page) * page) for p, n in reads)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]


def write_core(path: Path, notes: list, vmcoreinfo: dict, ranges, read_physical) -> list[tuple[int, int, int]]:
    """An ELF64 x86_64 core: one PT_NOTE, then one PT_LOAD per (paddr, length) range."""
    from vmcap.formats.elf import build_note

    info = "".join(f"{k}={v}\n" for k, v in vmcoreinfo.items()).encode()
    note_bytes = b"".join(build_note(n.name.encode(), n.type, n.desc, "little") for n in notes) \
        + build_note(b"VMCOREINFO", 0, info, "little")
    phnum = 1 + len(ranges)
    offset = 64 + 56 * phnum
    phdrs = [PHDR.pack(4, 0, offset, 0, 0, len(note_bytes), len(note_bytes), 0)]
    offset += len(note_bytes)
    placed = []
    for paddr, length in ranges:
        phdrs.append(PHDR.pack(1, 7, offset, paddr, paddr, length, length, 0))
        placed.append((paddr, length, offset))
        offset += length
    ehdr = EHDR.pack(b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(ehdr + b"".join(phdrs) + note_bytes)
        for paddr, length in ranges:
            f.write(read_physical(paddr, length))
    return placed


@pytest.fixture(scope="module")
def mini_dump(real_vmcore, tmp_path_factory) -> MiniDump:
    from vmcap.fileio.mmapio import FileSource
    from vmcap.source.dump import classify_dump, kernel_log, open_dump
    from vmcap.source.layout import read_layout

    with FileSource(real_vmcore) as source:
        layout = read_layout(source)
    reads: list[tuple[int, int]] = []
    with open_dump(real_vmcore) as dump:
        inner = dump.physical.read

        def recording(paddr: int, length: int) -> bytes:
            reads.append((paddr, length))
            return inner(paddr, length)

        dump.physical.read = recording
        log = kernel_log(dump)
        classify_dump(dump, 31)
        dump.physical.read = inner
        path = tmp_path_factory.mktemp("mini") / "mini.elf"
        notes = [n for n in layout.notes if n.name != "VMCOREINFO"]
        ranges = write_core(path, notes, layout.vmcoreinfo, page_ranges(reads), dump.physical.read)
    return MiniDump(path, ranges, reads, notes, dict(layout.vmcoreinfo), log)


def mini_with_info(mini: MiniDump, path: Path, vmcoreinfo: dict) -> Path:
    """The mini dump with another VMCOREINFO."""
    from vmcap.source.dump import open_dump

    with open_dump(str(mini.path)) as dump:
        write_core(path, mini.notes, vmcoreinfo, [(p, n) for p, n, _ in mini.ranges], dump.physical.read)
    return path


def file_offset(mini: MiniDump, paddr: int) -> int:
    for start, length, offset in mini.ranges:
        if start <= paddr < start + length:
            return offset + paddr - start
    raise AssertionError(f"paddr {paddr:#x} not in the mini dump")


# --- the corpus tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_sample(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic core with the 6.1 kernel's VMCOREINFO, and its zelf for verify --source."""
    directory = tmp_path_factory.mktemp("kernel-sample")
    path = directory / "vmcore"
    sample.build_vmcore(path, spec(vmcoreinfo=KERNEL_INFO))
    zelf = directory / "vmcore.zelf"
    result = run_vmcap("save", "-q", path, zelf)
    assert result.returncode == 0, result.stderr
    return path, zelf


def test_damaged_headers_and_truncations_of_a_sample(kernel_sample, tmp_path):
    """Truncations and damaged ELF header, program header and note fields, every command."""
    path, zelf = kernel_sample
    rng = random.Random(8)
    items = []
    for i, (what, data) in enumerate(mutants(path.read_bytes(), rng)):
        damaged = tmp_path / f"m{i}"
        damaged.write_bytes(data)
        commands = reading_commands(damaged, tmp_path / f"out{i}", zelf)
        # inspect and one other command each: every command reads the header with
        # the same code, and the whole corpus must stay fast.
        items.extend([commands[0], rng.choice(commands[1:])])
    run_all(items)


def test_damaged_vmcoreinfo_values_of_a_sample(tmp_path):
    rng = random.Random(31)
    items = []
    for i, (what, info) in enumerate(vmcoreinfo_variants(rng, 1)):
        path = tmp_path / f"v{i}"
        sample.build_vmcore(path, spec(vmcoreinfo=info, content="zero", cpus=1))
        commands = reading_commands(path, tmp_path / f"out{i}", None)
        items.extend([commands[1], commands[2], commands[3]])
    run_all(items)


def test_mini_dump_reads_like_the_real_one(mini_dump, real_vmcore):
    """The corpus below damages real kernel structures only if the mini dump holds them all."""
    from vmcap.source.dump import kernel_log, open_dump

    with open_dump(str(mini_dump.path)) as dump:
        assert kernel_log(dump) == mini_dump.log
    assert len(mini_dump.log) > 400
    assert mini_dump.path.stat().st_size < 32 << 20


def test_damaged_vmcoreinfo_values_of_the_real_kernel(mini_dump, tmp_path):
    rng = random.Random(61)
    items = []
    for i, (what, info) in enumerate(vmcoreinfo_variants(rng, 2)):
        damaged = {**mini_dump.vmcoreinfo, **{k: v for k, v in info.items() if info[k] != KERNEL_INFO[k]}}
        path = mini_with_info(mini_dump, tmp_path / f"v{i}", damaged)
        commands = reading_commands(path, tmp_path / f"out{i}", None)
        items.extend([commands[1], commands[2]])
    run_all(items)


def test_damaged_kernel_structures_of_the_real_kernel(mini_dump, tmp_path):
    """Page tables, mem_section, struct pages and the printk rings, damaged in the file."""
    rng = random.Random(5)
    data = mini_dump.path.read_bytes()
    # Each distinct small read is a kernel structure (a page table, the ring buffer
    # struct, a mem_section root); large ones are arrays (struct pages, rings).
    regions = sorted(set(mini_dump.reads))
    items = []
    for i in range(10):
        copy = bytearray(data)
        for paddr, length in rng.sample(regions, 3):
            at = file_offset(mini_dump, paddr + rng.randrange(length) // 8 * 8)
            copy[at:at + 8] = rng.choice((b"\xff" * 8, bytes(8), rng.randbytes(8),
                                          struct.pack("<Q", 1 << 40)))
        path = tmp_path / f"k{i}"
        path.write_bytes(copy)
        commands = reading_commands(path, tmp_path / f"out{i}", None)
        items.extend([commands[1], commands[2]])
    run_all(items)


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_kernel_memory_in_process(mini_dump, data):
    """Any 8 bytes of any structure dmesg or -d 31 reads, replaced: a result or a VmcapError."""
    from vmcap.source.dump import classify_dump, kernel_log, open_dump

    regions = sorted(set(mini_dump.reads))
    paddr, length = data.draw(st.sampled_from(regions))
    at = paddr + data.draw(st.integers(0, length - 1))
    value = data.draw(st.sampled_from([b"\xff" * 8, bytes(8), struct.pack("<Q", 1 << 63),
                                       struct.pack("<Q", 0xFFFF_FFFF_8000_0000), b"\x01" * 8]))
    with open_dump(str(mini_dump.path)) as dump:
        inner = dump.physical.read

        def damaged(start: int, size: int) -> bytes:
            buffer = bytearray(inner(start, size))
            for i, byte in enumerate(value):
                if start <= at + i < start + size:
                    buffer[at + i - start] = byte
            return bytes(buffer)

        dump.physical.read = damaged
        for read in (kernel_log, lambda d: classify_dump(d, 31)):
            try:
                read(dump)
            except VmcapError:
                pass


# --- the defects of issue 8, one by one -----------------------------------------------------------


def fifo_commands(fifo: Path, good: Path, out: Path):
    return [
        ["inspect", fifo], ["inspect", "--mem-usage", fifo], ["dmesg", fifo],
        ["save", fifo, out / "a"], ["save", "-d", "31", "--format", "kdump", fifo, out / "b"],
        ["verify", fifo], ["verify", good, "--source", fifo], ["decompress", fifo, out / "c"],
    ]


def test_fifo_is_refused_at_once_by_every_command(kernel_sample, tmp_path):
    _, zelf = kernel_sample
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    for args in fifo_commands(fifo, zelf, out):
        try:
            result = run_vmcap(*args, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vmcap {args[0]} blocked on a FIFO")
        assert result.returncode == 3, (args, result.stderr)
        assert "pipe" in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
        assert not list(out.iterdir())


@pytest.mark.parametrize("command", ["inspect", "dmesg", "save", "verify"])
def test_dev_null_and_an_empty_file_are_both_bad_sources(tmp_path, command):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for source in ("/dev/null", empty):
        args = [command, source] + ([tmp_path / "out"] if command == "save" else [])
        result = run_vmcap(*args)
        # verify checks a dump: an empty file is a dump cut to nothing (corrupt,
        # 6); a device is no dump file at all (3), as for every command.
        expected = 6 if command == "verify" and source == empty else 3
        assert result.returncode == expected, (source, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / "out").exists()


def test_character_device_is_refused_by_the_opener(tmp_path):
    from vmcap.errors import BadSource
    from vmcap.fileio.mmapio import FileSource, open_source_fd

    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)
    with pytest.raises(BadSource, match="character device"):
        FileSource("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadSource, match="pipe"):
        open_source_fd(fifo)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    fd = open_source_fd(plain)
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


@pytest.fixture
def kernel_source(request, tmp_path):
    """A source whose VMCOREINFO has the 6.1 keys with some changed: the mini dump if present."""
    def make(**changes: str) -> Path:
        try:
            mini = request.getfixturevalue("mini_dump")
        except pytest.skip.Exception:
            path = tmp_path / "sample"
            sample.build_vmcore(path, spec(vmcoreinfo={**KERNEL_INFO, **changes}, content="zero"))
            return path
        return mini_with_info(mini, tmp_path / "mini", {**mini.vmcoreinfo, **changes})
    return make


@pytest.mark.parametrize("value", ["0", "3", str(1 << 40), "-4096"])
def test_absurd_pagesize_is_bad_source_for_mem_usage_and_dump_level_31(kernel_source, tmp_path, value):
    path = kernel_source(PAGESIZE=value)
    inspect = run_vmcap("inspect", "--json", path)
    assert inspect.returncode == 0, inspect.stderr
    assert any("PAGESIZE" in w for w in json.loads(inspect.stdout)["warnings"])
    for args in (["inspect", "--mem-usage", path],
                 ["save", "-d", "31", path, tmp_path / "o" / "out"],
                 ["save", "-d", "31", "--format", "kdump", path, tmp_path / "o" / "out"]):
        (tmp_path / "o").mkdir(exist_ok=True)
        result = run_vmcap(*args)
        assert result.returncode == 3, result.stderr
        assert f"PAGESIZE={value!r}" in result.stderr and result.stderr.count("\n") == 1
        assert not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("key, value", [("NUMBER(SECTION_SIZE_BITS)", "99"),
                                        ("NUMBER(SECTION_SIZE_BITS)", "-1"),
                                        ("NUMBER(MAX_PHYSMEM_BITS)", "99"),
                                        ("SIZE(mem_section)", "0"),
                                        ("SIZE(page)", "0"),
                                        ("NUMBER(PG_lru)", "-1"),
                                        ("LENGTH(zone.free_area)", "0")])
def test_absurd_sparsemem_numbers_are_bad_source_naming_them(kernel_source, key, value):
    path = kernel_source(**{key: value})
    result = run_vmcap("inspect", "--mem-usage", path)
    assert result.returncode == 3, result.stderr
    assert key.split("(")[-1].rstrip(")") in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("key, value", [("OFFSET(printk_ringbuffer.desc_ring)", str(1 << 40)),
                                        ("OFFSET(printk_ringbuffer.desc_ring)", "4096"),
                                        ("SIZE(prb_desc)", "0"),
                                        ("SIZE(printk_info)", "0"),
                                        ("OFFSET(printk_info.text_len)", "100000")])
def test_absurd_printk_layout_is_bad_source_naming_the_key(kernel_source, key, value):
    path = kernel_source(**{key: value})
    result = run_vmcap("dmesg", path)
    assert result.returncode == 3, result.stderr
    assert key in result.stderr and result.stderr.count("\n") == 1


def test_core_without_pt_load_warns_in_inspect_and_fails_save(make_vmcore, tmp_path):
    path, _ = make_vmcore(spec())
    data = bytearray(Path(path).read_bytes())
    struct.pack_into("<Q", data, 32, 65)  # e_phoff: the "program headers" are now garbage
    damaged = tmp_path / "phoff65"
    damaged.write_bytes(bytes(data))
    from vmcap.fileio.mmapio import FileSource
    from vmcap.source.layout import read_layout

    with FileSource(str(damaged)) as source:
        assert not read_layout(source).segments  # the premise: no PT_LOAD is left
    inspect = run_vmcap("inspect", "--json", damaged)
    assert inspect.returncode == 0, inspect.stderr
    assert any("no PT_LOAD" in w for w in json.loads(inspect.stdout)["warnings"])
    out = tmp_path / "o"
    out.mkdir()
    for fmt in ("zelf", "elf", "kdump"):
        result = run_vmcap("save", "--format", fmt, damaged, out / "x")
        assert result.returncode == 3, result.stderr
        assert "no PT_LOAD" in result.stderr and result.stderr.count("\n") == 1
        assert not list(out.iterdir())


def test_a_5000_digit_value_is_cut_in_messages(tmp_path):
    path = tmp_path / "long"
    sample.build_vmcore(path, spec(vmcoreinfo={**KERNEL_INFO, "PAGESIZE": "7" * 5000}, content="zero"))
    inspect = run_vmcap("inspect", "--json", path)
    assert inspect.returncode == 0, inspect.stderr
    warning, = [w for w in json.loads(inspect.stdout)["warnings"] if "PAGESIZE" in w]
    assert "…" in warning and len(warning) < 200
    result = run_vmcap("inspect", "--mem-usage", path)
    assert result.returncode == 3, result.stderr
    assert "…" in result.stderr and len(result.stderr) < 300


def test_vmcoreinfo_getters_bound_what_they_return():
    from vmcap.errors import BadSource
    from vmcap.kernel import vmcoreinfo as vi

    for getter, name in ((vi.size, "page"), (vi.offset, "page.flags"), (vi.length, "mem_section")):
        key = f"{getter.__name__.upper()}({name})"
        for bad in ("-1", str(1 << 40), "9" * 5000):
            with pytest.raises(BadSource, match=re.escape(key)):
                getter({key: bad}, name)
    with pytest.raises(BadSource, match="not a 64-bit"):
        vi.symbol({"SYMBOL(prb)": "1" + "0" * 16}, "prb")
    with pytest.raises(BadSource, match="does not fit in 64 bits"):
        vi.number({"NUMBER(x)": str(1 << 64)}, "x")
    for bad in ("0", "3", "1000", str(1 << 40)):
        with pytest.raises(BadSource, match="PAGESIZE"):
            vi.page_size({"PAGESIZE": bad})
    assert vi.page_size({"PAGESIZE": "65536"}) == 65536
    assert vi.shown("x" * 5000).endswith("… (5000 characters)")


def test_huge_osrelease_and_crashtime_are_ignored_not_crashed_on(tmp_path):
    from vmcap.kernel.pageclass import kernel_version

    assert kernel_version("9" * 5000 + ".1") is None
    path = tmp_path / "v"
    sample.build_vmcore(path, spec(vmcoreinfo={**KERNEL_INFO, "CRASHTIME": "9" * 4000,
                                               "OSRELEASE": "4" * 5000 + ".1"}, content="zero"))
    inspect = run_vmcap("inspect", "--json", path)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["crash_time"] is None



@settings(max_examples=200, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 50)), max_size=12),
       st.integers(0, 400), st.integers(1, 100))
def test_ram_ranges_are_found_by_search_as_by_testing_each(ranges, first_pfn, count):
    """-d 31 on a core with 100,000 segments must not test every segment for every chunk."""
    import numpy as np

    from vmcap.kernel.pageclass import RamPfnRanges

    pairs = [(start, start + length) for start, length in ranges]
    expected = np.zeros(count, dtype=bool)
    for start, end in pairs:
        lo, hi = max(start, first_pfn) - first_pfn, min(end, first_pfn + count) - first_pfn
        if lo < hi:
            expected[lo:hi] = True
    assert (RamPfnRanges(pairs).visit_mask(first_pfn, count) == expected).all()
