"""A kdump-compressed file (plain or flattened) as a source: its memory and its ELF view.

``KdumpMemory`` is the physical-memory face of a KdumpReader (read(paddr,
size), the stored ranges, granules in bulk), ``SplitSetMemory`` that of the
files of a --split set; source.dump.KdumpDump wraps either in an
elfview.ElfCoreView, so `vmcap save` copies, converts and re-filters a kdump
file through the same path as an ELF core.

The granule is the kdump block size. It is the kernel's page size for
makedumpfile's files, but QEMU's arm64 kdump files use 64 KiB blocks for
4 KiB-page kernels: the ELF view then has 64 KiB-aligned segments and the
kernel page size comes from VMCOREINFO, as for any ELF core.
"""

from __future__ import annotations

from bisect import bisect_right

from ..errors import BadSource
from ..formats.kdump import KdumpReader


def refuse_split_part(reader: KdumpReader) -> None:
    """One file of a --split set holds only its pfn range: the dump is all of them."""
    split = reader.split_range
    if split is not None and split != (0, reader.max_mapnr):
        raise BadSource(f"{reader.name}: one file of a makedumpfile --split set (pfns "
                        f"{split[0]:#x}-{split[1]:#x} of {reader.max_mapnr:#x}); give all the "
                        "set's files together")


class KdumpMemory:
    """Physical memory of a kdump file; pages the dump left out read as zeros."""

    sequential = False

    def __init__(self, reader: KdumpReader):
        refuse_split_part(reader)
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


class SplitSetMemory:
    """The files of a makedumpfile --split set as one dump's physical memory.

    Every file has the same headers and 1st bitmap; each stores the pages
    of its own pfn range [start_pfn, end_pfn), and the ranges follow one
    another.
    """

    sequential = False

    def __init__(self, readers: list[KdumpReader]):
        for reader in readers:
            if reader.split_range is None:
                raise BadSource(f"{reader.name}: not a file of a makedumpfile --split set (its "
                                "sub header has no split flag); give one dump file at a time")
        self.readers = sorted(readers, key=lambda r: r.split_range)
        first = self.readers[0]
        self.name = " ".join(r.name for r in self.readers)
        self.granule = first.page_size
        self.header = first.header
        expected = 0
        for reader in self.readers:
            start, end = reader.split_range
            if start != expected:
                what = "overlap" if start < expected else "leave a gap"
                raise BadSource(f"{reader.name}: its pfns start at {start:#x}, the set's files "
                                f"before it end at {expected:#x}: the files {what} (a file "
                                "missing or given twice?)")
            header = reader.header
            if (header.page_size, header.max_mapnr, header.dump_level, header.machine) != (
                    first.header.page_size, first.header.max_mapnr, first.header.dump_level,
                    first.header.machine):
                raise BadSource(f"{reader.name}: its kdump header differs from {first.name}'s: "
                                "not the same dump")
            expected = end
        if expected != first.max_mapnr:
            raise BadSource(f"{self.readers[-1].name}: the set ends at pfn {expected:#x}, not at "
                            f"max_mapnr {first.max_mapnr:#x} (a file missing?)")
        self.ends = [r.split_range[1] for r in self.readers]

    def present_runs(self):
        return list(self.readers[0].iter_present_runs())

    def dumped_runs(self):
        merged: list[list[int]] = []
        for reader in self.readers:
            for first, count in reader.iter_dumped_runs():
                if merged and merged[-1][0] + merged[-1][1] == first:
                    merged[-1][1] += count
                else:
                    merged.append([first, count])
        return [(first, count) for first, count in merged]

    def _owner(self, pfn: int) -> int:
        return bisect_right(self.ends, pfn)

    def read_dumped_into(self, first: int, out: memoryview) -> None:
        granule, done = self.granule, 0
        while done < len(out):
            i = self._owner(first)
            count = min(len(out) // granule - done // granule, self.ends[i] - first)
            self.readers[i].read_dumped_pages_into(first, out[done:done + count * granule])
            first += count
            done += count * granule

    def read(self, paddr: int, size: int) -> bytes:
        parts, granule = [], self.granule
        while size > 0:
            i = min(self._owner(paddr // granule), len(self.readers) - 1)
            take = min(size, self.ends[i] * granule - paddr) if paddr < self.ends[-1] * granule \
                else size
            parts.append(self.readers[i].pread_physical(paddr, take))
            paddr += take
            size -= take
        return b"".join(parts)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
