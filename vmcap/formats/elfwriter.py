"""Writing an ELF vmcore as one linear byte stream.

The output keeps the source's ELF class, byte order, e_machine and notes,
and one PT_LOAD per output segment, laid out so that the readers people use
accept it:

* the program header table directly follows the ELF header (makedumpfile
  1.7.2 reads program headers at offset 64 whatever e_phoff says);
* phdr[0] is the single PT_NOTE and every other header is a PT_LOAD (crash
  requires exactly that);
* each segment's data starts at a file offset congruent to its p_paddr
  modulo the page size, so the plain file can be mmapped page by page, and
  p_align is 0 (crash calls an ELF with p_align != 0 a "netdump");
* the notes (the source's, then vmcap's) follow the program headers: crash
  reads everything before the first PT_LOAD's data as "the header" and looks
  for notes only there. The vmcap note records read errors met while
  copying, which are only known at the end, so it has a fixed size and is
  rewritten in place when the copy is done (see ``ElfImage.vmcap_note_offset``).

Sizes and offsets are all computed before the first byte is written.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from .. import __version__
from ..errors import CorruptOutput, Unsupported
from .elf import (
    EHDR_FORMATS,
    ET_CORE,
    EV_CURRENT,
    PHDR_FORMATS,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR_FORMATS,
    ErrorRange,
    build_note,
)

if TYPE_CHECKING:  # annotations only: the writer takes the source's Layout, never reads one
    from ..source.layout import Layout


VMCAP_NOTE_NAME = b"VMCAP"
VMCAP_NOTE_TYPE = 1
# Room for the vmcap note's text; enough for ~300 error ranges, after
# which the note says how many more there were (the JSON summary has all).
VMCAP_NOTE_DESC_BYTES = 16384


class ByteSink(Protocol):
    def write(self, data) -> None: ...

    def write_zeros(self, n: int) -> None: ...


@dataclass(frozen=True, slots=True)
class OutputSegment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfImage:
    """The complete layout of an output ELF: header bytes and where everything goes."""

    header: bytes  # ELF header + program headers (+ section header 0 for PN_XNUM)
    segments: tuple[OutputSegment, ...]
    notes_offset: int  # == len(header): the notes follow the headers directly
    notes_size: int

    @property
    def vmcap_note_offset(self) -> int:
        """The vmcap note is the last note: it can be rewritten in place."""
        return self.notes_offset + self.notes_size - VMCAP_NOTE_BYTES

    @property
    def total_size(self) -> int:
        last = max((s.offset + s.filesz for s in self.segments if s.filesz), default=0)
        return max(last, self.notes_offset + self.notes_size)


def _endian(byte_order: str) -> str:
    return "<" if byte_order == "little" else ">"


def vmcap_note(byte_order: str, *, source: str, page_size: int, output_format: str,
               error_ranges: Sequence[ErrorRange] | None = (),
               extra: Iterable[str] = ()) -> bytes:
    """The fixed-size note vmcap adds: tool version, source, page size, read errors.

    ``error_ranges=None`` means "not known": a stream to stdout cannot be
    rewritten once the copy has met its errors, and the note must not claim
    there were none.
    """
    count = "unknown" if error_ranges is None else str(len(error_ranges))
    lines = [f"VERSION={__version__}", f"SOURCE={source}", f"PAGE_SIZE={page_size}",
             f"FORMAT={output_format}", *extra, f"ERROR_RANGES={count}"]
    text = "\n".join(lines).encode() + b"\n"
    for i, err in enumerate(error_ranges or ()):
        line = f"ERROR_RANGE={err.paddr:#x},{err.length:#x},{err.reason}\n".encode()
        tail = f"ERROR_RANGES_NOT_LISTED={len(error_ranges) - i}\n".encode()
        if len(text) + len(line) + 64 > VMCAP_NOTE_DESC_BYTES:
            text += tail
            break
        text += line
    desc = text.ljust(VMCAP_NOTE_DESC_BYTES, b"\0")
    return build_note(VMCAP_NOTE_NAME, VMCAP_NOTE_TYPE, desc, byte_order)


VMCAP_NOTE_BYTES = len(vmcap_note("little", source="", page_size=0, output_format=""))


def parse_vmcap_note(desc: bytes) -> dict[str, object]:
    """The vmcap note's text as a dict; ERROR_RANGE lines become a list."""
    info: dict[str, object] = {"error_ranges": []}
    for line in desc.rstrip(b"\0").decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        if key == "ERROR_RANGE":
            paddr, length, reason = (value.split(",", 2) + ["", ""])[:3]
            info["error_ranges"].append({"paddr": int(paddr, 16), "length": int(length, 16),
                                         "reason": reason})
        elif key:
            info[key] = value
    return info


