"""VMCOREINFO: the "KEY=VALUE" lines the crashed kernel left for dump tools.

The kernel writes them with vmcoreinfo_append_str() (kernel/vmcore_info.c,
include/linux/vmcore_info.h), and each kind of key has its own printf format:

    SYMBOL(name)=%lx          hex, no 0x (a runtime, already KASLR-shifted address)
    SIZE(name)=%lu            decimal
    OFFSET(struct.field)=%lu  decimal
    LENGTH(name)=%lu          decimal
    NUMBER(name)=%ld          decimal, may be negative (phys_base, PAGE_BUDDY_MAPCOUNT_VALUE);
                              a few arch lines use 0x%lx instead (NUMBER(VMALLOC_START))
    KERNELOFFSET=%lx          hex, no 0x
    PAGESIZE=%ld              decimal

The getters return None for a key the kernel did not write, or raise
Unsupported naming the key when the caller says it is required: a missing key
means this kernel (version or configuration) lacks what the caller needs, not
that the dump is damaged. A value that does not parse is a damaged dump
(BadSource).
"""

from __future__ import annotations

from typing import Literal, Mapping, overload

from ..errors import BadSource, Unsupported

VmcoreInfo = Mapping[str, str]


def parse_vmcoreinfo(text: bytes) -> dict[str, str]:
    """Parse the VMCOREINFO note's descriptor into {key: value}.

    The note descriptor may be NUL-padded to a 4-byte boundary, so NULs end the
    text. Lines without '=' are ignored. When a key repeats, the first value
    wins, as in makedumpfile (which finds keys with a forward search).
    """
    info: dict[str, str] = {}
    for raw_line in text.split(b"\0", 1)[0].splitlines():
        key, sep, value = raw_line.decode("ascii", errors="replace").partition("=")
        key = key.strip()
        if sep and key and key not in info:
            info[key] = value.strip()
    return info


# Longest value echoed in a message: a damaged note can hold a 5,000-digit "number".
SHOWN_VALUE_CHARS = 40
# Struct sizes and field offsets are a few KiB at most; anything near this is
# a damaged note, and would make readers allocate or index without bound.
MAX_STRUCT_BYTES = 1 << 20
# Array lengths (LENGTH(mem_section) is the largest: NR_SECTION_ROOTS).
MAX_LENGTH = 1 << 32
# Page sizes vmcap accepts: any power of two in this range (Linux uses 4 KiB-1 MiB).
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 1 << 24


def shown(value: str) -> str:
    """A value for a one-line message: repr, cut to SHOWN_VALUE_CHARS with "…"."""
    if len(value) > SHOWN_VALUE_CHARS:
        return repr(value[:SHOWN_VALUE_CHARS]) + f"… ({len(value)} characters)"
    return repr(value)


def is_page_size(value: int) -> bool:
    return MIN_PAGE_SIZE <= value <= MAX_PAGE_SIZE and value & (value - 1) == 0


def _parse_hex(info: VmcoreInfo, key: str) -> int:
    value = info[key]
    try:
        number = int(value, 16)  # int(..., 16) also accepts a leading 0x
    except ValueError:
        raise BadSource(f"VMCOREINFO {key}={shown(value)} is not a hex number") from None
    if not 0 <= number < 1 << 64:
        raise BadSource(f"VMCOREINFO {key}={shown(value)} is not a 64-bit address")
    return number


def _parse_decimal(info: VmcoreInfo, key: str, allow_hex: bool = False) -> int:
    value = info[key]
    try:
        digits = value.lstrip("-")
        if allow_hex and digits[:2].lower() == "0x":
            number = int(value, 16)
        else:
            number = int(value, 10)
    except ValueError:  # also a number too long for int() (sys.get_int_max_str_digits)
        raise BadSource(f"VMCOREINFO {key}={shown(value)} is not a decimal number") from None
    if not -(1 << 63) <= number < 1 << 64:  # %ld or %lu
        raise BadSource(f"VMCOREINFO {key}={shown(value)} does not fit in 64 bits")
    return number


