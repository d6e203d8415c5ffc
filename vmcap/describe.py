"""`vmcap inspect`: a vmcore's layout and plan as plain data (the CLI renders it)."""

from __future__ import annotations

from .errors import BadSource
from .formats.elf import parse_notes
from .formats.kdump import DUMP_DH_COMPRESSED_INCOMPLETE, KdumpReader
from .formats.note import find_note_fields, incomplete_in
from .kernel.dumplevel import EVERY_CLASS
from .kernel.vmcoreinfo import parse_vmcoreinfo
from .plan.copyplan import plan_copy
from .source.dumpfile import detect_container, open_elf_source
from .source.layout import read_layout


def memory_usage(path: str, *, page_size: int | None = None,
                 vmcoreinfo: bytes | None = None) -> list[dict]:
    """Pages per class, like makedumpfile --mem-usage (classified at dump level 31)."""
    from .kernel.pageclass import mem_usage
    from .source.dumpfile import classify_dump, open_dump

    with open_dump(path, page_size=page_size, vmcoreinfo=vmcoreinfo) as dump:
        result = classify_dump(dump, EVERY_CLASS)
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
    vmcap = find_note_fields(layout.notes)
    if vmcap is not None:
        report["vmcap"] = vmcap
    incomplete = incomplete_in(vmcap)
    if incomplete is not None:
        report["incomplete"] = incomplete.as_dict()
    return report


def _reader(path: str) -> KdumpReader:
    try:
        return KdumpReader(path)
    except OSError as e:
        raise BadSource(f"{path}: cannot open: {e.strerror}") from None


def describe_kdump(path: str) -> dict:
    """`vmcap inspect` for a kdump-compressed file."""
    with _reader(path) as reader:
        header = reader.header
        present, dumped = reader.page_counts()
        notes = parse_notes(reader.notes, header.byte_order) if reader.notes else []
        vmcoreinfo_text = reader.vmcoreinfo.rstrip(b"\0")
        runs = list(reader.iter_present_runs())
        flattened = reader.flattened
    page = header.page_size
    info = parse_vmcoreinfo(vmcoreinfo_text)
    # QEMU leaves the header's utsname and time empty: VMCOREINFO has them.
    crash_time = header.crash_time or None
    if crash_time is None and (info.get("CRASHTIME") or "").isdigit():
        crash_time = int(info["CRASHTIME"])
    report = {
        "source": path,
        "container": "kdump-flat" if flattened else "kdump",
        "page_size": page,
        "page_size_origin": "kdump header",
        "elf_class": header.elf_class,
        "byte_order": header.byte_order,
        "machine": header.machine,
        "arch": header.machine,
        "cpus": header.nr_cpus,
        "osrelease": header.release or info.get("OSRELEASE") or None,
        "crash_time": crash_time,
        # A kdump file has no PT_LOADs: its present pages, as runs.
        "segments": [{"index": i, "paddr": first * page, "vaddr": 0, "offset": 0,
                      "filesz": count * page, "memsz": count * page}
                     for i, (first, count) in enumerate(runs)],
        "fractional_pages": [],
        "totals": {"memory": present * page, "mapped_bytes": 0, "buffered_bytes": 0,
                   "zero_fill_bytes": 0},
        "notes": [{"name": n.name, "type": n.type, "size": len(n.desc)} for n in notes],
        "vmcoreinfo": info,
        "vmcoreinfo_text": vmcoreinfo_text.decode("utf-8", "replace"),
        "warnings": [],
        "kdump": {"header_version": header.header_version, "compression": header.compression,
                  "dump_level": header.dump_level, "max_mapnr": header.max_mapnr,
                  "pages_present": present, "pages_dumped": dumped},
    }
    vmcap = find_note_fields(notes)
    if vmcap is not None:
        report["vmcap"] = vmcap
    incomplete = incomplete_in(vmcap)
    incomplete = incomplete.as_dict() if incomplete is not None else None
    if incomplete is None and header.status & DUMP_DH_COMPRESSED_INCOMPLETE:
        # makedumpfile's own incomplete dumps: only the page counts say how much.
        incomplete = {"saved_bytes": dumped * page, "memory_bytes": present * page,
                      "data_end_paddr": None}
    if incomplete is not None:
        incomplete["pages_dumped"] = dumped
        report["incomplete"] = incomplete
    return report
