"""Page codecs of the kdump-compressed format: each page compressed on its own.

makedumpfile stores every dumped page as one independent unit, compressed
with the method chosen for the whole file and flagged in the page's
descriptor (diskdump_mod.h): zlib 0x1 (`-c`), LZO1X 0x2 (`-l`), snappy raw
format 0x4 (`-p`), zstd 0x20 (`-z`), 0 for a page stored as it is.

A compressor takes a batch of pages (rows of a 2-D uint8 array) and returns
one compressed unit per row asked for; `encode_pages` applies makedumpfile's
rule that a page which does not shrink is stored raw. `decode_page` turns one
stored unit back into a page, and raises PageDataError when the bytes do not
decode to exactly one page.

Libraries: zlib (stdlib) and python-zstandard as before; LZO through
python-lzo (liblzo2's lzo1x_1, like makedumpfile, when installed), else
lzallright (a Rust port of LZ👌, which releases the GIL) or, where it is not
installed (it needs Python 3.11), lzokay (C++, holds the GIL); snappy through
cramjam. Any LZO1X compressor's output is valid for the readers: crash and
makedumpfile decompress with liblzo2's lzo1x_decompress_safe.
"""

from __future__ import annotations

import threading
import zlib
from typing import Callable, Protocol, Sequence

import numpy as np
import zstandard

from ..errors import Unsupported

# Descriptor flags (diskdump_mod.h); the header's `status` carries the flag
# of the method used for the whole file.
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_ZSTD = 0x20

PAGE_FLAG = {
    "none": 0,
    "zlib": DUMP_DH_COMPRESSED_ZLIB,
    "lzo": DUMP_DH_COMPRESSED_LZO,
    "snappy": DUMP_DH_COMPRESSED_SNAPPY,
    "zstd": DUMP_DH_COMPRESSED_ZSTD,
}
PAGE_COMPRESSION_FLAGS = (DUMP_DH_COMPRESSED_ZLIB | DUMP_DH_COMPRESSED_LZO | DUMP_DH_COMPRESSED_SNAPPY
                          | DUMP_DH_COMPRESSED_ZSTD)

# makedumpfile compresses each page at the fastest setting (Z_BEST_SPEED,
# ZSTD level 1): the capture kernel is short of CPU and time, not of disk.
# LZO and snappy have no levels.
DEFAULT_LEVEL = {"zlib": 1, "zstd": 1}


class PageDataError(ValueError):
    """Stored page bytes that do not decode to one page; the caller says where."""


class PageCompressor(Protocol):
    def compress(self, pages: np.ndarray, rows: np.ndarray) -> Sequence:
        """One compressed unit (bytes-like) per index in rows, in order."""

    def close(self) -> None:
        ...


# --------------------------------------------------------------------------
# Library loading: only when a codec is used, so zstd and zlib dumps never
# need the LZO or snappy packages.

def _lzo_backend():
    """(compress_factory, decompress(data, page_size), releases_gil).

    python-lzo (liblzo2's own lzo1x_1, what makedumpfile -l calls) first:
    about 5 µs a 4 KiB page against 110 µs for lzallright and 380 µs for
    lzokay, whose compressors search for the best match (lzo1x_999-like
    output, ~15% smaller). It is optional: it builds against liblzo2-dev.
    """
    try:
        import lzo
    except ImportError:
        pass
    else:
        # header=False: a raw lzo1x stream, decoded by lzo1x_decompress_safe.
        return ((lambda: lambda page: lzo.compress(page, 1, False)),
                _lzo_decoder(lambda data, size: lzo.decompress(data, False, size), lzo.error), False)
    try:
        import lzallright
    except ImportError:
        pass
    else:
        # An LZOCompressor keeps its match dictionary between calls: one per thread.
        decode = lzallright.LZOCompressor.decompress
        return ((lambda: lzallright.LZOCompressor().compress),
                _lzo_decoder(lambda data, size: decode(data, output_size_hint=size), lzallright.LZOError), True)
    try:
        import lzokay
    except ImportError:
        raise Unsupported("lzo pages need the lzallright (or lzokay) package, which is not "
                          "installed") from None
    return ((lambda: lambda page: lzokay.compress(page.tobytes())),
            _lzo_decoder(lzokay.decompress, lzokay.LzokayError), False)