def _bounded(info: VmcoreInfo, key: str, limit: int) -> int:
    number = _parse_decimal(info, key)
    if not 0 <= number < limit:
        raise BadSource(f"VMCOREINFO {key}={shown(info[key])} is not plausible "
                        f"(expected 0 to {limit - 1})")
    return number


def _missing(key: str, required: bool) -> None:
    if required:
        raise Unsupported(f"VMCOREINFO lacks {key}")
    return None


@overload
def symbol(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def symbol(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def symbol(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """SYMBOL(name): the symbol's runtime virtual address."""
    key = f"SYMBOL({name})"
    return _parse_hex(info, key) if key in info else _missing(key, required)


@overload
def size(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def size(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def size(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """SIZE(name): sizeof(struct name) (or of a typedef) in bytes."""
    key = f"SIZE({name})"
    return _bounded(info, key, MAX_STRUCT_BYTES) if key in info else _missing(key, required)


@overload
def offset(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def offset(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def offset(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """OFFSET(struct.field): offsetof(struct, field) in bytes; name is "struct.field"."""
    key = f"OFFSET({name})"
    return _bounded(info, key, MAX_STRUCT_BYTES) if key in info else _missing(key, required)


@overload
def length(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def length(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def length(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """LENGTH(name): an array's element count."""
    key = f"LENGTH({name})"
    return _bounded(info, key, MAX_LENGTH) if key in info else _missing(key, required)


@overload
def number(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def number(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def number(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """NUMBER(name): a signed constant (%ld), or 0x-prefixed hex for the few arch lines that use it."""
    key = f"NUMBER({name})"
    return _parse_decimal(info, key, allow_hex=True) if key in info else _missing(key, required)


@overload
def kernel_offset(info: VmcoreInfo, *, required: Literal[True]) -> int: ...
@overload
def kernel_offset(info: VmcoreInfo, *, required: bool = False) -> int | None: ...
def kernel_offset(info: VmcoreInfo, *, required: bool = False) -> int | None:
    """KERNELOFFSET: the KASLR shift of the kernel image (hex)."""
    key = "KERNELOFFSET"
    return _parse_hex(info, key) if key in info else _missing(key, required)


@overload
def page_size(info: VmcoreInfo, *, required: Literal[True]) -> int: ...
@overload
def page_size(info: VmcoreInfo, *, required: bool = False) -> int | None: ...
def page_size(info: VmcoreInfo, *, required: bool = False) -> int | None:
    """PAGESIZE: the crashed kernel's page size in bytes; BadSource unless a power of two, 512 B-16 MiB."""
    key = "PAGESIZE"
    if key not in info:
        return _missing(key, required)
    number = _parse_decimal(info, key)
    if not is_page_size(number):
        raise BadSource(f"VMCOREINFO {key}={shown(info[key])} is not a page size "
                        f"(a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE})")
    return number


MAX_VMCOREINFO_FILE_BYTES = 1 << 20  # the kernel's own note is at most a page or two


def read_vmcoreinfo_file(path: str) -> bytes:
    """A VMCOREINFO file (makedumpfile -g, or `vmcap inspect --vmcoreinfo`): its KEY=VALUE text.

    For dumps whose note is missing (QEMU's ppc64 and s390x dumps) or damaged.
    """
    import os

    from ..fileio.mmapio import open_source_fd

    fd = open_source_fd(path)
    try:
        text = os.pread(fd, MAX_VMCOREINFO_FILE_BYTES + 1, 0)
    except OSError as e:
        raise BadSource(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(text) > MAX_VMCOREINFO_FILE_BYTES:
        raise BadSource(f"{path}: {len(text)}+ bytes is too large for a VMCOREINFO file")
    info = parse_vmcoreinfo(text)
    if not any(key in info for key in ("OSRELEASE", "PAGESIZE")) or b"\0" in text.rstrip(b"\0"):
        raise BadSource(f"{path}: not a VMCOREINFO file (KEY=VALUE lines with OSRELEASE or "
                        "PAGESIZE)")
    return text.rstrip(b"\0")
