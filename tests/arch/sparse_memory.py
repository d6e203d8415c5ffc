"""Sparse physical memory for the synthetic page-table tests (ppc64, s390x).

Unwritten bytes read as 0; reads past ``size`` are BadSource, as a dump's
read_physical gives for memory it does not hold; every read is recorded.
"""

from __future__ import annotations

from vmcap.errors import BadSource

PAGE = 4096


class SparseMemory:
    def __init__(self, size: int, byte_order: str = "little"):
        self.size = size
        self.byte_order = byte_order  # of u64 values when a call does not say
        self.pages: dict[int, bytearray] = {}
        self.reads: list[tuple[int, int]] = []

    def write(self, paddr: int, data: bytes) -> None:
        while data:
            offset = paddr % PAGE
            piece = data[:PAGE - offset]
            self.pages.setdefault(paddr // PAGE, bytearray(PAGE))[offset:offset + len(piece)] = piece
            paddr, data = paddr + len(piece), data[len(piece):]

    def u64(self, paddr: int, value: int, order: str | None = None) -> None:
        self.write(paddr, value.to_bytes(8, order or self.byte_order))

    def read_physical(self, paddr: int, size: int) -> bytes:
        if paddr < 0 or paddr + size > self.size:
            raise BadSource(f"paddr {paddr:#x} is not in the dump")
        self.reads.append((paddr, size))
        out = bytearray()
        while size:
            piece = min(size, PAGE - paddr % PAGE)
            page = self.pages.get(paddr // PAGE)
            out += page[paddr % PAGE:paddr % PAGE + piece] if page else bytes(piece)
            paddr, size = paddr + piece, size - piece
        return bytes(out)