def _lzo_decoder(decode, library_error):
    """decompress(data, page_size) over one library's call: its errors become PageDataError."""
    def decompress(data, page_size):
        try:
            return decode(bytes(data), page_size)
        except library_error as e:
            raise PageDataError(f"lzo data does not decompress: {e}") from e

    return decompress


def _cramjam_snappy():
    try:
        import cramjam
    except ImportError:
        raise Unsupported("snappy pages need the cramjam package, which is not installed") from None
    return cramjam


# --------------------------------------------------------------------------
# Compressors

def _thread_workers(workers: int, releases_gil: bool) -> int:
    return workers if workers > 1 and releases_gil else 1


class _ZstdPages:
    """One zstd frame per page, the batch shared out among threads by python-zstandard."""

    def __init__(self, level: int, workers: int):
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._threads = workers if workers > 1 else 0

    def compress(self, pages: np.ndarray, rows: np.ndarray) -> list:
        page_size = pages.shape[1]
        segments = np.empty((len(rows), 2), dtype=np.uint64)
        segments[:, 0] = rows.astype(np.uint64) * page_size
        segments[:, 1] = page_size
        batch = zstandard.BufferWithSegments(np.ascontiguousarray(pages), segments)
        frames = self._compressor.multi_compress_to_buffer(batch, threads=self._threads)
        return [frames[i] for i in range(len(frames))]

    def close(self) -> None:
        pass


