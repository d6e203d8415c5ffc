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
