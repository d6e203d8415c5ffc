"""makedumpfile's dump level (-d): which pages a dump leaves out, as one flag type.

A level is a sum of bits (makedumpfile.h DL_EXCLUDE_*): 1 zero pages, 2
page-cache pages without private data, 4 page-cache pages with private data,
8 user pages, 16 free pages. Bit 1 is found by reading the pages; bits 2-16
need the crashed kernel's struct pages (vmcap.kernel.pageclass).

Every level that enters vmcap (the -d option of both command lines, a
saved dump's VMCAP note or kdump header) becomes a DumpLevel through
``parse``/``of``; code asks the type (``needs_kernel``, ``includes``) rather
than testing raw bits. A DumpLevel is an int: JSON, the VMCAP note and the
kdump header get the same plain number as before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DumpLevel(enum.IntFlag):
    ZERO = 1
    CACHE = 2
    CACHE_PRIVATE = 4
    USER = 8
    FREE = 16

    # Python 3.10 prints a flag as "DumpLevel.ZERO" (3.11+ as "1"): messages,
    # note lines and f-strings always get the number, as makedumpfile writes it.
    def __str__(self) -> str:
        return str(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    @classmethod
    def of(cls, value: int) -> DumpLevel:
        """The level ``value`` (an int 0..31); ValueError for anything else."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DUMP_LEVEL:
            raise ValueError(f"dump level {value!r} is not from 0 to {MAX_DUMP_LEVEL}")
        return cls(value)

    @classmethod
    def parse(cls, text: str) -> DumpLevel:
        """A level typed by a user: ASCII decimal digits meaning 0..31, spaces around allowed.

        ValueError for anything else, its message naming the text: "+3", "3_1",
        "0x1f", "²" are no levels (int() would take some of them and fail on others).
        """
        digits = text.strip()
        if not digits or not digits.isascii() or not digits.isdigit() or int(digits, 10) > MAX_DUMP_LEVEL:
            shown = repr(digits)
            shown = shown if len(shown) <= 60 else shown[:60] + "…"
            raise ValueError(f"{shown} is not a dump level from 0 to {MAX_DUMP_LEVEL}")
        return cls(int(digits, 10))

    @classmethod
    def parse_list(cls, text: str) -> tuple[DumpLevel, ...]:
        """makedumpfile's "-d 11,31": levels tried in turn; ValueError names the first bad one."""
        return tuple(cls.parse(part) for part in text.split(","))

    @property
    def needs_kernel(self) -> bool:
        """Whether the level has a class only the kernel's struct pages tell (bits 2-16)."""
        return bool(self & KERNEL_CLASSES)

    @property
    def kernel_classes(self) -> DumpLevel:
        """The bits of this level that need struct pages (all but ZERO)."""
        return DumpLevel(self & KERNEL_CLASSES)

    @property
    def excludes_zero(self) -> bool:
        return bool(self & DumpLevel.ZERO)

    def includes(self, other: int) -> bool:
        """Whether every bit of ``other`` is in this level.

        A saved dump can only be re-filtered at a level that includes its
        own: the pages it left out cannot come back.
        """
        return self & other == other

    def without(self, other: int) -> DumpLevel:
        """This level's bits that ``other`` lacks."""
        return DumpLevel(self & ~other & MAX_DUMP_LEVEL)

    def names(self) -> tuple[str, ...]:
        """The bits' names, lowest first: DumpLevel(9).names() == ("zero", "user")."""
        return tuple(bit.name.lower() for bit in DumpLevel if self & bit)


MAX_DUMP_LEVEL = 31
KERNEL_CLASSES = DumpLevel.CACHE | DumpLevel.CACHE_PRIVATE | DumpLevel.USER | DumpLevel.FREE
EVERY_CLASS = KERNEL_CLASSES | DumpLevel.ZERO  # -d 31; --mem-usage classifies at it

# The page classes of makedumpfile's struct-page walk that a dump leaves out,
# in the order counts are listed: free, the two caches, user, and the two it
# leaves out whenever it walks struct pages (hwpoison, offline).
EXCLUDED_CLASSES = ("free", "cache", "cache_private", "user", "hwpoison", "offline")


@dataclass(frozen=True)
class ExclusionCounts:
    """The pages one classification or one saved dump left out, per reason.

    ``classes``: pfns per kernel class (EXCLUDED_CLASSES), None when struct
    pages were not classified; ``total_pages``: the pfns the classification
    looked at (RAM with a struct page, makedumpfile's "Original pages").
    The rest is known only once a dump is written: ``zero`` pages left out
    (bit 1), ``zero_shared`` zero pages stored as kdump's one shared zero
    page, ``kept_in_short_runs`` excludable pages an ELF output kept because
    their run is shorter than makedumpfile -E's 256 pages, ``zero_fill``
    kdump pages wholly beyond a segment's p_filesz (present, not dumped).
    None: the count does not apply to this dump.
    """

    classes: dict[str, int] | None = None
    total_pages: int = 0
    zero: int | None = None
    zero_shared: int | None = None
    kept_in_short_runs: int | None = None
    zero_fill: int = 0

    @property
    def class_total(self) -> int:
        """All pfns the kernel classes left out."""
        return sum((self.classes or {}).values())

    def to_json(self) -> dict[str, int]:
        """`save --json`'s ``pages_excluded``: the classes (when classified), then
        zero_fill (when any), zero or zero_shared, kept_in_short_runs (when they apply)."""
        counts = dict(self.classes or {})
        for key in ("zero_fill", "zero", "zero_shared", "kept_in_short_runs"):
            value = getattr(self, key)
            if value is not None and (key != "zero_fill" or value):
                counts[key] = value
        return counts


def excluded_text(pages_excluded: dict[str, int]) -> str:
    """The summary line's text of ``ExclusionCounts.to_json()``: "free: 3, zero: 2"."""
    return ", ".join(f"{reason}: {pages}" for reason, pages in pages_excluded.items())
