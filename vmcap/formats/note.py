"""The VMCAP note: vmcap's own ELF note, described once.

Every output vmcap writes (zelf, plain ELF, kdump, kdump-flat) carries one
note named "VMCAP", type 1, whose desc is text, one ``KEY=value`` line each,
NUL-padded to a fixed DESC_BYTES:

    VERSION=<vmcap version>          SOURCE=<source path>
    PAGE_SIZE=<bytes>                FORMAT=zelf|elf|kdump|kdump-flat
    COMPRESS=<codec>                 (kdump)
    DUMP_LEVEL=<0..31>
    ZERO_PAGES=shared|exclude        (kdump)
    INCOMPLETE=1, SAVED_BYTES=, MEMORY_BYTES=, DATA_END_PADDR=0x...   (a dump cut short)
    META_XXH64=, DESC_XXH64=, DATA_XXH64=, DATA_OFFSET=               (16 hex digits or "unknown")
    ERROR_RANGES=<count>|unknown
    ERROR_RANGE=<paddr:#x>,<length:#x>,<reason>   (one per range, while they fit)
    ERROR_RANGES_NOT_LISTED=<count>

The size is fixed because the note is written before the data and
rewritten in place once the data is written (read errors and digests are
known only then); every sink offers that rewrite (formats/head.py). Lines
come in the order above, whatever the format, so the bytes depend only on
the content.

Reading: ``parse_note`` is strict (anything vmcap would not have written is
CorruptOutput, the only error it raises), for verify; ``note_fields`` is
lenient and never raises, for inspect and for a saved dump used as a source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from .. import __version__
from ..errors import CorruptOutput
from .digest import PLACEHOLDER, UNKNOWN
from .elf import Note, NoteSpan, build_note, iter_note_spans

NOTE_NAME = "VMCAP"
NOTE_TYPE = 1
# Room for the note's text; enough for ~300 error ranges, after which the
# note says how many more there were (the JSON summary has all).
DESC_BYTES = 16384
# The digest lines, in the order they are written (see formats/digest.py).
DIGEST_KEYS = ("META_XXH64", "DESC_XXH64", "DATA_XXH64")
DIGEST_LINE_KEYS = (*DIGEST_KEYS, "DATA_OFFSET")

# Every key vmcap has written into its note; parse_note refuses others, so
# a damaged key cannot pass for an older note without digests.
KEYS = frozenset({
    "VERSION", "SOURCE", "PAGE_SIZE", "FORMAT", "DUMP_LEVEL", "COMPRESS", "ZERO_PAGES",
    "ERROR_RANGES", "ERROR_RANGE", "ERROR_RANGES_NOT_LISTED",
    *DIGEST_LINE_KEYS, "INCOMPLETE", "SAVED_BYTES", "MEMORY_BYTES", "DATA_END_PADDR"})
_NUMBER_KEYS = ("PAGE_SIZE", "DUMP_LEVEL", "ERROR_RANGES_NOT_LISTED", "INCOMPLETE",
                "SAVED_BYTES", "MEMORY_BYTES")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX = re.compile(r"0x[0-9a-f]+")
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also takes other scripts' digits
# Room kept after the error ranges for the ERROR_RANGES_NOT_LISTED line.
_TAIL_ROOM = 64


@dataclass(frozen=True, slots=True)
class ErrorRange:
    """Physical memory that could not be read and was replaced by zeros."""

    paddr: int
    length: int
    reason: str


@dataclass(frozen=True, slots=True)
class Incomplete:
    """A dump cut short (disk full, write error, size limit): how much of memory it holds."""

    saved_bytes: int | None
    memory_bytes: int | None
    data_end_paddr: int | None  # where its data stops; None when not recorded

    def lines(self) -> list[str]:
        return ["INCOMPLETE=1", f"SAVED_BYTES={self.saved_bytes}",
                f"MEMORY_BYTES={self.memory_bytes}", f"DATA_END_PADDR={self.data_end_paddr:#x}"]

    def as_dict(self) -> dict:
        """The ``incomplete`` object of inspect's JSON."""
        return {"saved_bytes": self.saved_bytes, "memory_bytes": self.memory_bytes,
                "data_end_paddr": self.data_end_paddr}

    def describe(self) -> str:
        return describe_incomplete(self.as_dict())


def describe_incomplete(info: Mapping) -> str:
    """'N of M bytes of memory (data stops at physical address X)' from inspect's JSON object."""
    saved, total, end = info.get("saved_bytes"), info.get("memory_bytes"), info.get("data_end_paddr")
    text = f"{saved} of {total} bytes of memory"
    return text if end is None else f"{text} (data stops at physical address {end:#x})"


