"""`vmcap inspect`: a vmcore's layout and plan as plain data (the CLI renders it)."""

from __future__ import annotations

from .kernel.dumplevel import EVERY_CLASS
from .source.dump import Dump, classify_dump, open_dump


def memory_usage(dump: Dump) -> list[dict]:
    """Pages per class, like makedumpfile --mem-usage (classified at dump level 31)."""
    from .kernel.pageclass import mem_usage

    result = classify_dump(dump, EVERY_CLASS)
    return [{"type": row.type, "pages": row.pages, "excludable": row.excludable,
             "description": row.description} for row in mem_usage(result).values()]


def describe(path: str, *, page_size: int | None = None, mem_usage: bool = False,
             vmcoreinfo: bytes | None = None) -> dict:
    """Everything `vmcap inspect` shows, as one JSON-ready dict.

    ``vmcoreinfo`` replaces the dump's own VMCOREINFO (a file's text).
    """
    with open_dump(path, page_size=page_size, vmcoreinfo=vmcoreinfo) as dump:
        report = dump.describe()
        report["source"] = path
        if mem_usage:
            report["mem_usage"] = memory_usage(dump)
    return report