class _RowPages:
    """One call of a one-page compressor per page; a thread pool when the library releases the GIL.

    make_compress() gives a callable for one thread (codecs with per-call
    state, such as an LZO dictionary, must not be shared between threads).
    """

    def __init__(self, make_compress: Callable[[], Callable], workers: int, name: str):
        self._make_compress = make_compress
        self._local = threading.local()
        self._workers = workers
        self._pool = None
        if workers > 1:
            # Imported here: one CPU (a capture kernel's nr_cpus=1) needs no pool.
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                               thread_name_prefix=f"kdump-{name}")

    def _compress_rows(self, pages: np.ndarray, rows: Sequence[int]) -> list:
        compress = getattr(self._local, "compress", None)
        if compress is None:
            compress = self._local.compress = self._make_compress()
        return [compress(pages[i]) for i in rows]

    def compress(self, pages: np.ndarray, rows: np.ndarray) -> list:
        row_list = rows.tolist()
        if self._pool is None or len(row_list) < 2 * self._workers:
            return self._compress_rows(pages, row_list)
        step = -(-len(row_list) // self._workers)
        parts = [row_list[i:i + step] for i in range(0, len(row_list), step)]
        out: list = []
        for part in self._pool.map(lambda p: self._compress_rows(pages, p), parts):
            out.extend(part)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def page_compressor(name: str, level: int | None, workers: int) -> PageCompressor | None:
    """The compressor for codec `name` (None for "none"); workers >= 1 threads at most."""
    if name not in PAGE_FLAG:
        raise ValueError(f"compress must be one of {sorted(PAGE_FLAG)}, not {name!r}")
    if name == "none":
        return None
    if name == "zstd":
        return _ZstdPages(DEFAULT_LEVEL["zstd"] if level is None else level, workers)
    if name == "zlib":
        zlib_level = DEFAULT_LEVEL["zlib"] if level is None else level
        # zlib releases the GIL while deflating, so a thread pool scales.
        return _RowPages(lambda: lambda page: zlib.compress(page, zlib_level), workers, "zlib")
    if name == "lzo":
        make_compress, _, releases_gil = _lzo_backend()
        return _RowPages(make_compress, _thread_workers(workers, releases_gil), "lzo")
    cramjam = _cramjam_snappy()
    # ~5 µs a page: threads cost more than they give (measured: 2 threads slower).
    return _RowPages(lambda: cramjam.snappy.compress_raw, 1, "snappy")


def encode_pages(compressor: PageCompressor | None, flag: int, pages: np.ndarray, rows: np.ndarray):
    """(data bytes, per-page stored sizes, per-page flags) for pages[rows], in order.

    makedumpfile keeps a page raw when compression does not shrink it;
    readers insist that a raw page is exactly one block.
    """
    page_size = pages.shape[1]
    sizes = np.full(len(rows), page_size, dtype=np.int64)
    flags = np.zeros(len(rows), dtype=np.uint32)
    if compressor is None or not len(rows):
        return (pages if len(rows) == len(pages) else pages[rows]), sizes, flags
    units = compressor.compress(pages, rows)
    unit_sizes = np.fromiter(map(len, units), dtype=np.int64, count=len(units))
    compressed = unit_sizes < page_size
    sizes[compressed] = unit_sizes[compressed]
    flags[compressed] = flag
    if compressed.all():  # the usual case: no per-page choice to make
        return b"".join(units), sizes, flags
    pieces = [unit if is_small else pages[row]
              for unit, row, is_small in zip(units, rows.tolist(), compressed.tolist())]
    return b"".join(pieces), sizes, flags


# --------------------------------------------------------------------------
# Decoding

class PageDecoder:
    """Decodes one stored page by its descriptor's compression flag."""

    def __init__(self, page_size: int):
        self._page_size = page_size
        self._zstd = zstandard.ZstdDecompressor()
        self._lzo = None
        self._cramjam = None

    def decode(self, flag: int, stored: bytes) -> bytes:
        """The page stored as `stored` with compression flag `flag` (0: raw)."""
        page_size = self._page_size
        if flag == 0:
            page = stored
        elif flag == DUMP_DH_COMPRESSED_ZSTD:
            try:
                # A frame may declare any content size; refuse a wrong one
                # before python-zstandard allocates it.
                content_size = zstandard.frame_content_size(stored)
                if content_size not in (-1, page_size):
                    raise PageDataError(f"zstd frame holds {content_size} bytes, not {page_size}")
                page = self._zstd.decompress(stored, max_output_size=page_size)
            except zstandard.ZstdError as e:
                raise PageDataError(f"zstd data does not decompress: {e}") from e
        elif flag == DUMP_DH_COMPRESSED_ZLIB:
            try:
                page = zlib.decompressobj().decompress(stored, page_size + 1)
            except zlib.error as e:
                raise PageDataError(f"zlib data does not decompress: {e}") from e
        elif flag == DUMP_DH_COMPRESSED_LZO:
            if self._lzo is None:
                self._lzo = _lzo_backend()[1]
            page = self._lzo(stored, page_size)
        elif flag == DUMP_DH_COMPRESSED_SNAPPY:
            page = self._snappy(stored)
        else:
            raise PageDataError(f"unknown page compression flags {flag:#x}")
        if len(page) != page_size:
            raise PageDataError(f"page decompresses to {len(page)} bytes, not {page_size}")
        return bytes(page)

    def _snappy(self, stored: bytes) -> bytes:
        if self._cramjam is None:
            self._cramjam = _cramjam_snappy()
        snappy = self._cramjam.snappy
        error = self._cramjam.DecompressionError
        try:
            # The raw format starts with the uncompressed length; check it
            # before anything is allocated for it.
            length = snappy.decompress_raw_len(stored)
            if length != self._page_size:
                raise PageDataError(f"snappy data holds {length} bytes, not {self._page_size}")
            page = bytearray(self._page_size)
            written = snappy.decompress_raw_into(stored, page)
        except error as e:
            raise PageDataError(f"snappy data does not decompress: {e}") from e
        return bytes(page[:written])
