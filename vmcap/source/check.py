"""A dump's own checks, without a source: the VMCAP note and the XXH64 digests it records.

A plain ELF or kdump output of vmcap records digests of its parts in its
VMCAP note (vmcap.formats.note, vmcap.formats.digest); these functions find
the note, refuse a damaged or incomplete one, and check each digest against
the file. `vmcap verify` runs them through Dump.check (vmcap.source.dump).
"""

from __future__ import annotations

import os

from ..errors import CorruptOutput
from ..formats.digest import file_digest
from ..formats.note import DIGEST_LINE_KEYS, NOTE_NAME, VmcapNote, locate_note, value_offset

# How far into a plain ELF output verify looks for its notes.
MAX_HEAD_BYTES = 64 << 20


def checked_note(note_bytes: bytes, byte_order: str, where: str):
    """(the VMCAP note, its NoteSpan) among the notes, or (None, None) if it has none.

    A damaged note is CorruptOutput (see note.locate_note), and so is the
    note of a dump kept after a full disk or a write error: readable, but
    not a whole dump.
    """
    note, span = locate_note(note_bytes, byte_order, where)
    if note is not None and note.incomplete is not None:
        raise CorruptOutput(f"{where}: incomplete dump (the capture stopped early): it holds "
                            f"{note.incomplete.describe()}")
    return note, span


def digest_state(note: VmcapNote | None, keys) -> str | None:
    """"none" (no note or no digests: an older vmcap), "unknown" (streamed) or None (digests to check)."""
    return "none" if note is None else note.digest_state(keys)


def _check_digest(fd: int, name: str, key: str, expected: str, start: int, end: int,
                  what: str, blank_at: int | None = None) -> None:
    try:
        actual = file_digest(fd, start, end, blank_at=blank_at, what=f"{name}: {what}")
    except EOFError as error:
        raise CorruptOutput(str(error)) from None
    if actual != expected:
        raise CorruptOutput(f"{name}: {what} (bytes {start:#x}-{end:#x}) changed: XXH64 "
                            f"{actual}, the VMCAP note's {key} says {expected}")


def check_elf_digests(path: str, layout, note: VmcapNote | None, span) -> str:
    """Check a plain ELF output's META and DATA digests; returns the result's "digest"."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        first_data = min((s.offset for s in layout.segments if s.filesz), default=file_size)
        head = os.pread(fd, min(first_data, file_size, MAX_HEAD_BYTES), 0)
        if note is None:
            if NOTE_NAME.encode() + b"\0\0\0" in head:
                # The notes were found somewhere else than where vmcap wrote them.
                raise CorruptOutput(f"{path}: has a VMCAP note its program headers do not point at")
            return "none"
        state = digest_state(note, ("META_XXH64", "DATA_XXH64"))
        if state is not None:
            return state
        notes_offset = head.find(layout.note_bytes)
        vmcap_end = span.desc_offset + span.desc_size
        if notes_offset < 0 or vmcap_end != len(layout.note_bytes):
            raise CorruptOutput(f"{path}: the notes are not where vmcap writes them")
        desc = layout.note_bytes[span.desc_offset:vmcap_end]
        meta_at = notes_offset + span.desc_offset + value_offset(desc, "META_XXH64")
        notes_end = notes_offset + len(layout.note_bytes)
        _check_digest(fd, path, "META_XXH64", note.digests["META_XXH64"], 0, notes_end,
                      "ELF header, program headers and notes", blank_at=meta_at)
        _check_digest(fd, path, "DATA_XXH64", note.digests["DATA_XXH64"], notes_end, file_size,
                      "segment data")
        return "xxh64"
    finally:
        os.close(fd)


def check_kdump_digests(path: str, reader, note: VmcapNote | None, span) -> str:
    """Check a kdump output's META, DESC and DATA digests; returns the result's "digest"."""
    state = digest_state(note, DIGEST_LINE_KEYS)
    if state is not None:
        return state
    desc = reader.notes[span.desc_offset:span.desc_offset + span.desc_size]
    meta_at = reader.notes_offset + span.desc_offset + value_offset(desc, "META_XXH64")
    digests = note.digests
    data_offset = int(digests["DATA_OFFSET"], 16)
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        _check_digest(fd, path, "META_XXH64", digests["META_XXH64"], 0, reader.descriptor_offset,
                      "header, sub header, notes and bitmaps", blank_at=meta_at)
        _check_digest(fd, path, "DESC_XXH64", digests["DESC_XXH64"], reader.descriptor_offset,
                      data_offset, "page descriptors")
        _check_digest(fd, path, "DATA_XXH64", digests["DATA_XXH64"], data_offset, file_size,
                      "page data")
    finally:
        os.close(fd)
    return "xxh64"
