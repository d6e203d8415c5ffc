"""The VMCAP note (vmcap/formats/note.py): its bytes, round trips, and damaged notes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcap import __version__
from vmcap.errors import CorruptOutput
from vmcap.formats.digest import PLACEHOLDER, UNKNOWN
from vmcap.formats.elf import Note, build_note, iter_note_spans, parse_notes
from vmcap.formats.note import (
    DESC_BYTES,
    DIGEST_LINE_KEYS,
    NOTE_BYTES,
    ErrorRange,
    Incomplete,
    VmcapNote,
    find_note_fields,
    incomplete_in,
    locate_note,
    note_fields,
    parse_note,
    placeholders,
    value_offset,
    without_note,
)
from vmcap.save import SaveOptions, save

from conftest import env_without_debug, spec

KDUMP_NOTE = VmcapNote(
    source="/proc/vmcore", page_size=4096, output_format="kdump", compress="zstd", dump_level=31,
    zero_pages="shared", incomplete=Incomplete(8192, 16384, 0x3000),
    digests={"META_XXH64": "0123456789abcdef", "DESC_XXH64": UNKNOWN, "DATA_XXH64": PLACEHOLDER,
             "DATA_OFFSET": "0000000000004000"},
    error_ranges=(ErrorRange(0x1000, 0x2000, "Input/output error"),))


def test_the_text_is_in_one_order_whatever_the_format():
    """The lines vmcap 0.1 wrote, in the order it wrote them (readers and digests depend on it)."""
    assert KDUMP_NOTE.text() == (
        f"VERSION={__version__}\nSOURCE=/proc/vmcore\nPAGE_SIZE=4096\nFORMAT=kdump\n"
        "COMPRESS=zstd\nDUMP_LEVEL=31\nZERO_PAGES=shared\nINCOMPLETE=1\nSAVED_BYTES=8192\n"
        "MEMORY_BYTES=16384\nDATA_END_PADDR=0x3000\nMETA_XXH64=0123456789abcdef\n"
        "DESC_XXH64=unknown\nDATA_XXH64=0000000000000000\nDATA_OFFSET=0000000000004000\n"
        "ERROR_RANGES=1\nERROR_RANGE=0x1000,0x2000,Input/output error\n").encode()
    elf = VmcapNote(source="s", page_size=65536, output_format="zelf", dump_level=0,
                    error_ranges=None)
    assert elf.text() == (f"VERSION={__version__}\nSOURCE=s\nPAGE_SIZE=65536\nFORMAT=zelf\n"
                          "DUMP_LEVEL=0\nERROR_RANGES=unknown\n").encode()


@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_the_note_has_one_size_and_the_elf_note_layout(byte_order):
    for note in (KDUMP_NOTE, replace(KDUMP_NOTE, error_ranges=()), VmcapNote("", 0, "")):
        built = note.build(byte_order)
        assert len(built) == NOTE_BYTES
        assert built == build_note(b"VMCAP", 1, note.text().ljust(DESC_BYTES, b"\0"), byte_order)
        (span,) = iter_note_spans(built, byte_order)
        assert (span.name, span.type, span.desc_size) == ("VMCAP", 1, DESC_BYTES)


def test_too_many_error_ranges_are_counted_not_listed():
    errors = tuple(ErrorRange(0x1000 * i, 0x1000, "Input/output error") for i in range(2000))
    note = replace(KDUMP_NOTE, error_ranges=errors)
    built = note.build("little")
    assert len(built) == NOTE_BYTES
    parsed, _ = locate_note(built, "little", "x")
    listed = len(parsed.error_ranges)
    assert 100 < listed < 2000
    assert parsed.error_ranges == errors[:listed]
    assert parsed.unlisted_error_ranges == 2000 - listed
    assert note_fields(note.text())["ERROR_RANGES"] == "2000"


def test_a_source_path_too_long_for_the_note_is_refused_not_written_past_its_room():
    with pytest.raises(ValueError):
        VmcapNote("/" * DESC_BYTES, 4096, "elf").build("little")


_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\n,="),
                max_size=40)
_hex16 = st.integers(0, 2**64 - 1).map(lambda v: f"{v:016x}")
notes = st.builds(
    VmcapNote,
    source=_text, page_size=st.integers(0, 1 << 30), output_format=_text,
    compress=st.none() | _text, dump_level=st.none() | st.integers(0, 31),
    zero_pages=st.none() | st.sampled_from(["shared", "exclude"]),
    incomplete=st.none() | st.builds(Incomplete, st.integers(0, 2**50), st.integers(0, 2**50),
                                     st.integers(0, 2**52)),
    digests=st.dictionaries(st.sampled_from(DIGEST_LINE_KEYS), _hex16 | st.just(UNKNOWN)),
    error_ranges=st.none() | st.lists(st.builds(ErrorRange, st.integers(0, 2**52),
                                                st.integers(1, 2**40), _text),
                                      max_size=20).map(tuple),
    version=_text)


@given(notes, st.sampled_from(["little", "big"]))
def test_round_trip(note, byte_order):
    before = build_note(b"CORE", 1, b"abc", byte_order)  # the source's notes come first
    parsed, span = locate_note(before + note.build(byte_order), byte_order, "x")
    assert parsed == note
    assert span.offset == len(before) and span.desc_size == DESC_BYTES
    fields = note_fields(note.text())
    assert fields["SOURCE"] == note.source and len(fields["error_ranges"]) == len(note.error_ranges or ())
    assert incomplete_in(fields) == note.incomplete


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(notes, st.data())
def test_a_damaged_note_is_corrupt_output_and_nothing_else(note, data):
    """Bytes flipped, cut, inserted or replaced: parse_note raises CorruptOutput or reads a
    note; the lenient readers never raise."""
    desc = bytearray(note.text().ljust(DESC_BYTES, b"\0"))
    text_end = len(note.text())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, text_end + 4))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "replace"]))
        if kind == "flip":
            desc[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del desc[at:at + data.draw(st.integers(1, 30))]
        elif kind == "insert":
            desc[at:at] = data.draw(st.binary(min_size=1, max_size=8)
                                    | st.sampled_from([b"=", b",", b"\n", b"ERROR_RANGE=", b"\0"]))
        else:
            desc[at:at + 1] = data.draw(st.sampled_from([b"=", b",", b"\n", b"x", b"\xff", b"9"]))
    desc = bytes(desc)
    try:
        parsed = parse_note(desc, "damaged")
    except CorruptOutput as error:
        assert str(error).startswith("damaged: ") and "\n" not in str(error)
    else:
        assert isinstance(parsed, VmcapNote)
    incomplete_in(note_fields(desc))
    notes_bytes = build_note(b"VMCAP", 1, desc, "little")
    try:
        locate_note(notes_bytes, "little", "damaged")
    except CorruptOutput:
        pass


@pytest.mark.parametrize("line", [
    b"ERROR_RANGE=zz,0x1000,EIO", b"ERROR_RANGE=0x1000", b"ERROR_RANGE=0x1_0,0x1,x",
    b"PAGE_SIZE=4k", b"DATA_OFFSET=123", b"META_XXH64=0123456789ABCDEF", b"ERROR_RANGES=some",
    b"DATA_END_PADDR=12", b"NEW_KEY=1", b"no equals sign", b"DUMP_LEVEL=\xd9\xa3",
    b"DUMP_LEVEL=1\nDUMP_LEVEL=2"])
def test_values_vmcap_never_writes_are_refused(line):
    desc = KDUMP_NOTE.text() + line + b"\n"
    with pytest.raises(CorruptOutput, match="^where: VMCAP note"):
        parse_note(desc, "where")


def test_padding_damage_is_refused():
    desc = bytearray(KDUMP_NOTE.text().ljust(DESC_BYTES, b"\0"))
    desc[-100] = 1
    with pytest.raises(CorruptOutput, match="padding"):
        parse_note(bytes(desc), "x")


def test_lenient_fields_keep_damaged_error_ranges_readable():
    fields = note_fields(b"ERROR_RANGES=2\nERROR_RANGE=zz,0x10,EIO\nERROR_RANGE=0x2000,0x1000,x,y\n")
    assert fields["error_ranges"] == [{"paddr": None, "length": 0x10, "reason": "EIO"},
                                      {"paddr": 0x2000, "length": 0x1000, "reason": "x,y"}]


def test_a_damaged_note_header_is_not_taken_for_no_note():
    built = KDUMP_NOTE.build("little")
    damaged = built[:8] + b"\x02" + built[9:]  # the type
    with pytest.raises(CorruptOutput, match="header is damaged"):
        locate_note(damaged, "little", "x")
    assert locate_note(build_note(b"CORE", 1, b"x" * 8, "little"), "little", "x") == (None, None)


def test_without_note_keeps_the_other_notes_in_order():
    core = build_note(b"CORE", 1, b"abcde", "big")
    info = build_note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n", "big")
    notes = core + KDUMP_NOTE.build("big") + info
    assert without_note(notes, "big") == core + info
    assert without_note(core + info, "big") == core + info
    assert find_note_fields(parse_notes(notes, "big"))["FORMAT"] == "kdump"
    assert find_note_fields([Note("CORE", 1, b"")]) is None


def test_digest_state_and_value_offset():
    assert VmcapNote("s", 1, "zelf").digest_state(("META_XXH64",)) == "none"
    assert KDUMP_NOTE.digest_state(("META_XXH64", "DESC_XXH64")) == UNKNOWN
    assert KDUMP_NOTE.digest_state(("META_XXH64", "DATA_OFFSET")) is None
    with pytest.raises(CorruptOutput, match="lacks DATA_OFFSET"):
        replace(KDUMP_NOTE, digests=placeholders(["META_XXH64"])).digest_state(
            ("META_XXH64", "DATA_OFFSET"))
    text = KDUMP_NOTE.text()
    at = value_offset(text, "META_XXH64")
    assert text[at:at + 16] == b"0123456789abcdef"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True,
                          text=True, env=env_without_debug())


def test_inspect_and_verify_of_a_damaged_error_range_line(make_vmcore, tmp_path):
    """A damaged number in an ERROR_RANGE line: inspect shows it as null, verify says
    the note is damaged (exit 6); both were an internal error (ValueError)."""
    src, _ = make_vmcore(spec())
    out = tmp_path / "out.elf"
    save(src, str(out), SaveOptions(output_format="elf", threads=1))
    data = bytearray(out.read_bytes())
    at = data.index(b"ERROR_RANGES=0\n")
    # Same length, inside the note's padding: the layout stays as it was.
    data[at:at + 38] = b"ERROR_RANGES=1\nERROR_RANGE=0xzz,0x1,x\n"
    out.write_bytes(bytes(data))
    inspect = _run("inspect", "--json", out)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["vmcap"]["error_ranges"] == [
        {"paddr": None, "length": 1, "reason": "x"}]
    verify = _run("verify", out)
    assert verify.returncode == 6
    assert verify.stderr.count("\n") == 1 and "VMCAP note line" in verify.stderr