# Every key vmcap has written into its note; verify refuses others, so a
# damaged key cannot pass for an older note without digests.
VMCAP_NOTE_KEYS = frozenset({
    "VERSION", "SOURCE", "PAGE_SIZE", "FORMAT", "DUMP_LEVEL", "COMPRESS", "ZERO_PAGES",
    "ERROR_RANGES", "ERROR_RANGE", "ERROR_RANGES_NOT_LISTED",
    "META_XXH64", "DESC_XXH64", "DATA_XXH64", "DATA_OFFSET",
    "INCOMPLETE", "SAVED_BYTES", "MEMORY_BYTES", "DATA_END_PADDR"})
_HEX16 = re.compile(r"[0-9a-f]{16}")


def check_vmcap_note(desc: bytes, where: str) -> dict[str, object]:
    """parse_vmcap_note, refusing anything vmcap would not have written (CorruptOutput)."""
    text = desc.rstrip(b"\0")
    if b"\0" in text or not text.endswith(b"\n"):
        raise CorruptOutput(f"{where}: VMCAP note text is damaged (stray byte in its padding)")
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CorruptOutput(f"{where}: VMCAP note text is not UTF-8") from None
    for number, line in enumerate(lines, 1):
        key, equals, value = line.partition("=")
        if not equals or key not in VMCAP_NOTE_KEYS:
            raise CorruptOutput(f"{where}: VMCAP note line {number} is damaged: {line[:60]!r}")
        if key.endswith("_XXH64") or key == "DATA_OFFSET":
            if not (_HEX16.fullmatch(value) or value == "unknown"):
                raise CorruptOutput(f"{where}: VMCAP note {key} value {value[:40]!r} is damaged")
        elif key in ("PAGE_SIZE", "DUMP_LEVEL", "ERROR_RANGES_NOT_LISTED", "INCOMPLETE",
                     "SAVED_BYTES", "MEMORY_BYTES") and not value.isdigit():
            raise CorruptOutput(f"{where}: VMCAP note {key} value {value[:40]!r} is damaged")
    note = parse_vmcap_note(desc)
    incomplete = incomplete_info(note)
    if incomplete is not None:
        # Kept after a full disk or a write error: readable, but not a whole dump.
        raise CorruptOutput(f"{where}: incomplete dump (the capture stopped early): it holds "
                            f"{describe_incomplete(incomplete)}")
    return note


def incomplete_lines(saved_bytes: int, memory_bytes: int, end_paddr: int) -> list[str]:
    """The note lines of a dump cut short: how much memory it holds, of how much,
    and the physical address where its data stops."""
    return ["INCOMPLETE=1", f"SAVED_BYTES={saved_bytes}", f"MEMORY_BYTES={memory_bytes}",
            f"DATA_END_PADDR={end_paddr:#x}"]


