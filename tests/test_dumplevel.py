"""The dump level as one type (DumpLevel), one exclusion policy, one counts record.

DumpLevel's algebra is checked against plain integer arithmetic for every
level; the policy against a table of what each output format does with
each bit; the counts record against the JSON keys `save --json` has always
printed. The command-line tests are the defects the raw parsing had.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcap.errors import CorruptOutput, Unsupported
from vmcap.kernel.dumplevel import (
    EXCLUDED_CLASSES,
    KERNEL_CLASSES,
    DumpLevel,
    ExclusionCounts,
    excluded_text,
)
from vmcap.plan.exclude import ZERO_EXCLUDED, ZERO_KEPT, ZERO_SHARED, ExclusionPolicy, SavedLevel
from vmcap.save import SaveOptions, save
from vmcap.verify import verify

from conftest import env_without_debug, spec

ROOT = Path(__file__).resolve().parents[1]
levels = st.integers(0, 31).map(DumpLevel.of)
formats = st.sampled_from(["zelf", "elf", "kdump", "kdump-flat"])


def vmcap(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT, env=env_without_debug(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


# --- DumpLevel ------------------------------------------------------------------------------


@given(levels, levels)
def test_level_algebra_is_the_bit_arithmetic_of_makedumpfile(a, b):
    assert a.includes(b) == (a | b == a)
    assert a.without(b) == a & ~b & 31 and isinstance(a.without(b), DumpLevel)
    assert a.needs_kernel == bool(a & 30) and a.excludes_zero == bool(a & 1)
    assert a.kernel_classes == a & 30
    assert (a | b).includes(a) and (a | b).includes(b)
    assert sum(getattr(DumpLevel, name.upper()) for name in a.names()) == a


@given(levels)
def test_a_level_prints_and_serializes_as_its_number(level):
    assert str(level) == f"{level}" == repr(int(level)) and f"{level:>3}" == f"{int(level):>3}"
    assert json.dumps({"dump_level": level}) == json.dumps({"dump_level": int(level)})
    assert DumpLevel.parse(str(level)) == level and DumpLevel.parse(f" {level} ") == level


def test_names_and_constants():
    assert DumpLevel(9).names() == ("zero", "user")
    assert DumpLevel(0).names() == ()
    assert DumpLevel.of(31).names() == ("zero", "cache", "cache_private", "user", "free")
    assert KERNEL_CLASSES == 30
    assert DumpLevel.parse_list("11,31") == (11, 31)


@pytest.mark.parametrize("text", ["32", "-1", "+3", "3_1", "0x1f", "²", "٣", "", " ", "1.0", "x" * 500])
def test_anything_but_0_to_31_in_ascii_digits_is_one_clear_error(text):
    with pytest.raises(ValueError, match="is not a dump level from 0 to 31") as error:
        DumpLevel.parse(text)
    assert len(str(error.value)) < 120


@pytest.mark.parametrize("value", [32, -1, 1.0, "1", True, None])
def test_of_takes_only_ints_0_to_31(value):
    with pytest.raises(ValueError):
        DumpLevel.of(value)


def test_save_options_take_ints_and_check_them():
    options = SaveOptions(dump_level=31, retry_levels=(1,))
    assert type(options.dump_level) is DumpLevel and type(options.retry_levels[0]) is DumpLevel
    with pytest.raises(ValueError):
        SaveOptions(dump_level=32)


# --- ExclusionCounts ------------------------------------------------------------------------

CLASSES = dict(zip(EXCLUDED_CLASSES, (5, 4, 0, 3, 0, 1)))


def test_counts_render_the_keys_save_has_always_printed():
    # ELF formats: the classes, then zero pages and the short runs kept.
    elf = ExclusionCounts(CLASSES, total_pages=100, zero=7, kept_in_short_runs=2)
    assert list(elf.to_json()) == [*EXCLUDED_CLASSES, "zero", "kept_in_short_runs"]
    # kdump: zero fill only when there is some, then zero or zero_shared.
    kdump = ExclusionCounts(CLASSES, zero_fill=9, zero_shared=6)
    assert list(kdump.to_json()) == [*EXCLUDED_CLASSES, "zero_fill", "zero_shared"]
    assert ExclusionCounts(zero_fill=0, zero=3).to_json() == {"zero": 3}
    # Not classified: no class keys at all; level 0: nothing.
    assert ExclusionCounts().to_json() == {}
    assert elf.class_total == 13
    assert excluded_text({"free": 5, "zero": 7}) == "free: 5, zero: 7"


# --- ExclusionPolicy --------------------------------------------------------------------------


SEQUENTIAL = SavedLevel(sequential=True)


@pytest.mark.parametrize("level,fmt,zero_pages,source,expected", [
    # level, format, --zero-pages, source: (classifies, zero mode, cuts PT_LOADs, scans)
    (0, "zelf", "shared", SavedLevel(), (False, ZERO_KEPT, False, False)),
    (1, "zelf", "shared", SavedLevel(), (False, ZERO_EXCLUDED, True, True)),
    (1, "elf", "exclude", SavedLevel(), (False, ZERO_EXCLUDED, True, True)),
    (30, "elf", "shared", SavedLevel(), (True, ZERO_KEPT, True, False)),
    (31, "zelf", "shared", SavedLevel(), (True, ZERO_EXCLUDED, True, True)),
    (1, "kdump", "shared", SavedLevel(), (False, ZERO_SHARED, False, False)),
    (1, "kdump-flat", "exclude", SavedLevel(), (False, ZERO_EXCLUDED, False, False)),
    (31, "kdump", "shared", SavedLevel(DumpLevel(1), drops_zero=True), (True, ZERO_EXCLUDED, False, False)),
    (16, "kdump", "shared", SavedLevel(), (True, ZERO_KEPT, False, False)),
    (1, "zelf", "shared", SEQUENTIAL, (False, ZERO_KEPT, False, False)),
    (17, "zelf", "shared", SEQUENTIAL, (False, ZERO_KEPT, False, False)),
    (1, "kdump", "shared", SEQUENTIAL, (False, ZERO_SHARED, False, False)),
])
def test_policy_table(level, fmt, zero_pages, source, expected):
    policy = ExclusionPolicy(DumpLevel.of(level), fmt, zero_pages, source)
    assert (policy.classifies, policy.zero_mode, policy.cuts_segments, policy.scans_zero_pages) == expected


def test_policy_classes_and_kdump_zero_mode():
    assert ExclusionPolicy(DumpLevel(10)).excluded_classes == ("cache", "user", "hwpoison", "offline")
    assert ExclusionPolicy(DumpLevel(1)).excluded_classes == ()
    assert ExclusionPolicy(DumpLevel(31), "kdump", "shared", SavedLevel(DumpLevel(1), True)).kdump_zero_pages \
        == "exclude"
    assert ExclusionPolicy(DumpLevel(31), "zelf", "shared", SavedLevel(DumpLevel(1), True)).kdump_zero_pages \
        == "shared"


@given(levels, levels, formats, st.sampled_from(["shared", "exclude"]), st.booleans(), st.booleans())
def test_policy_invariants(level, source_level, fmt, zero_pages, drops_zero, sequential):
    source = SavedLevel(source_level, drops_zero and source_level.excludes_zero, sequential)
    policy = ExclusionPolicy(level, fmt, zero_pages, source)
    # What the source left out stays out.
    assert policy.level == level | source_level
    assert (policy.zero_mode == ZERO_KEPT) == (not policy.level.excludes_zero
                                               or (fmt in ("zelf", "elf") and sequential))
    assert policy.zero_mode != ZERO_SHARED or fmt.startswith("kdump")
    assert policy.classifies == (policy.level.needs_kernel and not sequential)
    fallback = policy.without_kernel_classes()
    assert fallback.level == (policy.level & 1) | source_level and not fallback.level.without(source_level).needs_kernel
    assert bool(policy.warnings()) == (fmt in ("zelf", "elf") and sequential and policy.level.excludes_zero)


def test_refilter_adds_or_requires_the_source_bits():
    saved = SavedLevel(DumpLevel(17))
    assert saved.levels_to_write("src", (DumpLevel(2), DumpLevel(8)), inherit=True) == (19, 25)
    assert saved.levels_to_write("src", (DumpLevel(31),), inherit=False) == (31,)
    with pytest.raises(Unsupported, match=r"saved at dump level 17: .* dump level 16 is impossible.* -d 17$"):
        saved.levels_to_write("src", (DumpLevel(31), DumpLevel(16)), inherit=False)
    assert saved.needs_struct_pages(DumpLevel(19)) and not saved.needs_struct_pages(DumpLevel(17))
    assert not saved.needs_struct_pages(DumpLevel(1))


# --- defects of the raw level handling --------------------------------------------------------


@pytest.mark.parametrize("level", ["²", "3_1", "1,+3"])
def test_cli_dump_level_beyond_ascii_digits_is_a_usage_error(make_vmcore, tmp_path, level):
    # "²".isdigit() but int("²") fails: this was a traceback; "3_1" was level 31 for
    # `vmcap makedumpfile`.
    src, _ = make_vmcore(spec())
    for args in (["save", "-q", "-d", level, src, tmp_path / "o.zelf"],
                 ["makedumpfile", "-d", level, src, tmp_path / "o.kdump"]):
        result = vmcap(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
        assert "is not a dump level from 0 to 31" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(src).name]


def test_elf_source_whose_level_cannot_be_classified_again_is_saved_at_its_level(make_vmcore, tmp_path):
    # An ELF core saved at -d 8 whose struct pages vmcap cannot read (the sample has
    # no mem_map): the fallback keeps the source's bit 8, and there is no mask to
    # cut PT_LOADs by. This was an internal error (runs_from_mask(None)).
    src, _ = make_vmcore(spec(content="mixed"))
    first = tmp_path / "first.elf"
    save(src, str(first), SaveOptions(output_format="elf", dump_level=1))
    data = first.read_bytes()
    assert data.count(b"DUMP_LEVEL=1\n") == 1
    source = tmp_path / "user-level.elf"
    source.write_bytes(data.replace(b"DUMP_LEVEL=1\n", b"DUMP_LEVEL=8\n"))
    for fmt in ("elf", "zelf", "kdump"):
        summary = save(str(source), str(tmp_path / f"again.{fmt}"), SaveOptions(output_format=fmt,
                                                                               inherit_level=True))
        assert summary.dump_level == 8
        assert any("saved at dump level 8 instead" in w for w in summary.warnings), summary.warnings
        assert "cache" not in summary.pages_excluded
    with pytest.raises(Unsupported):
        save(str(source), str(tmp_path / "strict.zelf"), SaveOptions(inherit_level=True, strict=True))


def test_verify_refuses_a_dump_level_out_of_range_as_a_damaged_dump(make_vmcore, tmp_path):
    # A kdump file (no VMCAP note) whose header says -d 99: verify --source used
    # to classify at 99 and stop with an internal error.
    from test_kdump import mixed_pages, write_kdump, x86_64_info

    src, _ = make_vmcore(spec())
    dump = tmp_path / "odd.kdump"
    write_kdump(dump, x86_64_info(), [(0, mixed_pages(4))], max_mapnr=4, dump_level=99)
    with pytest.raises(CorruptOutput, match="dump_level is '99', not a dump level from 0 to 31"):
        verify(str(dump), src)
    result = vmcap("verify", "--source", src, dump)
    assert result.returncode == 6 and len(result.stderr.splitlines()) == 1, result.stderr


def test_a_sequential_source_without_bit_1_gets_no_zero_page_warning(tmp_path, make_vmcore):
    # A gzip-wrapped stream of a kdump file saved at -d 16: there are no zero pages
    # to keep or exclude, so no warning says they were kept.
    import gzip

    from test_readers_sources import makedumpfile_order_stream

    src, _ = make_vmcore(spec(content="mixed"))
    kdump = tmp_path / "src.kdump"
    save(src, str(kdump), SaveOptions(output_format="kdump"))
    data = bytearray(kdump.read_bytes())
    block_size = struct.unpack_from("<i", data, 428)[0]
    assert struct.unpack_from("<i", data, block_size + 8)[0] == 0  # kdump_sub_header.dump_level
    struct.pack_into("<i", data, block_size + 8, 16)
    kdump.write_bytes(data)
    flat = tmp_path / "stream.flat"
    makedumpfile_order_stream(kdump, flat)
    wrapped = tmp_path / "dump.202601010000.gz"
    wrapped.write_bytes(gzip.compress(flat.read_bytes(), 1))
    summary = save(str(wrapped), str(tmp_path / "out.zelf"), SaveOptions(inherit_level=True))
    assert summary.dump_level == 16 and not any("zero pages" in w for w in summary.warnings), summary.warnings
    # With bit 1 the warning stays: those zero pages are really kept.
    struct.pack_into("<i", data, block_size + 8, 17)
    kdump.write_bytes(data)
    makedumpfile_order_stream(kdump, flat)
    wrapped.write_bytes(gzip.compress(flat.read_bytes(), 1))
    summary = save(str(wrapped), str(tmp_path / "out17.zelf"), SaveOptions(inherit_level=True))
    assert summary.dump_level == 17 and any("zero pages are kept" in w for w in summary.warnings)
