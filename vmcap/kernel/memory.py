"""What every kernel-virtual layer (vmcap/kernel*.py) shares: the physical reader and runs of reads."""

from __future__ import annotations

from typing import Callable

ReadPhysical = Callable[[int, int], bytes]


def struct_prefix(byte_order: str) -> str:
    """The ``struct`` byte-order prefix of "little" or "big" (kernel data, ELF and kdump fields)."""
    return "<" if byte_order == "little" else ">"


def read_translated(vaddr: int, size: int, translate, read_physical) -> bytes:
    """size bytes at vaddr, one read_physical per physically contiguous run.

    translate(vaddr) gives (paddr, bytes mapped contiguously from there), so a
    large buffer in the kernel image or the linear map costs one read, not
    one per page.
    """
    runs: list[tuple[int, int]] = []  # (paddr, length)
    position, end = vaddr, vaddr + size
    while position < end:
        paddr, mapped = translate(position)
        piece = min(end - position, mapped)
        if runs and runs[-1][0] + runs[-1][1] == paddr:
            runs[-1] = (runs[-1][0], runs[-1][1] + piece)
        else:
            runs.append((paddr, piece))
        position += piece
    return b"".join(read_physical(paddr, length) for paddr, length in runs)


class WalkingTranslator:
    """to_physical and read_virtual for a translator whose translate(vaddr) walks page tables
    and returns (paddr, bytes mapped contiguously from there), reading through _read_physical."""

    _read_physical: ReadPhysical

    def translate(self, vaddr: int) -> tuple[int, int]:  # pragma: no cover - each architecture's own
        raise NotImplementedError

    def to_physical(self, vaddr: int) -> int:
        """The physical address the kernel mapped vaddr to; BadSource if it is not mapped."""
        return self.translate(vaddr)[0]

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """size bytes at kernel virtual address vaddr, one read_physical per physically contiguous run."""
        return read_translated(vaddr, size, self.translate, self._read_physical)


TABLE_CACHE_TABLES = 64


class TableCache:
    """The page tables a translator read last, oldest dropped first: walks read the same
    upper-level tables again and again, and a kernel's are few."""

    def __init__(self, read: ReadPhysical, limit: int = TABLE_CACHE_TABLES):
        self._read = read
        self._limit = limit
        self._tables: dict[int, bytes] = {}

    def get(self, paddr: int, size: int) -> bytes:
        """The size bytes of the table at paddr (a cached longer read serves a shorter one)."""
        table = self._tables.get(paddr)
        if table is None or len(table) < size:
            table = self._read(paddr, size)
            if len(self._tables) >= self._limit:
                del self._tables[next(iter(self._tables))]
            self._tables[paddr] = table
        return table

    def clear(self) -> None:
        """Forget every table (memory under them changed)."""
        self._tables.clear()