def incomplete_info(note: dict | None) -> dict | None:
    """What a parsed VMCAP note says of a dump cut short, or None for a whole one."""
    if not note or note.get("INCOMPLETE") != "1":
        return None
    info: dict = {}
    for key, name in (("SAVED_BYTES", "saved_bytes"), ("MEMORY_BYTES", "memory_bytes")):
        value = str(note.get(key, ""))
        info[name] = int(value) if value.isdigit() else None
    try:
        info["data_end_paddr"] = int(str(note.get("DATA_END_PADDR")), 16)
    except ValueError:
        info["data_end_paddr"] = None
    return info


def describe_incomplete(info: dict) -> str:
    """'N of M bytes of memory (data stops at physical address X)'."""
    saved, total, end = info.get("saved_bytes"), info.get("memory_bytes"), info.get("data_end_paddr")
    text = f"{saved} of {total} bytes of memory"
    return text if end is None else f"{text} (data stops at physical address {end:#x})"


def find_vmcap_note(notes) -> dict | None:
    """The parsed VMCAP note among ``notes`` (layout.Note objects), or None."""
    for note in notes:
        if note.name == VMCAP_NOTE_NAME.decode() and note.type == VMCAP_NOTE_TYPE:
            return parse_vmcap_note(note.desc)
    return None


def aligned_notes(note_bytes: bytes) -> bytes:
    """The source's note bytes padded to 4, so vmcap's note can follow them."""
    return note_bytes + b"\0" * (-len(note_bytes) % 4)


def plan_elf_image(layout: Layout, segments: Sequence[OutputSegment], notes_size: int,
                   page_size: int) -> ElfImage:
    """Assign file offsets and build the header bytes.

    ``segments`` carry paddr/vaddr/filesz/memsz/flags; their ``offset`` is
    ignored and assigned here.
    """
    elf_class = layout.elf_class
    ehdr, phdr, phdr_fields, shdr = _elf_structs(layout)

    phnum = 1 + len(segments)
    use_xnum = phnum >= PN_XNUM
    phoff = ehdr.size
    header_end = phoff + phnum * phdr.size + (shdr.size if use_xnum else 0)

    notes_offset = header_end
    placed = []
    cursor = notes_offset + notes_size
    for seg in segments:
        # Congruent to p_paddr modulo the page size: the plain file can then
        # be mmapped page by page by crash, drgn and makedumpfile.
        offset = cursor + (seg.paddr - cursor) % page_size
        placed.append(OutputSegment(seg.paddr, seg.vaddr, offset, seg.filesz, seg.memsz,
                                    seg.flags))
        if seg.filesz:
            cursor = offset + seg.filesz
    if elf_class == 32 and cursor > 0xFFFFFFFF:
        # ELF32 offsets are 32 bits; an i386 PAE machine's vmcore is ELF64.
        raise Unsupported(f"{layout.source_name}: an ELF32 output would be {cursor} bytes, past "
                          "what 32-bit offsets address; use --format kdump")

    return ElfImage(_pack_header(layout, placed, notes_offset, notes_size), tuple(placed),
                    notes_offset, notes_size)


def cut_image(layout: Layout, image: ElfImage, data_end: int) -> tuple[ElfImage, int, int, int]:
    """The image of a dump whose data stops at file offset ``data_end``.

    Every segment keeps its offset and p_memsz; p_filesz is cut to the bytes
    written, so readers see what is missing as absent (p_memsz > p_filesz
    reads as zeros). Returns (image, bytes of memory data kept, of how many,
    physical address where the data stops).
    """
    cut = []
    saved = total = 0
    end_paddr = None
    for seg in image.segments:
        kept = min(seg.filesz, max(0, data_end - seg.offset))
        if kept < seg.filesz and end_paddr is None:
            end_paddr = seg.paddr + kept
        saved += kept
        total += seg.filesz
        cut.append(OutputSegment(seg.paddr, seg.vaddr, seg.offset, kept, seg.memsz, seg.flags))
    if end_paddr is None:
        last = max(image.segments, key=lambda s: s.paddr + s.memsz, default=None)
        end_paddr = last.paddr + last.memsz if last is not None else 0
    header = _pack_header(layout, cut, image.notes_offset, image.notes_size)
    return (ElfImage(header, tuple(cut), image.notes_offset, image.notes_size), saved, total,
            end_paddr)


