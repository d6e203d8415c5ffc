"""What every kernel-virtual layer (vmcap/kernel*.py) shares: the physical reader and runs of reads."""

from __future__ import annotations

from typing import Callable

ReadPhysical = Callable[[int, int], bytes]


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