@dataclass(frozen=True)
class VmcapNote:
    """What the VMCAP note says. None: the line is absent (or, for error_ranges, "unknown")."""

    source: str | None
    page_size: int | None
    output_format: str | None
    compress: str | None = None
    dump_level: int | None = None
    zero_pages: str | None = None
    incomplete: Incomplete | None = None
    # DIGEST_LINE_KEYS -> 16 hex digits, PLACEHOLDER or UNKNOWN; written in that order.
    digests: Mapping[str, str] = field(default_factory=dict)
    # None: "not known" (a stream to stdout cannot be rewritten once the copy
    # has met its errors, and the note must not claim there were none).
    error_ranges: tuple[ErrorRange, ...] | None = ()
    unlisted_error_ranges: int = 0  # parsed only: ranges the note had no room for
    version: str | None = __version__

    def with_digests(self, values: Mapping[str, str]) -> VmcapNote:
        return replace(self, digests=dict(values))

    def with_errors(self, error_ranges: Sequence[ErrorRange] | None) -> VmcapNote:
        return replace(self, error_ranges=None if error_ranges is None else tuple(error_ranges))

    def text(self) -> bytes:
        """The desc text, unpadded. Error ranges that do not fit are counted, not listed."""
        lines = [f"VERSION={self.version}", f"SOURCE={self.source}", f"PAGE_SIZE={self.page_size}",
                 f"FORMAT={self.output_format}"]
        for key, value in (("COMPRESS", self.compress), ("DUMP_LEVEL", self.dump_level),
                           ("ZERO_PAGES", self.zero_pages)):
            if value is not None:
                lines.append(f"{key}={value}")
        if self.incomplete is not None:
            lines += self.incomplete.lines()
        lines += [f"{key}={self.digests[key]}" for key in DIGEST_LINE_KEYS if key in self.digests]
        errors = self.error_ranges
        lines.append(f"ERROR_RANGES={'unknown' if errors is None else len(errors)}")
        text = "\n".join(lines).encode() + b"\n"
        for i, err in enumerate(errors or ()):
            line = f"ERROR_RANGE={err.paddr:#x},{err.length:#x},{err.reason}\n".encode()
            if len(text) + len(line) + _TAIL_ROOM > DESC_BYTES:
                text += f"ERROR_RANGES_NOT_LISTED={len(errors) - i}\n".encode()
                break
            text += line
        return text

    def build(self, byte_order: str) -> bytes:
        """The whole note (header, name, desc), always NOTE_BYTES long."""
        desc = self.text().ljust(DESC_BYTES, b"\0")
        if len(desc) != DESC_BYTES:
            raise ValueError(f"VMCAP note text is {len(desc)} bytes, more than {DESC_BYTES}")
        return build_note(NOTE_NAME.encode(), NOTE_TYPE, desc, byte_order)

    def digest_state(self, keys: Iterable[str]) -> str | None:
        """"none" (no digests: an older vmcap), "unknown" (a stream) or None (digests to check).

        CorruptOutput when some of ``keys`` are missing from a note that has digests.
        """
        if not any(key in self.digests for key in DIGEST_KEYS):
            return "none"
        missing = [key for key in keys if key not in self.digests]
        if missing:
            raise CorruptOutput(f"VMCAP note lacks {', '.join(missing)}")
        if any(self.digests[key] == UNKNOWN for key in keys):
            return UNKNOWN
        return None


NOTE_BYTES = len(VmcapNote(source="", page_size=0, output_format="").build("little"))


def placeholders(keys: Iterable[str], value: str = PLACEHOLDER) -> dict[str, str]:
    """Digest lines of fixed width before their values are known (or for good: UNKNOWN)."""
    return dict.fromkeys(keys, value)


def value_offset(desc: bytes, key: str) -> int:
    """Offset in ``desc`` of the value of the line ``key=`` (verify blanks the META value there)."""
    return desc.index(f"{key}=".encode()) + len(key) + 1


# -- reading ------------------------------------------------------------------

def note_fields(desc: bytes) -> dict[str, object]:
    """The note's lines as a dict, ERROR_RANGE lines as a list of dicts; never raises.

    inspect shows this as it is (its JSON ``vmcap`` object). A number that
    does not parse in an ERROR_RANGE line reads as None.
    """
    info: dict[str, object] = {"error_ranges": []}
    for line in desc.rstrip(b"\0").decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        if key == "ERROR_RANGE":
            paddr, length, reason = (value.split(",", 2) + ["", ""])[:3]
            info["error_ranges"].append({"paddr": _hex_or_none(paddr), "length": _hex_or_none(length),
                                         "reason": reason})
        elif key:
            info[key] = value
    return info


def _hex_or_none(text: str) -> int | None:
    return int(text, 16) if _HEX.fullmatch(text) else None


def incomplete_in(fields: Mapping | None) -> Incomplete | None:
    """What a note's fields (note_fields) say of a dump cut short, or None for a whole one."""
    if not fields or fields.get("INCOMPLETE") != "1":
        return None
    saved, total = (str(fields.get(key, "")) for key in ("SAVED_BYTES", "MEMORY_BYTES"))
    end = str(fields.get("DATA_END_PADDR", ""))
    return Incomplete(int(saved) if _DIGITS.fullmatch(saved) else None,
                      int(total) if _DIGITS.fullmatch(total) else None,
                      int(end, 16) if _HEX.fullmatch(end) else None)