def _elf_structs(layout: Layout):
    """(Ehdr, Phdr, Phdr field names, Shdr) structs of the output's class and byte order."""
    endian = _endian(layout.byte_order)
    phdr_format, phdr_fields = PHDR_FORMATS[layout.elf_class]
    return (struct.Struct(endian + EHDR_FORMATS[layout.elf_class]),
            struct.Struct(endian + phdr_format), phdr_fields,
            struct.Struct(endian + SHDR_FORMATS[layout.elf_class]))


def _pack_header(layout: Layout, placed: Sequence[OutputSegment], notes_offset: int,
                 notes_size: int) -> bytes:
    """ELF header, program headers (and section header 0 for PN_XNUM)."""
    elf_class = layout.elf_class
    ehdr, phdr, phdr_fields, shdr = _elf_structs(layout)
    phnum = 1 + len(placed)
    use_xnum = phnum >= PN_XNUM
    phoff = ehdr.size

    ident = bytearray(16)
    ident[:4] = b"\x7fELF"
    ident[4] = 1 if elf_class == 32 else 2
    ident[5] = 1 if layout.byte_order == "little" else 2
    ident[6] = EV_CURRENT
    shoff = phoff + phnum * phdr.size if use_xnum else 0
    header = bytearray(ehdr.pack(
        bytes(ident), ET_CORE, layout.e_machine, EV_CURRENT, 0, phoff, shoff,
        layout.e_flags, ehdr.size, phdr.size, PN_XNUM if use_xnum else phnum,
        shdr.size if use_xnum else 0, 1 if use_xnum else 0, 0))

    def pack_phdr(**values) -> bytes:
        return phdr.pack(*(values[name] for name in phdr_fields))

    header += pack_phdr(p_type=PT_NOTE, p_flags=0, p_offset=notes_offset, p_vaddr=0,
                        p_paddr=0, p_filesz=notes_size, p_memsz=notes_size, p_align=0)
    for seg in placed:
        header += pack_phdr(p_type=PT_LOAD, p_flags=seg.flags,
                            p_offset=seg.offset, p_vaddr=seg.vaddr, p_paddr=seg.paddr,
                            p_filesz=seg.filesz, p_memsz=seg.memsz, p_align=0)
    if use_xnum:
        # Section header 0 carries the real program header count in sh_info.
        header += shdr.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    return bytes(header)


class ElfStreamWriter:
    """Emits an ElfImage's bytes in file order into a byte sink.

    The header and notes are written first, through ``write_head`` (so a
    sink can keep them in a region it is able to rewrite later); then the
    segments' data in order.
    """

    def __init__(self, sink: ByteSink, image: ElfImage, notes: bytes, write_head=None):
        if len(notes) != image.notes_size:
            raise ValueError(f"notes are {len(notes)} bytes, the image reserved "
                             f"{image.notes_size}")
        self.sink = sink
        self.image = image
        (write_head or sink.write)(image.header + notes)
        self.position = len(image.header) + len(notes)

    def _advance_to(self, offset: int) -> None:
        if offset < self.position:
            raise ValueError(f"ELF data out of order: offset {offset:#x} is before "
                             f"{self.position:#x}")
        if offset > self.position:
            self.sink.write_zeros(offset - self.position)
            self.position = offset

    def write_segment(self, index: int, paddr: int, data) -> None:
        seg = self.image.segments[index]
        self._advance_to(seg.offset + (paddr - seg.paddr))
        self.sink.write(data)
        self.position += len(data)

    def finish(self) -> None:
        """Pad to the end of the last segment's data."""
        self._advance_to(self.image.total_size)
