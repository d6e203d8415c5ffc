"""The source's ELF layout: header, program headers, notes, VMCOREINFO.

Everything here is read with exact positional reads through the source's
``pread``: the ELF header, the program header table and the PT_NOTE
segments, nothing else. In /proc/vmcore the bytes after the notes belong to
the first segment's page-rounded chunk and may be MMIO, so a buffered read
that "helpfully" reads ahead is a bug, not an optimisation.

The ELF structures are described once, here, for this reader and for the
writers (elfwriter); the program header table is unpacked in one
``struct.iter_unpack`` call because a fragmented EFI memory map can give
100,000 segments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ..errors import BadSource
from ..fileio.mmapio import Source
from ..formats.elf import (
    E_TYPE_NAMES,
    EHDR_FIELDS,
    EHDR_FORMATS,
    ELF_MAGIC,
    ET_CORE,
    NT_PRSTATUS,
    PHDR_FORMATS,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    SHDR_FIELDS,
    SHDR_FORMATS,
    Note,
    Segment,
    parse_notes,
    reencode_note_headers,
    replace_vmcoreinfo_note,
)
from ..kernel.arch import Platform, make_platform
from ..kernel.memory import struct_prefix
from ..kernel.vmcoreinfo import is_page_size, parse_vmcoreinfo, shown

# Sanity bounds: anything beyond these is a corrupt header, not a big machine.
MAX_SEGMENTS = 1 << 22
MAX_NOTES_BYTES = 256 << 20

@dataclass(frozen=True)
class Layout:
    """What a vmcore is made of, without any of its memory contents."""

    source_name: str
    file_size: int | None
    elf_class: int  # 32 or 64
    byte_order: str  # "little" or "big"
    e_machine: int
    machine: str  # readelf's name, e.g. "EM_X86_64", or the number (as text) if unlisted (platform.machine)
    arch: str  # e.g. "x86_64" (platform.arch)
    e_flags: int
    e_phoff: int
    page_size: int
    page_size_origin: str  # "vmcoreinfo", "option", "architecture default"
    segments: tuple[Segment, ...]
    notes: tuple[Note, ...]
    note_bytes: bytes  # the PT_NOTE segments' bytes, concatenated, as in the source
    vmcoreinfo_raw: bytes
    vmcoreinfo: dict[str, str]
    platform: Platform  # the kernel's machine; machine, arch and byte_order are its
    warnings: tuple[str, ...] = ()
    # The byte order of the source's own ELF headers when it differs from
    # byte_order, the kernel's (QEMU 7.2's pseries dumps); None when they agree.
    header_byte_order: str | None = None

    @property
    def cpus(self) -> int:
        return sum(1 for n in self.notes if n.name == "CORE" and n.type == NT_PRSTATUS)

    @property
    def osrelease(self) -> str | None:
        return self.vmcoreinfo.get("OSRELEASE")

    @property
    def crash_time(self) -> int | None:
        value = self.vmcoreinfo.get("CRASHTIME")
        try:
            seconds = int(value) if value is not None else None
        except ValueError:
            return None
        # The kernel prints a time64_t; anything wider is a damaged note.
        return seconds if seconds is not None and -(1 << 63) <= seconds < 1 << 63 else None

    @property
    def memory_bytes(self) -> int:
        return sum(s.memsz for s in self.segments)

def read_layout(source: Source, *, page_size: int | None = None,
                vmcoreinfo: bytes | None = None) -> Layout:
    """Read the ELF header, program headers and notes of a vmcore.

    ``vmcoreinfo``: KEY=VALUE text that replaces the dump's VMCOREINFO note
    (vmcoreinfo.read_vmcoreinfo_file), for dumps without one.
    """
    name = source.name
    size = source.size
    # Character devices do not know their size; bound reads by sanity only.
    limit = size if size is not None else 1 << 63

    if size is not None and size < 16:
        raise BadSource(f"{name}: not an ELF file (only {size} bytes)")
    ident = source.pread(0, 16) if size is None or size >= 16 else b""
    if ident[:4] != ELF_MAGIC:
        raise BadSource(f"{name}: not an ELF file (no ELF magic at offset 0)")
    if ident[4] not in (1, 2):
        raise BadSource(f"{name}: bad ELF class byte {ident[4]}")
    if ident[5] not in (1, 2):
        raise BadSource(f"{name}: bad ELF data-encoding byte {ident[5]}")
    elf_class = 32 if ident[4] == 1 else 64
    ehdr_size = 52 if elf_class == 32 else 64
    if size is not None and size < ehdr_size:
        raise BadSource(f"{name}: truncated ELF header ({size} of {ehdr_size} bytes)")

    byte_order = "little" if ident[5] == 1 else "big"
    endian = struct_prefix(byte_order)
    header = dict(zip(EHDR_FIELDS, struct.unpack(endian + EHDR_FORMATS[elf_class],
                                                  source.pread(0, ehdr_size))))
    if header["e_type"] != ET_CORE:
        e_type = E_TYPE_NAMES.get(header["e_type"], header["e_type"])
        raise BadSource(f"{name}: not a core file (e_type is {e_type}, a vmcore is ET_CORE)")
    e_machine = header["e_machine"]  # the number, for writers
    platform = make_platform(elf_class=elf_class, byte_order=byte_order, e_machine=e_machine)

    phoff = header["e_phoff"]
    phentsize = header["e_phentsize"]
    phnum = header["e_phnum"]
    fmt, fields = PHDR_FORMATS[elf_class]
    phdr = struct.Struct(endian + fmt)
    if phnum == PN_XNUM:
        # More than 65534 program headers: the real count is in section 0's sh_info.
        shoff = header["e_shoff"]
        shdr = struct.Struct(endian + SHDR_FORMATS[elf_class])
        if shoff == 0 or shoff + shdr.size > limit:
            raise BadSource(f"{name}: e_phnum is PN_XNUM but section header 0 "
                            f"(e_shoff {shoff:#x}) is missing or beyond end of file")
        phnum = dict(zip(SHDR_FIELDS, shdr.unpack(source.pread(shoff, shdr.size))))["sh_info"]
    if phnum == 0:
        raise BadSource(f"{name}: no program headers (e_phnum is 0)")
    if phnum > MAX_SEGMENTS:
        raise BadSource(f"{name}: absurd program header count {phnum}")
    if phentsize != phdr.size:
        raise BadSource(f"{name}: e_phentsize is {phentsize}, expected {phdr.size} "
                        f"for ELF{elf_class}")
    table_end = phoff + phnum * phentsize
    if 0 < phoff < ehdr_size:
        raise BadSource(f"{name}: program header table at {phoff:#x} overlaps the ELF header")
    if phoff == 0 or table_end > limit:
        end_note = f" (file is {size} bytes)" if size is not None else ""
        raise BadSource(f"{name}: program header table ({phnum} entries at {phoff:#x}) "
                        f"extends beyond end of file{end_note}")
    table = source.pread(phoff, phnum * phentsize)

    warnings: list[str] = []
    segments: list[Segment] = []
    note_chunks: list[bytes] = []
    notes: list[Note] = []
    notes_total = 0
    addr_limit = 1 << elf_class
    for values in phdr.iter_unpack(table):
        p = dict(zip(fields, values))
        if p["p_type"] == PT_LOAD:
            index = len(segments)
            where = f"{name}: segment {index} (paddr {p['p_paddr']:#x})"
            if p["p_filesz"] > p["p_memsz"]:
                raise BadSource(f"{where}: p_filesz {p['p_filesz']:#x} is larger than "
                                f"p_memsz {p['p_memsz']:#x}")
            if p["p_paddr"] + p["p_memsz"] > addr_limit:
                raise BadSource(f"{where}: p_memsz {p['p_memsz']:#x} runs past the end of "
                                "the address space")
            file_end = p["p_offset"] + p["p_filesz"]
            if p["p_filesz"] and file_end > limit:
                raise BadSource(f"{where}: file data ends at {file_end:#x}, beyond end of "
                                f"file ({size:#x} bytes)")
            segments.append(Segment(index, p["p_paddr"], p["p_vaddr"], p["p_offset"],
                                    p["p_filesz"], p["p_memsz"], p["p_flags"]))
        elif p["p_type"] == PT_NOTE:
            offset, filesz = p["p_offset"], p["p_filesz"]
            if offset + filesz > limit:
                raise BadSource(f"{name}: PT_NOTE at {offset:#x} ({filesz} bytes) extends "
                                "beyond end of file")
            notes_total += filesz
            if notes_total > MAX_NOTES_BYTES:
                raise BadSource(f"{name}: absurd note size ({notes_total} bytes)")
            data = source.pread(offset, filesz) if filesz else b""
            note_chunks.append(data)
            notes.extend(parse_notes(data, byte_order, offset, warnings))

    if not segments:
        warnings.append(f"no PT_LOAD program header among the {phnum} at {phoff:#x}: "
                        "the core holds no memory")

    vmcoreinfo_raw = b""
    for note in notes:
        if note.name == "VMCOREINFO":
            vmcoreinfo_raw = note.desc.rstrip(b"\0")
            break
    note_bytes = b"".join(note_chunks)
    if vmcoreinfo is not None:
        # The file replaces the note (missing or damaged) everywhere: in what
        # vmcap reads and in the notes every output carries, so crash, drgn
        # and makedumpfile find it in the saved dump.
        if vmcoreinfo_raw and vmcoreinfo_raw != vmcoreinfo:
            warnings.append("the dump's own VMCOREINFO note is replaced by the VMCOREINFO file")
        vmcoreinfo_raw = vmcoreinfo
        note_bytes = replace_vmcoreinfo_note(note_bytes, vmcoreinfo, byte_order)
        notes = [n for n in notes if n.name != "VMCOREINFO"] + [
            Note("VMCOREINFO", 0, vmcoreinfo)]
    parsed = parse_vmcoreinfo(vmcoreinfo_raw)
    header_byte_order = None
    if platform.machine == "EM_PPC64" and parsed and segments:
        from ..kernel.ppc64 import ppc64_kernel_byte_order

        kernel_order = ppc64_kernel_byte_order(_segment_reader(source, segments), parsed, byte_order)
        if kernel_order != byte_order:
            # Memory, and every output vmcap writes, follow the kernel; the
            # notes' headers are turned around (their descriptors are QEMU's).
            warnings.append(f"ELF headers are {byte_order}-endian but the kernel is {kernel_order}-endian "
                            f"(QEMU 7.2 writes pseries dumps so): outputs are written {kernel_order}-endian")
            note_bytes = reencode_note_headers(note_bytes, byte_order, kernel_order)
            header_byte_order, byte_order = byte_order, kernel_order
            platform = make_platform(elf_class=elf_class, byte_order=byte_order, e_machine=e_machine)

    if page_size is not None:
        if not is_page_size(page_size):
            raise BadSource(f"--page-size {page_size} is not a power of two between 512 "
                            "and 16 MiB")
        origin = "option"
    else:
        page_size, origin = platform.default_page_size, "architecture default"
        text = parsed.get("PAGESIZE")
        if text is not None:
            try:
                value = int(text)
            except ValueError:
                value = -1
            if is_page_size(value):
                page_size, origin = value, "vmcoreinfo"
            else:
                warnings.append(f"VMCOREINFO PAGESIZE={shown(text)} is not a valid page size; "
                                f"using {page_size}")

    return Layout(
        source_name=name, file_size=size, elf_class=elf_class, byte_order=byte_order,
        e_machine=e_machine, machine=platform.machine, arch=platform.arch, e_flags=header["e_flags"],
        e_phoff=phoff, page_size=page_size, page_size_origin=origin,
        segments=tuple(segments), notes=tuple(notes), note_bytes=note_bytes,
        vmcoreinfo_raw=vmcoreinfo_raw, vmcoreinfo=parsed, warnings=tuple(warnings),
        platform=platform, header_byte_order=header_byte_order)


def _segment_reader(source: Source, segments) -> Callable[[int, int], bytes]:
    """read_physical over the PT_LOADs' file bytes, for the few reads read_layout makes."""
    def read_physical(paddr: int, length: int) -> bytes:
        for segment in segments:
            if segment.paddr <= paddr and paddr + length <= segment.paddr + segment.filesz:
                return source.pread(segment.offset + paddr - segment.paddr, length)
        raise BadSource(f"paddr {paddr:#x} ({length} bytes) is not in the dump")
    return read_physical

def require_memory(layout: Layout) -> None:
    """BadSource unless the core has a PT_LOAD: saving one without memory saves nothing."""
    if not layout.segments:
        raise BadSource(f"{layout.source_name}: no PT_LOAD program header (e_phoff "
                        f"{layout.e_phoff:#x}): the core holds no memory to save")
