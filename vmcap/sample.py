"""Synthetic vmcore files: the test-suite's fixture builder and `vmcap demo`'s source.

``build_vmcore(path, spec)`` writes an ELF core laid out the way the kernel's
fs/proc/vmcore.c exports /proc/vmcore (or, on request, the way QEMU and simple
copiers lay segments out), with per-CPU NT_PRSTATUS notes, a VMCOREINFO note
and one PT_LOAD per ``RamRange``. It streams: a 4 GiB range is generated and
written 1 MiB at a time.

Two promises make it useful as an oracle:

- RAM content is a pure function of the physical address (``expected_bytes``),
  so overlapping segments (the x86_64 kernel-text PT_LOAD) agree, and a test can
  check any output byte from its paddr alone. RAM content never contains the
  POISON byte.
- Every file byte after the notes that is not some segment's file data is
  POISON. In the "proc" layout these are the parts of a page-rounded chunk
  outside its segment: in a real /proc/vmcore they are old memory that may be
  non-RAM (ACPI tables, MMIO), which a correct copier never reads.

Header padding (between the program headers and the notes) is zero, as in the
kernel's zeroed ELF buffer.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .formats.elf import NT_PRSTATUS, PT_LOAD, PT_NOTE
from .kernel.arch import EM_386, EM_AARCH64, EM_ARM, EM_PPC, EM_PPC64, EM_S390, EM_X86_64
from .kernel.memory import struct_prefix

POISON = b"\xa5"
# Stands in for a POISON byte that RAM content would otherwise contain.
_POISON_SUBSTITUTE = 0xA4

DIRECT_MAP_BASE = 0xFFFF888000000000  # x86_64 __PAGE_OFFSET (4-level paging, no KASLR)
KERNEL_TEXT_VADDR = 0xFFFFFFFF81000000  # x86_64 _text without KASLR

ET_CORE = 4
EV_CURRENT = 1
PF_RWX = 7
NT_VMCOREINFO = 0

LAYOUTS = ("proc", "packed", "aligned")
CONTENTS = ("pattern", "mixed", "zero")

_BLOCK_BYTES = 1 << 20  # generation and write granularity


# --------------------------------------------------------------------------
# What to build


@dataclass(frozen=True)
class RamRange:
    """One PT_LOAD: physical memory [paddr, paddr + size).

    ``filesz`` below ``size`` makes the rest memsz-only (zero fill by ELF
    rules); /proc/vmcore never does that, makedumpfile -E output does.
    ``vaddr`` defaults to the direct-map address on x86_64, else to paddr.
    """

    paddr: int
    size: int
    filesz: int | None = None
    vaddr: int | None = None

    def __post_init__(self):
        if self.paddr < 0 or self.size <= 0:
            raise ValueError(f"RamRange at paddr {self.paddr:#x}: size must be > 0, got {self.size}")
        if self.filesz is not None and not 0 <= self.filesz <= self.size:
            raise ValueError(f"RamRange at paddr {self.paddr:#x}: filesz {self.filesz:#x} "
                             f"not in [0, size {self.size:#x}]")

    @property
    def file_size(self) -> int:
        return self.size if self.filesz is None else self.filesz


@dataclass(frozen=True)
class SampleSpec:
    """Everything that determines a sample vmcore, byte for byte.

    layout:
      "proc"    page-rounded chunks packed back to back like fs/proc/vmcore.c:
                p_offset ≡ p_paddr (mod page_size); notes at a page-aligned offset.
      "packed"  notes right after the program headers, segments back to back
                right after the notes (QEMU, makedumpfile -E, simple copiers).
      "aligned" notes right after the program headers, each segment at a
                page-aligned offset whatever its paddr.
    content:
      "pattern" each 8-byte word holds its own physical address (see
                ``pattern_word``); "mixed" a realistic page mix from ``seed``;
                "zero" all zero (written as holes: a sparse file).
    vmcoreinfo: None for the default entries, {} for no VMCOREINFO note.
    """

    ranges: tuple[RamRange, ...]
    page_size: int = 4096
    elf_class: int = 64
    byte_order: str = "little"
    machine: int = EM_X86_64
    layout: str = "proc"
    phoff: int | None = None
    cpus: int = 2
    vmcoreinfo: dict[str, str] | None = None
    content: str = "mixed"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple(self.ranges))
        if self.page_size < 512 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size {self.page_size} is not a power of two >= 512")
        if self.elf_class not in (32, 64):
            raise ValueError(f"elf_class {self.elf_class} is not 32 or 64")
        if self.byte_order not in ("little", "big"):
            raise ValueError(f"byte_order {self.byte_order!r} is not 'little' or 'big'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.content not in CONTENTS:
            raise ValueError(f"content {self.content!r} is not one of {CONTENTS}")
        if self.cpus < 0:
            raise ValueError(f"cpus {self.cpus} is negative")
        if self.phoff is not None and self.phoff < _ELF_FORMATS[self.elf_class].ehsize:
            raise ValueError(f"phoff {self.phoff} overlaps the ELF header")
        if len(self.ranges) + 1 >= 0xFFFF:
            raise ValueError(f"{len(self.ranges)} ranges need PN_XNUM, which samples do not write")
        for r in self.ranges:
            if not isinstance(r, RamRange):
                raise TypeError(f"ranges must hold RamRange, got {type(r).__name__}")
            if r.paddr + r.size > 1 << 59:
                # pattern words encode paddr >> 3 in 56 bits
                raise ValueError(f"RamRange at paddr {r.paddr:#x} ends beyond 2**59")

    def vaddr_of(self, r: RamRange) -> int:
        if r.vaddr is not None:
            return r.vaddr
        if self.machine == EM_X86_64 and self.elf_class == 64:
            return DIRECT_MAP_BASE + r.paddr
        return r.paddr


class SampleSegment(NamedTuple):
    """One PT_LOAD as written. ``index`` is its program header index (PT_NOTE is 0)."""

    index: int
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class VmcoreInfo:
    """What build_vmcore wrote: enough for a test to check a copier against."""

    path: Path | None
    file_size: int
    segments: tuple[SampleSegment, ...]
    page_size: int
    non_ram_file_ranges: tuple[tuple[int, int], ...]  # (offset, length), all POISON
    notes_offset: int
    notes_size: int
    spec: SampleSpec = field(repr=False, compare=False, default=None)
    vmcoreinfo_offset: int | None = None  # file offset of the VMCOREINFO note's desc
    vmcoreinfo_size: int = 0

    def expected_bytes(self, paddr: int, length: int) -> bytes:
        return expected_bytes(self.spec, paddr, length)


# --------------------------------------------------------------------------
# ELF structures, described once per class; byte order is applied on use.


class _ElfFormat(NamedTuple):
    ehdr_format: str
    phdr_format: str
    phdr_fields: tuple[str, ...]
    prstatus_head: int  # bytes before pr_reg in struct elf_prstatus
    prstatus_pid: int  # offset of pr_pid
    word_max: int

    @property
    def ehsize(self) -> int:
        return struct.calcsize("<" + self.ehdr_format)

    @property
    def phentsize(self) -> int:
        return struct.calcsize("<" + self.phdr_format)


_ELF_FORMATS = {
    64: _ElfFormat(
        ehdr_format="16sHHIQQQIHHHHHH",
        phdr_format="IIQQQQQQ",
        phdr_fields=("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr",
                     "p_filesz", "p_memsz", "p_align"),
        prstatus_head=112, prstatus_pid=32, word_max=1 << 64),
    32: _ElfFormat(
        ehdr_format="16sHHIIIIIHHHHHH",
        phdr_format="IIIIIIII",
        phdr_fields=("p_type", "p_offset", "p_vaddr", "p_paddr", "p_filesz",
                     "p_memsz", "p_flags", "p_align"),
        prstatus_head=72, prstatus_pid=24, word_max=1 << 32),
}
_NHDR_FORMAT = "III"  # Elf32_Nhdr and Elf64_Nhdr are both three 4-byte words

# sizeof(elf_gregset_t) per (e_machine, ELF class): the kernel's pr_reg.
_PR_REG_BYTES = {
    (EM_X86_64, 64): 27 * 8,
    (EM_386, 32): 17 * 4,
    (EM_AARCH64, 64): 34 * 8,
    (EM_PPC64, 64): 48 * 8,
    (EM_PPC, 32): 48 * 4,
    (EM_S390, 64): 16 + 16 * 8 + 16 * 4 + 8,  # psw, gprs, acrs, orig_gpr2
    (EM_S390, 32): 8 + 16 * 4 + 16 * 4 + 4,
    (EM_ARM, 32): 18 * 4,
}


def prstatus_size(machine: int, elf_class: int) -> int:
    """sizeof(struct elf_prstatus) for the arch: head, pr_reg, pr_fpvalid, tail padding."""
    fmt = _ELF_FORMATS[elf_class]
    pr_reg = _PR_REG_BYTES.get((machine, elf_class), _PR_REG_BYTES[(EM_X86_64, 64)]
                               if elf_class == 64 else _PR_REG_BYTES[(EM_386, 32)])
    align = elf_class // 8
    return _roundup(fmt.prstatus_head + pr_reg + 4, align)


def _endian(spec: SampleSpec) -> str:
    return struct_prefix(spec.byte_order)


def _pack_ehdr(spec: SampleSpec, phoff: int, phnum: int) -> bytes:
    fmt = _ELF_FORMATS[spec.elf_class]
    ident = b"\x7fELF" + bytes([
        1 if spec.elf_class == 32 else 2,  # EI_CLASS
        1 if spec.byte_order == "little" else 2,  # EI_DATA
        EV_CURRENT,  # EI_VERSION
        0,  # EI_OSABI: System V, as the kernel writes
    ])
    ident = ident.ljust(16, b"\0")
    return struct.pack(_endian(spec) + fmt.ehdr_format,
                       ident, ET_CORE, spec.machine, EV_CURRENT,
                       0, phoff, 0, 0,  # e_entry, e_phoff, e_shoff, e_flags
                       fmt.ehsize, fmt.phentsize, phnum, 0, 0, 0)


def _pack_phdr(spec: SampleSpec, **values: int) -> bytes:
    fmt = _ELF_FORMATS[spec.elf_class]
    for name, value in values.items():
        if not 0 <= value < fmt.word_max:
            raise ValueError(f"{name} {value:#x} of the segment at paddr {values['p_paddr']:#x} "
                             f"does not fit an ELF{spec.elf_class} program header")
    return struct.pack(_endian(spec) + fmt.phdr_format, *(values[f] for f in fmt.phdr_fields))


def _note(spec: SampleSpec, name: bytes, note_type: int, desc: bytes) -> bytes:
    """One note record: Nhdr, NUL-terminated name and desc, each padded to 4 bytes."""
    name += b"\0"
    return (struct.pack(_endian(spec) + _NHDR_FORMAT, len(name), len(desc), note_type)
            + name.ljust(_roundup(len(name), 4), b"\0")
            + desc.ljust(_roundup(len(desc), 4), b"\0"))


def default_vmcoreinfo(spec: SampleSpec) -> dict[str, str]:
    """The VMCOREINFO entries a sample carries unless its spec says otherwise.

    Formats follow kernel/vmcore_info.c: SYMBOL as bare hex, NUMBER as decimal.
    """
    swapper_pg_dir = 0xFFFFFFFF82A0C000 if spec.elf_class == 64 else 0xC1A0C000
    return {
        "OSRELEASE": "6.1.0-vmcap-sample",
        "PAGESIZE": str(spec.page_size),
        "CRASHTIME": "1700000000",
        "SYMBOL(swapper_pg_dir)": f"{swapper_pg_dir:x}",
        "NUMBER(phys_base)": "0",
        # drgn needs this for kdump files (it cannot tell 4- from 5-level paging).
        "NUMBER(pgtable_l5_enabled)": "0",
        "KERNELOFFSET": "0",
    }


def vmcoreinfo_text(spec: SampleSpec) -> bytes:
    entries = default_vmcoreinfo(spec) if spec.vmcoreinfo is None else spec.vmcoreinfo
    return "".join(f"{key}={value}\n" for key, value in entries.items()).encode()


def _notes(spec: SampleSpec) -> tuple[bytes, int | None, int]:
    """The merged PT_NOTE contents: one "CORE" NT_PRSTATUS per CPU, then VMCOREINFO.

    Returns (notes, offset of the VMCOREINFO desc within them or None, its size).
    """
    fmt = _ELF_FORMATS[spec.elf_class]
    size = prstatus_size(spec.machine, spec.elf_class)
    notes = bytearray()
    for cpu in range(spec.cpus):
        prstatus = bytearray(size)
        struct.pack_into(_endian(spec) + "I", prstatus, fmt.prstatus_pid, cpu + 1)
        notes += _note(spec, b"CORE", NT_PRSTATUS, bytes(prstatus))
    if spec.vmcoreinfo == {}:
        return bytes(notes), None, 0
    text = vmcoreinfo_text(spec)
    desc_at = len(notes) + struct.calcsize(_NHDR_FORMAT) + _roundup(len(b"VMCOREINFO\0"), 4)
    notes += _note(spec, b"VMCOREINFO", NT_VMCOREINFO, text)
    return bytes(notes), desc_at, len(text)


# --------------------------------------------------------------------------
# Layout: where every byte goes (pure)


def _roundup(value: int, align: int) -> int:
    return -(-value // align) * align


def _rounddown(value: int, align: int) -> int:
    return value // align * align


@dataclass(frozen=True)
class _Plan:
    header: bytes  # ELF header + program headers, written at 0 (gaps zero)
    notes: bytes
    info: VmcoreInfo


def plan_sample(spec: SampleSpec, path: str | os.PathLike | None = None) -> VmcoreInfo:
    """The layout build_vmcore(path, spec) would write, without writing it."""
    return _plan(spec, path).info


def _plan(spec: SampleSpec, path=None) -> _Plan:
    fmt = _ELF_FORMATS[spec.elf_class]
    ps = spec.page_size
    ehsize = fmt.ehsize
    phentsize = fmt.phentsize
    phnum = 1 + len(spec.ranges)
    phoff = ehsize if spec.phoff is None else spec.phoff
    header_end = phoff + phnum * phentsize
    notes, vmcoreinfo_at, vmcoreinfo_size = _notes(spec)

    if spec.layout == "proc":
        # merge_note_headers_elf64: the ELF buffer and the notes buffer are
        # each rounded up to a page; chunks follow.
        notes_offset = _roundup(header_end, ps)
        cursor = notes_offset + _roundup(len(notes), ps)
    else:
        notes_offset = header_end
        cursor = notes_offset + len(notes)

    segments = []
    for index, r in enumerate(spec.ranges, start=1):
        if spec.layout == "proc":
            # process_ptload_program_headers_elf64: chunk [rounddown(paddr), roundup(end))
            chunk_start = _rounddown(r.paddr, ps)
            chunk_end = _roundup(r.paddr + r.size, ps)
            offset = cursor + (r.paddr - chunk_start)
            cursor += chunk_end - chunk_start
        elif spec.layout == "aligned":
            offset = _roundup(cursor, ps)
            cursor = offset + r.file_size
        else:
            offset = cursor
            cursor = offset + r.file_size
        segments.append(SampleSegment(index, r.paddr, spec.vaddr_of(r), offset, r.file_size, r.size))
    file_size = cursor

    # Everything after the notes that is no segment's file data is poison.
    poison = []
    at = notes_offset + len(notes)
    for seg in sorted(segments, key=lambda s: s.offset):
        if seg.offset > at:
            poison.append((at, seg.offset - at))
        at = max(at, seg.offset + seg.filesz)
    if file_size > at:
        poison.append((at, file_size - at))

    phdrs = [_pack_phdr(spec, p_type=PT_NOTE, p_flags=0, p_offset=notes_offset, p_vaddr=0,
                        p_paddr=0, p_filesz=len(notes), p_memsz=len(notes), p_align=0)]
    for seg in segments:
        phdrs.append(_pack_phdr(spec, p_type=PT_LOAD, p_flags=PF_RWX, p_offset=seg.offset,
                                p_vaddr=seg.vaddr, p_paddr=seg.paddr, p_filesz=seg.filesz,
                                p_memsz=seg.memsz, p_align=0))
    header = bytearray(header_end)
    header[:ehsize] = _pack_ehdr(spec, phoff, phnum)
    header[phoff:header_end] = b"".join(phdrs)

    info = VmcoreInfo(
        path=None if path is None else Path(path),
        file_size=file_size,
        segments=tuple(segments),
        page_size=ps,
        non_ram_file_ranges=tuple(poison),
        notes_offset=notes_offset,
        notes_size=len(notes),
        spec=spec,
        vmcoreinfo_offset=None if vmcoreinfo_at is None else notes_offset + vmcoreinfo_at,
        vmcoreinfo_size=vmcoreinfo_size,
    )
    return _Plan(bytes(header), notes, info)


# --------------------------------------------------------------------------
# RAM content: a function of the physical address only


_PATTERN_KEY = 0x5A3C6E1F2D4B7A19  # every byte < 0x80, so a pattern byte is never POISON
_PATTERN_WORDS = _BLOCK_BYTES // 8  # words per pattern block; a power of two


def _spread7(value: int) -> int:
    """Spread 56 bits into 8 bytes of 7 bits each (bit 7 of every byte clear)."""
    out = 0
    for group in range(8):
        out |= ((value >> (7 * group)) & 0x7F) << (8 * group)
    return out


def pattern_word(paddr: int) -> int:
    """The value of the 8-byte word at 8-aligned paddr in "pattern" content.

    It is paddr >> 3 spread over 7 bits per byte, XOR a constant whose bytes
    are below 0x80: injective (a misplaced word is detectable) and never
    containing the POISON byte. Stored in the spec's byte order.
    """
    return _spread7(paddr >> 3) ^ _PATTERN_KEY


def _bswap64(value: int) -> int:
    return int.from_bytes(value.to_bytes(8, "little"), "big")


def _spread7_array(values: np.ndarray, groups: int = 8) -> np.ndarray:
    """_spread7 of each element of a uint64 array below 2**(7 * groups)."""
    out = np.zeros_like(values)
    for group in range(groups):
        out |= ((values >> np.uint64(7 * group)) & np.uint64(0x7F)) << np.uint64(8 * group)
    return out


@functools.lru_cache(maxsize=2)
def _pattern_template(byte_order: str) -> np.ndarray:
    """spread7(i) for i in [0, _PATTERN_WORDS), as raw words whose bytes are in byte_order."""
    out = _spread7_array(np.arange(_PATTERN_WORDS, dtype=np.uint64), groups=3)  # < 2**21
    if byte_order != sys.byteorder:
        out.byteswap(inplace=True)
    out.flags.writeable = False
    return out


def _pattern_blocks(spec: SampleSpec, paddr: int, length: int) -> Iterator[np.ndarray]:
    template = _pattern_template(spec.byte_order)
    end = paddr + length
    block_paddr = _rounddown(paddr, _BLOCK_BYTES)
    while block_paddr < end:
        # The block's words are base + i with i < _PATTERN_WORDS and base a
        # multiple of it, so their spread bits are disjoint: spread(base + i)
        # = spread(base) ^ spread(i). Byte swapping commutes with XOR.
        high = _spread7(block_paddr >> 3) ^ _PATTERN_KEY
        if spec.byte_order != sys.byteorder:
            high = _bswap64(high)
        words = template ^ np.uint64(high)
        lo = max(paddr - block_paddr, 0)
        hi = min(end - block_paddr, _BLOCK_BYTES)
        yield words.view(np.uint8)[lo:hi]
        block_paddr += _BLOCK_BYTES


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _mix64_int(value: int) -> int:
    return int(_mix64(np.array([value & (2**64 - 1)], dtype=np.uint64))[0])


# x86_64-like instructions: (bytes, immediate kind). Immediate kinds:
# "rel32" (small signed displacement: low bytes vary, high bytes 00/ff),
# "d8" (stack/struct displacement), "i32" (small constant). 0xa5 (movs) is
# left out so that no text byte is POISON.
_TEXT_INSNS = (
    (b"\x48\x89\xe5", None, 4), (b"\x41\x54", None, 2), (b"\x53", None, 3),
    (b"\x5b", None, 3), (b"\x41\x5c", None, 2), (b"\xe8", "rel32", 10),
    (b"\xe9", "rel32", 2), (b"\x74", "d8", 5), (b"\x75", "d8", 5), (b"\xeb", "d8", 3),
    (b"\x0f\x84", "rel32", 2), (b"\x0f\x85", "rel32", 2), (b"\x48\x8b\x45", "d8", 6),
    (b"\x48\x89\x45", "d8", 4), (b"\x48\x8b\x47", "d8", 6), (b"\x48\x8b\x87", "i32", 3),
    (b"\x8b\x47", "d8", 3), (b"\x48\x89\xdf", None, 4), (b"\x4c\x89\xe6", None, 3),
    (b"\x48\x89\xc7", None, 4), (b"\x31\xc0", None, 4), (b"\x48\x85\xc0", None, 4),
    (b"\x85\xc0", None, 3), (b"\x48\x83\xf8", "d8", 3), (b"\x48\x83\xc4", "d8", 2),
    (b"\x48\x83\xec", "d8", 2), (b"\xb8", "i32", 3), (b"\xbe", "i32", 2),
    (b"\x48\x8d\x3d", "rel32", 3), (b"\x48\xc7\xc7", "i32", 2),
    (b"\x0f\x1f\x44\x00\x00", None, 2), (b"\x66\x90", None, 1),
)
_TEXT_PROLOGUE = b"\xf3\x0f\x1e\xfa\x55\x48\x89\xe5"  # endbr64; push %rbp; mov %rsp,%rbp
_TEXT_EPILOGUE = b"\x5d\xc3"  # pop %rbp; ret
_TEXT_PAD = 0xCC  # int3 between functions


class _Pools(NamedTuple):
    seed_key: int
    text: np.ndarray  # (n, page_size) uint8
    text_vary: np.ndarray  # (n, page_size) bool: immediate bytes that vary per page
    random: np.ndarray  # (n, page_size) uint8, no POISON bytes


def _text_stream(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel-text-like bytes: functions of instruction-like sequences, int3-padded."""
    weights = np.array([w for _, _, w in _TEXT_INSNS], dtype=float)
    weights /= weights.sum()
    out = bytearray()
    vary = bytearray()
    while len(out) < length:
        out += _TEXT_PROLOGUE
        vary += bytes(len(_TEXT_PROLOGUE))
        for k in rng.choice(len(_TEXT_INSNS), size=int(rng.integers(4, 40)), p=weights):
            insn, imm, _ = _TEXT_INSNS[k]
            out += insn
            vary += bytes(len(insn))
            if imm == "rel32":
                out += int(rng.integers(-(1 << 20), 1 << 20)).to_bytes(4, "little", signed=True)
                vary += b"\1\1\0\0"
            elif imm == "d8":
                out += bytes([int(rng.integers(0, 16)) * 8 ^ (0xF8 if rng.random() < 0.2 else 0)])
                vary += b"\0"
            elif imm == "i32":
                out += int(rng.integers(0, 1 << 12)).to_bytes(4, "little")
                vary += b"\1\0\0\0"
        out += _TEXT_EPILOGUE
        vary += bytes(len(_TEXT_EPILOGUE))
        pad = _roundup(len(out), 16) - len(out)
        out += bytes([_TEXT_PAD]) * pad
        vary += bytes(pad)
    text = np.frombuffer(bytes(out[:length]), dtype=np.uint8)
    return np.where(text == POISON[0], _POISON_SUBSTITUTE, text).astype(np.uint8), \
        np.frombuffer(bytes(vary[:length]), dtype=bool)


