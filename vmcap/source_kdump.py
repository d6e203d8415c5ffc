"""A kdump-compressed file (plain or flattened) as a source: its memory and its ELF view.

``KdumpMemory`` is the physical-memory face of a KdumpReader (read(paddr,
size), the stored ranges, granules in bulk); ``open_kdump_view`` wraps it
in an elfview.ElfCoreView, so `vmcap save` copies, converts and re-filters
a kdump file through the same path as an ELF core.

The granule is the kdump block size. It is the kernel's page size for
makedumpfile's files, but QEMU's arm64 kdump files use 64 KiB blocks for
4 KiB-page kernels: the ELF view then has 64 KiB-aligned segments and the
kernel page size comes from VMCOREINFO, as for any ELF core.
"""

from __future__ import annotations

import re

from .elfview import ElfCoreView, ElfIdentity, view_notes
from .errors import BadSource, Unsupported
from .kdump import KdumpReader
from .layout import (EM_386, EM_AARCH64, EM_ARM, EM_LOONGARCH, EM_PPC, EM_PPC64, EM_RISCV,
                     EM_S390, EM_X86_64)

# The kdump header's utsname machine -> ELF e_machine (the inverse of
# kdump.utsname_machine, with the names other tools write).
_E_MACHINE = (
    (r"x86_64", EM_X86_64),
    (r"i[3-6]86", EM_386),
    (r"aarch64|arm64", EM_AARCH64),
    (r"arm.*", EM_ARM),
    (r"ppc64(le)?", EM_PPC64),
    (r"ppc", EM_PPC),
    (r"s390x?", EM_S390),
    (r"riscv64", EM_RISCV),
    (r"loongarch64", EM_LOONGARCH),
)


def e_machine_of(machine: str) -> int:
    for pattern, number in _E_MACHINE:
        if re.fullmatch(pattern, machine):
            return number
    raise Unsupported(f"kdump header machine {machine!r} has no ELF machine vmcap knows")


class KdumpMemory:
    """Physical memory of a kdump file; pages the dump left out read as zeros."""

    def __init__(self, reader: KdumpReader):
        self.reader = reader
        self.name = reader.name
        self.granule = reader.header.page_size

    def present_runs(self):
        return list(self.reader.iter_present_runs())

    def dumped_runs(self):
        return list(self.reader.iter_dumped_runs())

    def stored_ranges(self):
        """(paddr, length) of the memory whose bytes are in the file."""
        return [(first * self.granule, count * self.granule) for first, count in self.dumped_runs()]

    def read_dumped_into(self, first: int, out: memoryview) -> None:
        self.reader.read_dumped_pages_into(first, out)

    def read(self, paddr: int, size: int) -> bytes:
        return self.reader.pread_physical(paddr, size)


def open_kdump_view(path: str) -> tuple[ElfCoreView, int]:
    """(the ELF view of a kdump or flattened kdump file, the dump level it was saved at)."""
    try:
        reader = KdumpReader(path)
    except OSError as e:
        raise BadSource(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        header = reader.header
        identity = ElfIdentity(elf_class=header.elf_class, byte_order=header.byte_order,
                               e_machine=e_machine_of(header.machine), source_name=str(path))
        notes = view_notes(reader.notes, reader.vmcoreinfo.rstrip(b"\0"), header.byte_order)
        view = ElfCoreView(KdumpMemory(reader), identity, notes, closer=reader.close)
    except BaseException:
        reader.close()
        raise
    return view, header.dump_level
