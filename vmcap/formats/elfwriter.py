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
  copying, which are only known at the end, so it has a fixed size and the
  head is rewritten in place when the copy is done (the sinks' rewrite_head,
  formats/head.py).

Sizes and offsets are all computed before the first byte is written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import Unsupported
from ..kernel.memory import struct_prefix
from .elf import (
    EHDR_FORMATS,
    ET_CORE,
    EV_CURRENT,
    PHDR_FORMATS,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR_FORMATS,
)

if TYPE_CHECKING:  # annotations only
    from ..source.layout import Layout  # the writer takes the source's Layout, never reads one
    from .head import ElfSink


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
    def total_size(self) -> int:
        last = max((s.offset + s.filesz for s in self.segments if s.filesz), default=0)
        return max(last, self.notes_offset + self.notes_size)


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
    endian = struct_prefix(layout.byte_order)
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
    """Emits an ElfImage's bytes in file order into an ELF sink (formats/head.py).

    The header and notes are written first, through the sink's
    ``write_head`` (it keeps them where its ``rewrite_head`` can replace
    them once the data is written); then the segments' data in order.
    """

    def __init__(self, sink: ElfSink, image: ElfImage, notes: bytes):
        if len(notes) != image.notes_size:
            raise ValueError(f"notes are {len(notes)} bytes, the image reserved "
                             f"{image.notes_size}")
        self.sink = sink
        self.image = image
        sink.write_head(image.header + notes)
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
