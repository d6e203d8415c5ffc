"""`vmcap inspect`: a vmcore's layout and plan as plain data (the CLI renders it)."""

from __future__ import annotations

from .source.dumpfile import detect_container, open_elf_source
from .formats.elfwriter import find_vmcap_note, incomplete_info
from .plan.copyplan import plan_copy
from .source.layout import read_layout


def memory_usage(path: str, *, page_size: int | None = None,
                 vmcoreinfo: bytes | None = None) -> list[dict]:
    """Pages per class, like makedumpfile --mem-usage (classified at dump level 31)."""
    from .source.dumpfile import classify_dump, open_dump
    from .kernel.pageclass import mem_usage

    with open_dump(path, page_size=page_size, vmcoreinfo=vmcoreinfo) as dump:
        result = classify_dump(dump, 31)
    return [{"type": row.type, "pages": row.pages, "excludable": row.excludable,
             "description": row.description} for row in mem_usage(result).values()]


def describe(path: str, *, page_size: int | None = None, mem_usage: bool = False,
             vmcoreinfo: bytes | None = None) -> dict:
    """Everything `vmcap inspect` shows, as one JSON-ready dict.

    ``vmcoreinfo`` replaces the dump's own VMCOREINFO (a file's text).
    """
    report = _describe(path, page_size, vmcoreinfo)
    if mem_usage:
        report["mem_usage"] = memory_usage(path, page_size=page_size, vmcoreinfo=vmcoreinfo)
    return report


def _describe(path: str, page_size: int | None, vmcoreinfo: bytes | None = None) -> dict:
    container = detect_container(path)
    if container in ("kdump", "kdump-flat"):
        from .kdumpsave import describe_kdump
        from .kernel.vmcoreinfo import parse_vmcoreinfo

        report = describe_kdump(path)
        if vmcoreinfo is not None:
            info = parse_vmcoreinfo(vmcoreinfo)
            report.update(vmcoreinfo=info, vmcoreinfo_text=vmcoreinfo.decode("utf-8", "replace"),
                          osrelease=info.get("OSRELEASE", report.get("osrelease")))
        return report
    source = open_elf_source(path)
    try:
        layout = read_layout(source, page_size=page_size, vmcoreinfo=vmcoreinfo)
    finally:
        source.close()
    plan = plan_copy(layout.segments, layout.page_size)
    report = {
        "source": path,
        "container": "elf" if container not in ("zstd-seekable",) else container,
        "page_size": layout.page_size,
        "page_size_origin": layout.page_size_origin,
        "elf_class": layout.elf_class,
        # The file's ELF encoding; the kernel's when it differs (QEMU 7.2 pseries dumps).
        "byte_order": layout.header_byte_order or layout.byte_order,
        "kernel_byte_order": layout.byte_order,
        "machine": layout.machine,
        "arch": layout.arch,
        "cpus": layout.cpus,
        "osrelease": layout.osrelease,
        "crash_time": layout.crash_time,
        "segments": [{"index": s.index, "paddr": s.paddr, "vaddr": s.vaddr,
                      "offset": s.offset, "filesz": s.filesz, "memsz": s.memsz}
                     for s in layout.segments],
        "fractional_pages": [
            {"paddr": page.paddr, "file_offset": page.file_offset,
             "non_ram_bytes": page.non_ram_bytes,
             "pieces": [{"segment": p.segment, "paddr": p.paddr, "size": p.size,
                         "offset": p.offset} for p in page.pieces]}
            for page in plan.fractional_pages],
        "totals": {"memory": plan.memory_bytes, "mapped_bytes": plan.mapped_bytes,
                   "buffered_bytes": plan.buffered_bytes,
                   "zero_fill_bytes": plan.zero_fill_bytes},
        "notes": [{"name": n.name, "type": n.type, "size": len(n.desc)} for n in layout.notes],
        "vmcoreinfo": layout.vmcoreinfo,
        "vmcoreinfo_text": layout.vmcoreinfo_raw.decode("utf-8", "replace"),
        "warnings": list(layout.warnings),
    }
    vmcap = find_vmcap_note(layout.notes)
    if vmcap is not None:
        report["vmcap"] = vmcap
    incomplete = incomplete_info(vmcap)
    if incomplete is not None:
        report["incomplete"] = incomplete
    return report
