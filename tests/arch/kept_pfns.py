#!/usr/bin/env python3
"""kept_pfns.py DUMP.kdump: the pfns a kdump-compressed file keeps (its 2nd, "dumped" bitmap), as
"start end" lines (end exclusive), read with vmcap's kdump reader. Used on makedumpfile's -d 31
output to record which pages makedumpfile keeps, and by the tests on vmcap's own output."""
import sys

import numpy as np

from vmcap.formats.kdump import KdumpReader


def kept_ranges(path: str) -> list[tuple[int, int]]:
    reader = KdumpReader(path)
    try:
        bits = np.unpackbits(reader.bitmaps.dumped, bitorder="little")
    finally:
        reader.close()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


if __name__ == "__main__":
    for start, end in kept_ranges(sys.argv[1]):
        print(start, end)
