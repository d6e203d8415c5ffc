"""XXH64 digests of vmcap outputs, recorded in the VMCAP note and checked by verify.

An output is cut into regions, each with one XXH64 (seed 0) recorded as a
fixed-width line of the VMCAP note (``META_XXH64=<16 hex digits>``):

* ``META``: everything a reader parses before the page data (ELF header,
  program headers and notes; kdump header, sub header, notes and bitmaps),
  hashed with the META value itself written as ``PLACEHOLDER``;
* ``DESC`` (kdump): the page descriptor table, reserved slots included;
* ``DATA``: the data region, hashed as the bytes stream out (it is written
  append-only; holes count as zeros).

A streamed output cannot be rewritten once its data is known, so its note
says ``unknown`` instead of a digest.
"""

from __future__ import annotations

import os

import xxhash

PLACEHOLDER = "0" * 16
UNKNOWN = "unknown"
READ_BYTES = 4 << 20
_ZEROS = bytes(64 << 10)  # fed repeatedly for runs of zeros: small, it is resident all along


class StreamDigest:
    """XXH64 of a byte stream fed in pieces; zeros are fed without allocating them."""

    def __init__(self):
        self._hash = xxhash.xxh64()

    def update(self, data) -> None:
        self._hash.update(data)

    def update_zeros(self, n: int) -> None:
        while n > 0:
            step = min(n, len(_ZEROS))
            self._hash.update(memoryview(_ZEROS)[:step])
            n -= step

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    @staticmethod
    def of(data) -> str:
        return xxhash.xxh64_hexdigest(data)


def hex_value(value: int | str) -> str:
    """A note value of fixed width: 16 hex digits."""
    return value if isinstance(value, str) else f"{value:016x}"


def file_digest(fd: int, start: int, end: int, *, blank_at: int | None = None,
                what: str = "", continue_from: StreamDigest | None = None) -> str:
    """XXH64 of file bytes [start, end), read in bounded pieces.

    ``blank_at``: the file offset of a META value, hashed as PLACEHOLDER.
    ``continue_from``: a digest of the bytes before ``start``, continued.
    Raises EOFError if the file ends before ``end``.
    """
    digest = continue_from or StreamDigest()
    position = start
    while position < end:
        piece = os.pread(fd, min(READ_BYTES, end - position), position)
        if not piece:
            raise EOFError(f"{what} ends at offset {position:#x}, expected {end:#x}")
        if blank_at is not None and position <= blank_at + len(PLACEHOLDER) and blank_at < position + len(piece):
            buffer = bytearray(piece)
            lo = max(blank_at, position)
            hi = min(blank_at + len(PLACEHOLDER), position + len(piece))
            buffer[lo - position:hi - position] = PLACEHOLDER.encode()[lo - blank_at:hi - blank_at]
            piece = bytes(buffer)
        digest.update(piece)
        position += len(piece)
    return digest.hexdigest()


def sparse_file_digest(fd: int, start: int, end: int, written, *, what: str = "",
                       continue_from: StreamDigest | None = None) -> str:
    """file_digest of [start, end) when only the ``written`` byte ranges can be non-zero.

    ``written``: sorted, disjoint (start, end) file ranges; the rest of
    [start, end) was never written to a new file, so it is a hole that reads
    as zeros, and is hashed as zeros without being read. The digest is the
    same as file_digest's; the cost follows what was written, not the span.
    """
    digest = continue_from or StreamDigest()
    position = start
    for lo, hi in written:
        lo, hi = max(lo, position), min(hi, end)
        if lo >= hi:
            continue
        digest.update_zeros(lo - position)
        file_digest(fd, lo, hi, what=what, continue_from=digest)
        position = hi
    digest.update_zeros(end - position)
    return digest.hexdigest()

