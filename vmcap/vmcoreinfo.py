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

from .errors import BadSource, Unsupported

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


def _parse_hex(info: VmcoreInfo, key: str) -> int:
    value = info[key]
    try:
        return int(value, 16)  # int(..., 16) also accepts a leading 0x
    except ValueError:
        raise BadSource(f"VMCOREINFO {key}={value!r} is not a hex number") from None


def _parse_decimal(info: VmcoreInfo, key: str, allow_hex: bool = False) -> int:
    value = info[key]
    try:
        digits = value.lstrip("-")
        if allow_hex and digits[:2].lower() == "0x":
            return int(value, 16)
        return int(value, 10)
    except ValueError:
        raise BadSource(f"VMCOREINFO {key}={value!r} is not a decimal number") from None


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
    return _parse_decimal(info, key) if key in info else _missing(key, required)


@overload
def offset(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def offset(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def offset(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """OFFSET(struct.field): offsetof(struct, field) in bytes; name is "struct.field"."""
    key = f"OFFSET({name})"
    return _parse_decimal(info, key) if key in info else _missing(key, required)


@overload
def length(info: VmcoreInfo, name: str, *, required: Literal[True]) -> int: ...
@overload
def length(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None: ...
def length(info: VmcoreInfo, name: str, *, required: bool = False) -> int | None:
    """LENGTH(name): an array's element count."""
    key = f"LENGTH({name})"
    return _parse_decimal(info, key) if key in info else _missing(key, required)


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
    """PAGESIZE: the crashed kernel's page size in bytes."""
    key = "PAGESIZE"
    return _parse_decimal(info, key) if key in info else _missing(key, required)