def parse_note(desc: bytes, where: str) -> VmcapNote:
    """The note, refusing anything vmcap would not have written: CorruptOutput, and only that."""
    text = desc.rstrip(b"\0")
    if b"\0" in text or not text.endswith(b"\n"):
        raise CorruptOutput(f"{where}: VMCAP note text is damaged (stray byte in its padding)")
    try:
        lines = text.decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError:
        raise CorruptOutput(f"{where}: VMCAP note text is not UTF-8") from None
    values: dict[str, str] = {}
    errors: list[ErrorRange] = []
    for number, line in enumerate(lines, 1):
        key, equals, value = line.partition("=")
        if not equals or key not in KEYS or (key in values and key != "ERROR_RANGE"):
            raise CorruptOutput(f"{where}: VMCAP note line {number} is damaged: {line[:60]!r}")
        if key in DIGEST_LINE_KEYS:
            if not (_HEX16.fullmatch(value) or value == UNKNOWN):
                raise CorruptOutput(f"{where}: VMCAP note {key} value {value[:40]!r} is damaged")
        elif (key in _NUMBER_KEYS and not _DIGITS.fullmatch(value)
              or key == "ERROR_RANGES" and not (_DIGITS.fullmatch(value) or value == UNKNOWN)
              or key == "DATA_END_PADDR" and not _HEX.fullmatch(value)):
            raise CorruptOutput(f"{where}: VMCAP note {key} value {value[:40]!r} is damaged")
        if key == "ERROR_RANGE":
            paddr, _, rest = value.partition(",")
            length, comma, reason = rest.partition(",")
            if not (_HEX.fullmatch(paddr) and _HEX.fullmatch(length) and comma):
                raise CorruptOutput(f"{where}: VMCAP note line {number} is damaged: {line[:60]!r}")
            errors.append(ErrorRange(int(paddr, 16), int(length, 16), reason))
        values[key] = value

    def number(key: str) -> int | None:
        return int(values[key]) if key in values else None

    incomplete = None
    if values.get("INCOMPLETE") == "1":
        end = values.get("DATA_END_PADDR")
        incomplete = Incomplete(number("SAVED_BYTES"), number("MEMORY_BYTES"),
                                int(end, 16) if end is not None else None)
    return VmcapNote(
        version=values.get("VERSION"), source=values.get("SOURCE"), page_size=number("PAGE_SIZE"),
        output_format=values.get("FORMAT"), compress=values.get("COMPRESS"),
        dump_level=number("DUMP_LEVEL"), zero_pages=values.get("ZERO_PAGES"), incomplete=incomplete,
        digests={key: values[key] for key in DIGEST_LINE_KEYS if key in values},
        error_ranges=None if values.get("ERROR_RANGES") == UNKNOWN else tuple(errors),
        unlisted_error_ranges=number("ERROR_RANGES_NOT_LISTED") or 0)


def find_note(notes: Iterable[Note]) -> bytes | None:
    """The desc of the VMCAP note among parsed notes (layout.notes), or None."""
    for note in notes:
        if note.name == NOTE_NAME and note.type == NOTE_TYPE:
            return note.desc
    return None


def find_note_fields(notes: Iterable[Note]) -> dict | None:
    """note_fields of the VMCAP note among parsed notes, or None."""
    desc = find_note(notes)
    return None if desc is None else note_fields(desc)


def locate_note(note_bytes: bytes, byte_order: str, where: str) -> tuple[VmcapNote | None, NoteSpan | None]:
    """(parse_note of the VMCAP note, where it lies in note_bytes), or (None, None) if there is none.

    A note that looks like vmcap's but is not intact is CorruptOutput: a
    damaged note must not pass for the note-less dump of another tool.
    """
    for span in iter_note_spans(note_bytes, byte_order):
        if span.name == NOTE_NAME and span.type == NOTE_TYPE:
            desc = note_bytes[span.desc_offset:span.desc_offset + span.desc_size]
            return parse_note(desc, where), span
    if NOTE_NAME.encode() + b"\0" in note_bytes or b"\nFORMAT=" in note_bytes:
        raise CorruptOutput(f"{where}: the VMCAP note's header is damaged")
    return None, None


def without_note(note_bytes: bytes, byte_order: str) -> bytes:
    """The notes without vmcap's, in their order (4-byte aligned): a saved dump
    used as a source, or shown as an ELF view, gets a note of its own or none."""
    kept = []
    for span in iter_note_spans(note_bytes, byte_order):
        if span.name == NOTE_NAME:
            continue
        end = span.desc_offset + span.desc_size
        kept.append(note_bytes[span.offset:end] + b"\0" * (-end % 4))
    return b"".join(kept)


def aligned_notes(note_bytes: bytes) -> bytes:
    """The source's note bytes padded to 4, so vmcap's note can follow them."""
    return note_bytes + b"\0" * (-len(note_bytes) % 4)
