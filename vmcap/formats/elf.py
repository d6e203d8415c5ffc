"""ELF core structures, described once for every reader and writer.

The ELF header, program and section headers per ELF class, the note format
(walk, build, re-encode), and the PT_LOAD record vmcap plans with. No I/O:
the source's reader (source/layout.py) and the writers (formats/elfwriter.py,
formats/kdump.py) pass bytes in and out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..kernel.memory import struct_prefix

PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
NT_PRSTATUS = 1
ET_CORE = 4
EV_CURRENT = 1

ELF_MAGIC = b"\x7fELF"

E_TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", ET_CORE: "ET_CORE"}

# The ELF header, program header and section header, per ELF class (no byte
# order: callers prefix "<" or ">"). Elf32_Ehdr and Elf64_Ehdr share their
# field order; the program headers do not (p_flags moves), so each format is
# paired with the order of its fields.
EHDR_FORMATS = {32: "16sHHIIIIIHHHHHH", 64: "16sHHIQQQIHHHHHH"}
EHDR_FIELDS = ("e_ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff",
               "e_flags", "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize", "e_shnum",
               "e_shstrndx")
SHDR_FORMATS = {32: "IIIIIIIIII", 64: "IIQQQQIIQQ"}
SHDR_FIELDS = ("sh_name", "sh_type", "sh_flags", "sh_addr", "sh_offset", "sh_size", "sh_link",
               "sh_info", "sh_addralign", "sh_entsize")

PHDR_FORMATS = {
    32: ("IIIIIIII", ("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz",
                      "p_memsz", "p_flags", "p_align")),
    64: ("IIQQQQQQ", ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr",
                      "p_filesz", "p_memsz", "p_align")),
}


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD: a range of the crashed kernel's physical memory."""

    index: int  # position among the PT_LOADs (0-based)
    paddr: int
    vaddr: int
    offset: int  # file offset of the first byte
    filesz: int
    memsz: int
    flags: int = 7

    @property
    def end(self) -> int:
        """Physical address just past the segment's file data."""
        return self.paddr + self.filesz


@dataclass(frozen=True, slots=True)
class Note:
    name: str
    type: int
    desc: bytes

@dataclass(frozen=True, slots=True)
class NoteSpan:
    """Where one note lies in a buffer of notes."""

    name: str
    type: int
    offset: int  # of the note header
    desc_offset: int
    desc_size: int


def note_header(byte_order: str) -> struct.Struct:
    # Elf32_Nhdr and Elf64_Nhdr are both three 32-bit words.
    return struct.Struct(struct_prefix(byte_order) + "III")


def iter_note_spans(data: bytes, byte_order: str, on_truncated=None):
    """Walk the notes of a PT_NOTE buffer (4-byte aligned, as Linux writes them).

    Stops at zero padding after the last note, and at a note that runs past
    the buffer, after calling ``on_truncated(offset, namesz, descsz)``.
    """
    header = note_header(byte_order)
    pos = 0
    while pos + header.size <= len(data):
        namesz, descsz, ntype = header.unpack_from(data, pos)
        if namesz == 0 and descsz == 0 and ntype == 0:
            return  # zero padding after the last note
        name_start = pos + header.size
        desc_start = name_start + ((namesz + 3) & ~3)
        if desc_start + descsz > len(data):
            if on_truncated is not None:
                on_truncated(pos, namesz, descsz)
            return
        name = data[name_start:name_start + namesz].rstrip(b"\0").decode("ascii", "replace")
        yield NoteSpan(name, ntype, pos, desc_start, descsz)
        pos = desc_start + ((descsz + 3) & ~3)


def build_note(name: bytes, ntype: int, desc: bytes, byte_order: str) -> bytes:
    """One note: name (NUL-terminated) and desc each padded to 4 bytes."""
    name_z = name + b"\0"
    header = note_header(byte_order).pack(len(name_z), len(desc), ntype)
    return header + name_z + b"\0" * (-len(name_z) % 4) + desc + b"\0" * (-len(desc) % 4)


def parse_notes(data: bytes, byte_order: str, where: int = 0,
                warnings: list[str] | None = None) -> list[Note]:
    """The notes of one PT_NOTE buffer; ``where`` is its file offset, for warnings."""
    def truncated(pos: int, namesz: int, descsz: int) -> None:
        if warnings is not None:
            warnings.append(f"note at file offset {where + pos:#x} runs past its PT_NOTE "
                            f"segment (namesz {namesz}, descsz {descsz}); later notes ignored")

    return [Note(span.name, span.type,
                 bytes(data[span.desc_offset:span.desc_offset + span.desc_size]))
            for span in iter_note_spans(data, byte_order, truncated)]

def reencode_note_headers(note_bytes: bytes, from_order: str, to_order: str) -> bytes:
    """The notes with their (namesz, descsz, type) headers written in to_order."""
    out = bytearray(note_bytes)
    target = note_header(to_order)
    for span in iter_note_spans(note_bytes, from_order):
        (namesz,) = struct.unpack_from(struct_prefix(from_order) + "I", note_bytes, span.offset)
        target.pack_into(out, span.offset, namesz, span.desc_size, span.type)
    return bytes(out)


def replace_vmcoreinfo_note(note_bytes: bytes, vmcoreinfo: bytes, byte_order: str) -> bytes:
    """The notes without their VMCOREINFO note, and one holding ``vmcoreinfo`` at the end."""
    kept = [note_bytes[span.offset:span.desc_offset + ((span.desc_size + 3) & ~3)]
            for span in iter_note_spans(note_bytes, byte_order) if span.name != "VMCOREINFO"]
    return b"".join(kept) + build_note(b"VMCOREINFO", 0, vmcoreinfo, byte_order)

