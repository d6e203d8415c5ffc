#!/usr/bin/env python3
"""riscv64_kept_pfns.py KDUMP [LABEL]: the pages a kdump-compressed file stores, as pfn runs.

Reads the 2nd (dumped pages) bitmap and the page descriptors of a file in makedumpfile's
kdump-compressed format (diskdump_mgmt.h; 64-bit little-endian header: block_size at 428,
sub_hdr_size at 432, bitmap_blocks at 436; 24-byte page_desc: offset, size, flags, page_flags).
A page in the bitmap is either stored with its own data ("kept") or points at the one zero page
both makedumpfile and vmcap write for -d 1 ("zero": a descriptor offset shared by several pfns).
Prints "kept FIRST END" and "zero FIRST END" lines (hex, END exclusive), after a # summary line;
with LABEL, "LABEL FIRST END" lines for every page in the bitmap, whichever way it is stored
(without -d 1 makedumpfile stores each zero page, vmcap shares one: the same pages either way).
Used by make-riscv64-dump.sh on makedumpfile's output and by tests/test_arch_riscv64.py on vmcap's.
"""
import struct
import sys
from collections import Counter

import numpy as np


def stored_pfns(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(pfns stored with data, pfns stored as the shared zero page), both sorted."""
    with open(path, "rb") as f:
        header = f.read(448)
        if header[:8] != b"KDUMP   ":
            raise ValueError(f"{path}: not a kdump-compressed file")
        block_size, sub_hdr_size, bitmap_blocks = struct.unpack_from("<iiI", header, 428)
        half = bitmap_blocks * block_size // 2
        f.seek((1 + sub_hdr_size) * block_size + half)
        bitmap = np.frombuffer(f.read(half), np.uint8)
        pfns = np.flatnonzero(np.unpackbits(bitmap, bitorder="little"))
        f.seek((1 + sub_hdr_size + bitmap_blocks) * block_size)
        descriptors = np.frombuffer(f.read(24 * len(pfns)), np.dtype([("offset", "<i8"), ("size", "<u4"),
                                                                       ("flags", "<u4"), ("page_flags", "<u8")]))
    counts = Counter(descriptors["offset"].tolist())
    shared = [offset for offset, n in counts.items() if n > 1]
    zero = np.isin(descriptors["offset"], shared)
    return pfns[~zero], pfns[zero]


def runs(pfns: np.ndarray) -> list[tuple[int, int]]:
    if len(pfns) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1)
    starts = np.concatenate(([pfns[0]], pfns[breaks + 1]))
    ends = np.concatenate((pfns[breaks], [pfns[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def parse(text: str) -> dict[str, np.ndarray]:
    """The pfn arrays by label ("kept", "zero", or a LABEL) from this script's output."""
    found: dict[str, list[np.ndarray]] = {"kept": [], "zero": []}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            kind, first, end = line.split()
            found.setdefault(kind, []).append(np.arange(int(first, 16), int(end, 16)))
    return {kind: np.concatenate(parts) if parts else np.zeros(0, np.int64) for kind, parts in found.items()}


def main() -> None:
    kept, zero = stored_pfns(sys.argv[1])
    if len(sys.argv) > 2:
        label, dumped = sys.argv[2], np.union1d(kept, zero)
        print(f"# {label}: {len(dumped)} pfns in the bitmap")
        groups = ((label, dumped),)
    else:
        print(f"# {len(kept)} pfns stored with data, {len(zero)} as the shared zero page")
        groups = (("kept", kept), ("zero", zero))
    for kind, pfns in groups:
        for first, end in runs(pfns):
            print(f"{kind} {first:#x} {end:#x}")


if __name__ == "__main__":
    main()