@functools.lru_cache(maxsize=4)
def _mixed_pools(seed: int, page_size: int) -> _Pools:
    rng = np.random.default_rng(seed)
    n = max(2, min(16, (1 << 20) // page_size))
    text, vary = _text_stream(rng, n * page_size)
    random = rng.integers(0, 256, size=(n, page_size), dtype=np.uint8)
    random[random == POISON[0]] = _POISON_SUBSTITUTE
    for a in (text, vary, random):
        a.flags.writeable = False
    return _Pools(_mix64_int(seed ^ 0x6A09E667F3BCC909), text.reshape(n, page_size),
                  vary.reshape(n, page_size), random)


# Page kinds of "mixed" content, chosen by the top 4 bits of hash(seed, pfn):
# 8/16 zero, 3/16 text-like, 2/16 random, 3/16 sparse.
_KIND_OF_HASH = np.array([0] * 8 + [1] * 3 + [2] * 2 + [3] * 3, dtype=np.uint8)
_ZERO, _TEXT, _RANDOM, _SPARSE = range(4)


def page_kinds(spec: SampleSpec, first_pfn: int, count: int) -> np.ndarray:
    """The "mixed" kind (0 zero, 1 text, 2 random, 3 sparse) of each page frame."""
    pools = _mixed_pools(spec.seed, spec.page_size)
    pfns = np.arange(first_pfn, first_pfn + count, dtype=np.uint64)
    return _KIND_OF_HASH[_mix64(pfns ^ np.uint64(pools.seed_key)) >> np.uint64(60)]


def _mixed_pages(spec: SampleSpec, first_pfn: int, count: int) -> np.ndarray:
    """count pages of "mixed" content from first_pfn, as a (count, page_size) array."""
    ps = spec.page_size
    pools = _mixed_pools(spec.seed, ps)
    n_pool = len(pools.random)
    pfns = np.arange(first_pfn, first_pfn + count, dtype=np.uint64)
    h = _mix64(pfns ^ np.uint64(pools.seed_key))
    kinds = _KIND_OF_HASH[h >> np.uint64(60)]
    # Per-page variation so that no two pages repeat (a compressor with a long
    # window must not find whole-page matches): XOR an 8-byte per-pfn key into
    # random bytes.
    key = _mix64(h)
    text_sel = (h >> np.uint64(8)) % np.uint64(n_pool)
    rand_sel = (h >> np.uint64(16)) % np.uint64(n_pool)
    out = np.zeros((count, ps), dtype=np.uint8)

    rows = np.flatnonzero(kinds == _RANDOM)
    if rows.size:
        varied = pools.random[rand_sel[rows]]
        varied.view(np.uint64)[...] ^= key[rows, None]
        out[rows] = varied
    rows = np.flatnonzero(kinds == _TEXT)
    if rows.size:
        varied = pools.random[rand_sel[rows]]
        varied.view(np.uint64)[...] ^= key[rows, None]
        t = text_sel[rows]
        out[rows] = np.where(pools.text_vary[t], varied, pools.text[t])
    rows = np.flatnonzero(kinds == _SPARSE)
    if rows.size:
        # Mostly zero, one word in eight set (like slab objects and page
        # tables); the words are "pattern" words, so no two pages repeat.
        stride = 64
        word_paddrs = pfns[rows, None] * np.uint64(ps) + np.arange(0, ps, stride, dtype=np.uint64)
        words = _spread7_array(word_paddrs >> np.uint64(3)) ^ np.uint64(_PATTERN_KEY)
        if spec.byte_order != sys.byteorder:
            words.byteswap(inplace=True)
        out.view(np.uint64)[rows, ::stride // 8] = words
    flat = out.reshape(-1)
    np.putmask(flat, flat == POISON[0], _POISON_SUBSTITUTE)
    return out


def _mixed_blocks(spec: SampleSpec, paddr: int, length: int) -> Iterator[np.ndarray]:
    ps = spec.page_size
    pages_per_block = max(1, _BLOCK_BYTES // ps)
    end = paddr + length
    pfn = paddr // ps
    end_pfn = -(-end // ps)
    while pfn < end_pfn:
        count = min(pages_per_block, end_pfn - pfn)
        block = _mixed_pages(spec, pfn, count).reshape(-1)
        block_paddr = pfn * ps
        lo = max(paddr - block_paddr, 0)
        hi = min(end - block_paddr, count * ps)
        yield block[lo:hi]
        pfn += count


def _zero_blocks(spec: SampleSpec, paddr: int, length: int) -> Iterator[np.ndarray]:
    zeros = np.zeros(min(length, _BLOCK_BYTES), dtype=np.uint8)
    while length > 0:
        n = min(length, _BLOCK_BYTES)
        yield zeros[:n]
        length -= n


_CONTENT_BLOCKS = {"pattern": _pattern_blocks, "mixed": _mixed_blocks, "zero": _zero_blocks}


def content_blocks(spec: SampleSpec, paddr: int, length: int) -> Iterator[np.ndarray]:
    """RAM content of [paddr, paddr + length) as uint8 arrays of at most 1 MiB."""
    if paddr < 0 or length < 0:
        raise ValueError(f"bad range: paddr {paddr:#x}, length {length}")
    if length == 0:
        return iter(())
    return _CONTENT_BLOCKS[spec.content](spec, paddr, length)


def expected_bytes(spec: SampleSpec, paddr: int, length: int) -> bytes:
    """The RAM content at [paddr, paddr + length) as build_vmcore writes it.

    A function of paddr only, defined for any paddr (inside a segment or not),
    so overlapping segments agree. Bytes a segment has only in p_memsz are
    zero by ELF rules, not these.
    """
    out = bytearray(length)
    at = 0
    for block in content_blocks(spec, paddr, length):
        out[at:at + len(block)] = block.data
        at += len(block)
    return bytes(out)


# --------------------------------------------------------------------------
# Writing


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"short write at offset {offset:#x}")
        view = view[written:]
        offset += written


def build_vmcore(path: str | os.PathLike, spec: SampleSpec) -> VmcoreInfo:
    """Write the sample vmcore described by spec to path (replacing it); say what was written.

    Memory use is bounded (1 MiB blocks). "zero" content is left as holes.
    """
    plan = _plan(spec, path)
    info = plan.info
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, info.file_size)
        _pwrite_all(fd, plan.header, 0)
        _pwrite_all(fd, plan.notes, info.notes_offset)
        poison = POISON * min(_BLOCK_BYTES, max((n for _, n in info.non_ram_file_ranges), default=0))
        for offset, length in info.non_ram_file_ranges:
            for at in range(0, length, _BLOCK_BYTES):
                _pwrite_all(fd, poison[:min(_BLOCK_BYTES, length - at)], offset + at)
        if spec.content != "zero":
            for seg in info.segments:
                at = seg.offset
                for block in content_blocks(spec, seg.paddr, seg.filesz):
                    _pwrite_all(fd, block, at)
                    at += len(block)
    finally:
        os.close(fd)
    return info


# --------------------------------------------------------------------------
# The demo


def demo_spec() -> SampleSpec:
    """A realistic x86_64 /proc/vmcore in miniature (about 24 MiB), e820-style.

    Every fractional-page situation /proc/vmcore produces appears once:
    a range ending mid-page (low memory up to 0x9fbff, EBDA reserved after),
    one starting mid-page (an ACPI table reserved just before it), a sub-page
    range, two ranges sharing one page, and the kernel-text PT_LOAD overlapping
    main RAM, like crash_prepare_elf64_headers() emits. No filesz < memsz:
    /proc/vmcore never has it.
    """
    return SampleSpec(
        ranges=(
            RamRange(KERNEL_TEXT_VADDR - 0xFFFFFFFF80000000, 0x200000, vaddr=KERNEL_TEXT_VADDR),
            RamRange(0x1000, 0x9FC00 - 0x1000),  # System RAM 0x1000-0x9fbff
            RamRange(0x100000, 0x1300000 - 0x100000),  # main RAM, holds the kernel
            RamRange(0x1400400, 0x1480000 - 0x1400400),  # after ACPI data 0x1400000-0x14003ff
            RamRange(0x1500100, 0x800),  # sub-page RAM between two reserved ranges
            RamRange(0x1600000, 0x1620800 - 0x1600000),  # ...-0x16207ff
            RamRange(0x1620800, 0x1640000 - 0x1620800),  # 0x1620800-..., same page
            RamRange(0x100000000, 0x200000),  # RAM above 4 GiB
        ),
        cpus=4,
        content="mixed",
        seed=2013,
    )
