"""vmcap's commands (click): parse options, call the library, print.

Errors become exit codes in cli.py (errors_to_exit_codes), the process rules
every command shares; entry.py sends `vmcap makedumpfile` straight to
cli.run_makedumpfile, without click.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager

import click

from . import __version__
from .cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_makedumpfile
from .cli import errors_to_exit_codes as _errors_to_exit_codes
from .cli import is_terminal as _is_terminal
from .cli import one_line as _one_line
from .process import install_signal_handlers
from .progress import human_bytes

DEFAULT_SOURCE = "/proc/vmcore"

# click 8.2+ raises this for a bare `vmcap`; older clicks print the help themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run_command(argv: list[str] | None = None) -> int:
    """Run the click command line; usage errors are one line and exit code 2.

    Called by vmcap.entry.run, which owns signals and stdout's fate.
    """
    try:
        result = main.main(args=argv, prog_name="vmcap", standalone_mode=False)
    except _NO_ARGS_IS_HELP as error:
        click.echo(error.ctx.get_help() if error.ctx else str(error), err=True)
        return EXIT_USAGE
    except click.UsageError as error:
        where = error.ctx.command_path if error.ctx else "vmcap"
        click.echo(f"vmcap: error: {_one_line(error.format_message())} "
                   f"(see '{where} --help')", err=True)
        return EXIT_USAGE
    except click.ClickException as error:
        click.echo(f"vmcap: error: {_one_line(error.format_message())}", err=True)
        return error.exit_code
    except click.exceptions.Abort:
        click.echo("vmcap: interrupted", err=True)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

# Documented bounds of the size options (README, man page). Outside them is
# a usage error before any work: a 1-byte frame runs for minutes, a 100 GiB
# window or frame would exhaust memory.
FRAME_BYTES_RANGE = (64 << 10, 64 << 20)
WINDOW_BYTES_RANGE = (64 << 10, 256 << 20)
PAGE_SIZE_RANGE = (1 << 10, 1 << 20)
SIZE_LIMIT_RANGE = (1 << 20, 1 << 60)


class ByteSize(click.ParamType):
    """A byte count within [low, high]: 4194304, 4M, 512K, 1G."""

    name = "SIZE"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            result = value
        else:
            text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
            suffix = text[-1:] if text[-1:] and text[-1:] in "KMG" else ""
            number = text[:len(text) - len(suffix)]
            try:
                result = int(number, 10) * SIZE_SUFFIXES[suffix]
            except (ValueError, KeyError):
                self.fail(f"{_one_line(repr(value), 60)} is not a size (examples: 4M, 512K, "
                          "1048576)", param, ctx)
        if not self.low <= result <= self.high:
            self.fail(f"{_one_line(str(value), 60)} is outside {_size_text(self.low)}.."
                      f"{_size_text(self.high)}", param, ctx)
        return result


def _size_text(n: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


class DumpLevels(click.ParamType):
    """A dump level 0..31, or a comma-separated list of them tried in turn (1,31)."""

    name = "LEVEL[,LEVEL...]"

    def convert(self, value, param, ctx):
        from .kernel.dumplevel import DumpLevel

        if isinstance(value, tuple):
            return value
        try:
            return DumpLevel.parse_list(str(value))
        except ValueError as error:
            self.fail(_one_line(str(error)), param, ctx)


class PageSize(click.ParamType):
    """A page size: a power of two from 1 KiB to 1 MiB."""

    name = "BYTES"

    def convert(self, value, param, ctx):
        try:
            result = int(str(value).strip(), 0)
        except ValueError:
            self.fail(f"{_one_line(repr(value), 60)} is not a number", param, ctx)
        low, high = PAGE_SIZE_RANGE
        if not low <= result <= high or result & (result - 1):
            self.fail(f"{_one_line(str(value), 60)} is not a power of two from {low} to "
                      f"{high}", param, ctx)
        return result


class PathArgument(click.ParamType):
    """A file path that is not empty (an empty OUT would fail only after the whole copy)."""

    name = "PATH"

    def convert(self, value, param, ctx):
        if not str(value):
            self.fail("an empty path names no file", param, ctx)
        return str(value)


PATH = PathArgument()


def _vmcoreinfo_option(f):
    return click.option("--vmcoreinfo", "vmcoreinfo_path", type=PATH, default=None,
                        metavar="FILE",
                        help="VMCOREINFO from FILE (KEY=VALUE lines, as `makedumpfile -g` or "
                             "`vmcap inspect --show-vmcoreinfo` write them), for a dump "
                             "without the note or with a damaged one.")(f)


def _read_vmcoreinfo(path: str | None) -> bytes | None:
    if path is None:
        return None
    from .kernel.vmcoreinfo import read_vmcoreinfo_file

    return read_vmcoreinfo_file(path)


def _page_size_option(f):
    return click.option("--page-size", type=PageSize(), default=None, metavar="BYTES",
                        help="Page size of the dumped kernel, a power of two from 1K to 1M "
                             "(default: VMCOREINFO PAGESIZE, else the architecture's "
                             "default).")(f)


# ---------------------------------------------------------------- rendering

def _hex(value: int) -> str:
    return f"{value:#x}"


def _print_table(title: str, columns: list[str], rows: list[list[str]], *, err=False) -> None:
    """A rich table on a terminal; plain aligned columns when piped."""
    stream = sys.stderr if err else sys.stdout
    if _is_terminal(stream):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console(file=stream).print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    click.echo(f"{title}", err=err)
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), err=err)
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), err=err)


def _print_fields(pairs: list[tuple[str, str]], *, err=False) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key.ljust(width)}  {value}", err=err)


# ---------------------------------------------------------------- commands

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmcap")
def main():
    """Capture and inspect Linux kernel crash dumps (/proc/vmcore).

    Fractional pages (physical pages shared by System RAM and reserved
    memory) are never mapped, and their RAM bytes are read exactly once.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad source, 4 source read
    error, 5 output error (a dump cut short is kept, flagged incomplete),
    6 damaged or incomplete dump, 7 verify mismatch, 8 unsupported request,
    130 interrupted (SIGINT, SIGTERM, SIGHUP).
    """
    install_signal_handlers()


@main.command()
@click.argument("src", required=False, default=DEFAULT_SOURCE, type=PATH)
@click.option("--segments", "show_segments", is_flag=True, help="List the PT_LOAD segments.")
@click.option("--fractional", "show_fractional", is_flag=True,
              help="List every fractional page and its RAM pieces.")
@click.option("--show-vmcoreinfo", "show_vmcoreinfo", is_flag=True,
              help="Print the VMCOREINFO text.")
@_vmcoreinfo_option
@click.option("--mem-usage", "show_mem_usage", is_flag=True,
              help="Count pages per class (cache, user, free, kernel) like makedumpfile "
                   "--mem-usage; reads the kernel's struct pages (x86_64, arm64, ppc64, s390x, "
                   "riscv64; needs VMCOREINFO).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema in README).")
@_page_size_option
def inspect(src, show_segments, show_fractional, show_vmcoreinfo, vmcoreinfo_path,
            show_mem_usage, as_json, page_size):
    """Describe a vmcore: /proc/vmcore, a saved dump, or a vmcap output.

    SRC defaults to /proc/vmcore.
    """
    from .describe import describe

    with _errors_to_exit_codes():
        report = describe(src, page_size=page_size, mem_usage=show_mem_usage,
                          vmcoreinfo=_read_vmcoreinfo(vmcoreinfo_path))
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        _render_inspect(report, show_segments, show_fractional, show_vmcoreinfo)
        if show_mem_usage:
            click.echo()
            page = report["page_size"]
            _print_table("memory usage (dump level 31 classes)",
                         ["TYPE", "PAGES", "EXCLUDABLE", "DESCRIPTION"],
                         [[row["type"], str(row["pages"]), "yes" if row["excludable"] else "no",
                           row["description"]] for row in report["mem_usage"]])
            total = sum(row["pages"] for row in report["mem_usage"])
            click.echo(f"page size: {page}; total pages: {total}")


def _pread_explained(report: dict) -> str:
    """The pread bytes, and why: fractional pages, or pages not page-aligned in the file."""
    buffered = report["totals"]["buffered_bytes"]
    in_fractional = sum(piece["size"] for page in report["fractional_pages"]
                        for piece in page["pieces"])
    text = f"{buffered} bytes"
    if not buffered:
        return text
    parts = []
    if in_fractional:
        parts.append(f"{in_fractional} RAM bytes of fractional pages")
    if buffered > in_fractional:
        # A packed core (not /proc/vmcore) may store a segment at a file offset
        # that is not congruent to its paddr: the file pages at its edges hold
        # bytes of two places, so they are read, not mapped.
        parts.append(f"{buffered - in_fractional} bytes at segment edges that are not "
                     "page-aligned in the file")
    return f"{text} ({'; '.join(parts)})"


def _render_inspect(report: dict, show_segments: bool, show_fractional: bool,
                    show_vmcoreinfo: bool) -> None:
    totals = report["totals"]
    pairs = [
        ("source", report["source"]),
        ("container", report["container"]),
        ("architecture", f"{report['arch']} ({report['machine']})"),
        ("ELF", f"ELF{report['elf_class']} {report['byte_order']}-endian"),
        ("page size", f"{report['page_size']} (from {report['page_size_origin']})"),
        ("CPUs", str(report["cpus"])),
        ("kernel release", report["osrelease"] or "unknown (no VMCOREINFO)"),
        ("crash time", str(report["crash_time"]) if report["crash_time"] is not None
         else "unknown"),
        ("segments", str(len(report["segments"]))),
        ("RAM", f"{human_bytes(totals['memory'])} ({totals['memory']} bytes)"),
        ("fractional pages", str(len(report["fractional_pages"]))),
        ("planned via mmap", f"{human_bytes(totals['mapped_bytes'])} ({totals['mapped_bytes']} bytes)"),
        ("planned via pread", _pread_explained(report)),
        ("zero fill", f"{totals['zero_fill_bytes']} bytes"),
    ]
    if report.get("kdump"):
        kd = report["kdump"]
        pairs.append(("kdump pages", f"{kd['pages_present']} present, {kd['pages_dumped']} "
                                      f"dumped, compression {kd['compression']}"))
    vmcap = report.get("vmcap")
    if vmcap:
        pairs.append(("written by", f"vmcap {vmcap.get('VERSION', '?')} from "
                                    f"{vmcap.get('SOURCE', '?')}"))
        pairs.append(("read errors", f"{len(vmcap['error_ranges'])} range(s) zero-filled"))
    if report.get("incomplete"):
        from .formats.note import describe_incomplete

        pairs.append(("INCOMPLETE", f"the capture stopped early: "
                                    f"{describe_incomplete(report['incomplete'])}"))
    _print_fields(pairs)
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if show_segments:
        click.echo()
        _print_table("segments", ["index", "paddr", "vaddr", "offset", "filesz", "memsz"],
                     [[str(s["index"]), _hex(s["paddr"]), _hex(s["vaddr"]), _hex(s["offset"]),
                       _hex(s["filesz"]), _hex(s["memsz"])] for s in report["segments"]])
    if show_fractional:
        click.echo()
        rows = []
        for page in report["fractional_pages"]:
            pieces = "; ".join(f"seg {p['segment']} {p['paddr']:#x}-{p['paddr'] + p['size']:#x} "
                               f"({p['size']} B)" for p in page["pieces"])
            rows.append([_hex(page["paddr"]), _hex(page["file_offset"]), pieces,
                         str(page["non_ram_bytes"])])
        _print_table("fractional pages", ["page paddr", "file offset", "RAM pieces",
                                          "non-RAM bytes"], rows)
    if show_vmcoreinfo:
        click.echo()
        click.echo(report["vmcoreinfo_text"] or "(no VMCOREINFO note)")


@main.command()
@click.argument("paths", nargs=-1, metavar="[SRC...] OUT", type=PATH)
@click.option("--format", "output_format",
              type=click.Choice(["zelf", "elf", "kdump", "kdump-flat"]),
              default="zelf", show_default=True,
              help="zelf: ELF compressed in the zstd seekable format; elf: plain sparse ELF; "
                   "kdump: makedumpfile's kdump-compressed format; kdump-flat: the same in "
                   "makedumpfile's flattened stream (-F), which a pipe can take.")
@click.option("--level", type=click.IntRange(-7, 22), default=None,
              help="Compression level: zstd -7..22 (default 3 for zelf, 5 for kdump), "
                   "zlib 1..9 (default 3).")
@click.option("--threads", type=click.IntRange(0, 256), default=0,
              help="Compression threads (default 0: one per CPU this process may use).")
@click.option("--frame-size", type=ByteSize(*FRAME_BYTES_RANGE), default=None,
              help="Uncompressed bytes per zstd frame (zelf), 64K..64M  [default: 16M on one "
                   "thread, 8M with more].")
@click.option("--window", type=ByteSize(*WINDOW_BYTES_RANGE), default=None,
              help="mmap window size, 64K..256M  [default: 1M a thread, 4M at most].")
@click.option("--no-mmap", is_flag=True, help="Read everything with pread (never mmap).")
@click.option("--on-error", type=click.Choice(["fail", "zero"]), default="fail",
              show_default=True,
              help="On a source read error: fail, or zero-fill the range, record it and go on.")
@click.option("-d", "--dump-level", type=DumpLevels(), default=None,
              help="makedumpfile dump level, bits added up: 1 zero pages, 2 cache, "
                   "4 cache with private data, 8 user pages, 16 free pages (31: all). "
                   "A list (1,31) tries the next level when the output does not fit. "
                   "Default: 0, or a saved dump's own level; a saved dump can only be "
                   "re-filtered at levels that include its bits (else exit 8).")
@click.option("--size-limit", type=ByteSize(*SIZE_LIMIT_RANGE), default=None,
              help="Largest output file, e.g. 2G (makedumpfile -L); past it the next dump "
                   "level is tried, after the last an incomplete dump is kept.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 8) when the dump level needs kernel knowledge vmcap lacks, "
                   "instead of saving at level 1 (or 0) with a warning.")
@click.option("--compress", type=click.Choice(["zstd", "zlib", "lzo", "snappy", "none"]),
              default="zstd", show_default=True,
              help="Page compression for --format kdump and kdump-flat (makedumpfile -z, -c, "
                   "-l, -p).")
@click.option("--zero-pages", type=click.Choice(["shared", "exclude"]), default="shared",
              show_default=True,
              help="kdump with -d 1: keep zero pages readable as one shared stored page "
                   "(like makedumpfile), or clear them from the 2nd bitmap (readers then "
                   "fault on them; crash needs --zero_excluded).")
@click.option("--dmesg", "dmesg_path", default=None, metavar="FILE", type=PATH,
              help="Also write the crashed kernel's log to FILE (before copying memory).")
@click.option("--force", is_flag=True, help="Overwrite OUT (and FILE) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (schema in README).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (no progress).")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "bar", "lines", "none"]),
              default="auto", show_default=True,
              help="Progress on stderr: a bar on a terminal, plain lines elsewhere (at most "
                   "one per 3 s and per 5%), or none.")
@_page_size_option
@_vmcoreinfo_option
def save(paths, output_format, level, threads, frame_size, window, no_mmap, on_error,
         dump_level, size_limit, strict, compress, zero_pages, dmesg_path, force, as_json, quiet,
         progress_mode, page_size, vmcoreinfo_path):
    """Save a vmcore: vmcap save [SRC...] OUT.

    SRC defaults to /proc/vmcore. It may be any dump vmcap reads (ELF,
    zelf, kdump, flattened, a flattened stream compressed whole with
    gzip/xz/lz4/zstd), or the files of a makedumpfile --split set. OUT "-" writes the stream to stdout
    (zelf, elf or kdump-flat). The output is written to a new hidden
    .OUT.XXXXXXXX.part beside OUT, synced, then given OUT's name.
    """
    from .save import SaveOptions
    from .save import save as run_save

    if len(paths) == 1:
        src, out = DEFAULT_SOURCE, paths[0]
    elif len(paths) == 2:
        src, out = paths
    elif len(paths) > 2:
        # The files of a makedumpfile --split set, then OUT.
        src, out = list(paths[:-1]), paths[-1]
    else:
        raise click.UsageError("expected [SRC...] OUT")
    if output_format == "kdump" and out == "-":
        raise click.UsageError("--format kdump needs a seekable output file, not stdout "
                               "(--format kdump-flat writes a stream)")
    if compress == "zlib" and level is not None and not 1 <= level <= 9:
        raise click.BadParameter(f"{level} is outside 1..9 (zlib)", param_hint="'--level'")
    if compress in ("lzo", "snappy") and level is not None and output_format.startswith("kdump"):
        raise click.BadParameter(f"{compress} has no compression levels", param_hint="'--level'")
    options = SaveOptions(output_format=output_format, level=level, threads=threads,
                          frame_bytes=frame_size, window_bytes=window, on_error=on_error,
                          force=force, page_size=page_size, allow_mmap=not no_mmap,
                          dump_level=(dump_level or (0,))[0],
                          retry_levels=(dump_level or (0,))[1:],
                          inherit_level=dump_level is None,
                          size_limit=size_limit, strict=strict, compress=compress,
                          zero_pages=zero_pages, dmesg_path=dmesg_path,
                          vmcoreinfo_path=vmcoreinfo_path)
    from .progress import progress_reporter

    with _errors_to_exit_codes():
        with progress_reporter("none" if quiet else progress_mode, sys.stderr,
                               _is_terminal(sys.stderr)) as progress:
            summary = run_save(src, out, options, progress=progress)
        # The data may be on stdout: then everything else goes to stderr.
        to_err = out == "-"
        if as_json:
            click.echo(json.dumps(summary.to_json(), indent=2), err=to_err)
        elif not quiet:
            _render_save(summary, to_err)
        for warning in summary.warnings:
            if not quiet:
                click.echo(f"warning: {warning}", err=True)


def _render_save(s, err: bool) -> None:
    pairs = [
        ("saved", f"{s.source} -> {s.output} ({s.format})"),
        ("memory", f"{human_bytes(s.memory_bytes)} in {s.seconds:.2f} s ({s.mib_per_s} MiB/s)"),
        ("read", f"{human_bytes(s.bytes_read)} (every pass)"),
        ("written", f"{human_bytes(s.bytes_written)} (ratio {s.ratio})"),
        ("mmap / pread", f"{s.mapped_bytes} / {s.buffered_bytes} bytes"),
        ("fractional pages", f"{s.fractional_pages} (RAM bytes kept, never mapped)"),
    ]
    if s.mmap_fallbacks:
        pairs.append(("mmap fallbacks", f"{s.mmap_fallbacks} window(s) read with pread"))
    if s.pages_excluded:
        from .kernel.dumplevel import excluded_text

        pairs.append(("pages excluded", excluded_text(s.pages_excluded)))
    if s.dmesg:
        pairs.append(("kernel log", f"{s.dmesg_records} records -> {s.dmesg}"))
    if s.error_ranges:
        pairs.append(("read errors", f"{len(s.error_ranges)} range(s) zero-filled"))
    _print_fields(pairs, err=err)
    for e in s.error_ranges:
        click.echo(f"  zero-filled {e['paddr']:#x}-{e['paddr'] + e['length']:#x}: "
                   f"{e['reason']}", err=err)


@main.command()
@click.argument("dump", type=PATH)
@click.option("--source", "source_path", default=None, metavar="SRC", type=PATH,
              help="Also compare every segment byte with this source vmcore.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_vmcoreinfo_option
def verify(dump, source_path, as_json, quiet, vmcoreinfo_path):
    """Prove a vmcap output whole (checksums, digests, structure, every page).

    With --source, also that it holds every byte of SRC its dump level keeps.
    Exit 6: the dump is damaged, cut short or flagged incomplete; 7: it lacks
    or changes what the source has.
    """
    from .verify import verify as run_verify

    with _errors_to_exit_codes():
        result = run_verify(dump, source_path, vmcoreinfo=_read_vmcoreinfo(vmcoreinfo_path))
        if as_json:
            click.echo(json.dumps(result, indent=2))
        elif not quiet:
            _print_fields([(k, str(v)) for k, v in result.items()])


@main.command()
@click.argument("dump", type=PATH)
@click.argument("plain", type=PATH)
@click.option("--force", is_flag=True, help="Overwrite PLAIN if it exists.")
def decompress(dump, plain, force):
    """Write the plain (sparse) ELF of a zelf output; equal to `zstd -d`."""
    from .verify import decompress as run_decompress

    with _errors_to_exit_codes():
        run_decompress(dump, plain, force=force)


@main.command()
@click.argument("src", nargs=-1, type=PATH, metavar="[SRC...]")
@click.option("--json", "as_json", is_flag=True,
              help="Print the records as JSON (seq, ts_nsec, level, facility, caller, text).")
@click.option("--caller-id", is_flag=True,
              help="Add the [T<pid>]/[C<cpu>] caller column, as makedumpfile 1.7.5+ prints it.")
@_page_size_option
@_vmcoreinfo_option
def dmesg(src, as_json, caller_id, page_size, vmcoreinfo_path):
    """Print the crashed kernel's log (like makedumpfile --dump-dmesg).

    Works on /proc/vmcore, saved ELF dumps, zelf, kdump and flattened files,
    and the files of a makedumpfile --split set given together; needs
    VMCOREINFO and an x86_64, arm64, ppc64, s390x or riscv64 dump. SRC
    defaults to /proc/vmcore.
    """
    from .kernel.dmesg import format_makedumpfile
    from .source.dump import kernel_log, open_dump

    src = list(src) or [DEFAULT_SOURCE]
    with _errors_to_exit_codes():
        with open_dump(src, page_size=page_size,
                       vmcoreinfo=_read_vmcoreinfo(vmcoreinfo_path)) as dump:
            records = kernel_log(dump)
        if as_json:
            click.echo(json.dumps([_record_json(r) for r in records], indent=2))
        else:
            sys.stdout.write(format_makedumpfile(records, caller_ids=caller_id))


def _record_json(record) -> dict:
    caller = None
    if record.caller_id is not None:
        # Bit 31 set: a CPU number (not in task context), else a PID.
        cid = record.caller_id
        caller = f"C{cid & 0x7fffffff}" if cid & 0x80000000 else f"T{cid}"
    return {"seq": record.seq, "ts_nsec": record.ts_nsec, "level": record.level,
            "facility": record.facility, "caller": caller,
            "text": record.text.decode("utf-8", "backslashreplace")}


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="Keep the sample vmcore and the output here (default: a temporary "
                   "directory, removed afterwards).")
def demo(directory):
    """Build a sample vmcore with fractional pages, inspect it, save it, verify it."""
    from .demo import build_and_save
    from .describe import describe
    from .verify import verify as run_verify

    with _errors_to_exit_codes():
        with (_kept_dir(directory) if directory else tempfile.TemporaryDirectory()) as where:
            run, audit = build_and_save(where)
            click.echo(f"Built a sample vmcore laid out like /proc/vmcore: {run.source}\n")
            click.echo(f"$ vmcap inspect --fractional {run.source}")
            _render_inspect(describe(run.source), False, True, False)
            click.echo(f"\n$ vmcap save {run.source} {run.output}")
            _render_save(run.summary, False)
            click.echo(f"\n$ vmcap verify --source {run.source} {run.output}")
            result = run_verify(run.output, run.source)
            _print_fields([(k, str(v)) for k, v in result.items()])
            click.echo("\nEvery read of the save was recorded:")
            _print_fields([
                ("mmap windows", str(audit.maps)),
                ("preads", str(audit.reads)),
                ("non-RAM bytes touched", str(audit.non_ram_bytes_touched)),
                ("partial-page RAM pieces", f"{audit.fractional_pieces}, "
                                            f"{audit.pieces_read_once} read exactly once by pread"),
                ("fractional pages mapped", str(audit.fractional_pages_mapped)),
            ])


@main.command()
@click.argument("paths", nargs=-1, metavar="DUMP... DIR", type=PATH)
@click.option("--allow-other", is_flag=True,
              help="Let other users read DIR/vmcore (FUSE allow_other; a user other than "
                   "root needs user_allow_other in /etc/fuse.conf).")
def mount(paths, allow_other):
    """Show a dump as a plain ELF core, DIR/vmcore, read-only (FUSE).

    crash, gdb and drgn open DIR/vmcore as a plain vmcore; nothing is
    decompressed ahead of a read: a zelf file is read through its seek
    table, a kdump or flattened file through its page descriptors, the files
    of a --split set together. Runs in the foreground until Ctrl-C (or
    SIGTERM, SIGHUP: exit 130) or `umount DIR` (exit 0); DIR is unmounted
    either way. DIR must be an empty directory (else exit 5); without FUSE
    (no /dev/fuse, no libfuse, no mfusepy, mount refused) exit 8.
    """
    if len(paths) < 2:
        raise click.UsageError("expected DUMP... DIR")
    from .mount import check_can_mount, serve
    from .source.dump import open_dump

    dumps, directory = list(paths[:-1]), paths[-1]

    def ready(mount):
        dump = mount.dump
        # vmcap's name for its own format here, as `vmcap save --format` spells it.
        container = "zelf" if dump.container == "zstd-seekable" else dump.container
        click.echo(f"{mount.directory}/vmcore: {dump.path} ({container}, "
                   f"{human_bytes(dump.size)} ELF view), read-only; Ctrl-C or "
                   f"`umount {mount.directory}` ends it")

    with _errors_to_exit_codes():
        check_can_mount(directory)  # before opening the dump, which may read its bitmaps
        with open_dump(dumps, strict=True) as dump:
            serve(dump, directory, allow_other=allow_other, on_ready=ready)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def makedumpfile(args):
    """makedumpfile's command line (-c/-l/-p/-z, -E, -F, -R, -d, --dump-dmesg, ...).

    For kdump scripts that call a collector by that name; also installed as
    the `vmcap-makedumpfile` command. `vmcap makedumpfile -h` lists what it
    takes. Options vmcap does not implement exit with code 8.
    """
    # entry.run sends `vmcap makedumpfile ...` to cli.run_makedumpfile before click loads;
    # this command is what `vmcap --help` lists, and what a caller of main() reaches.
    sys.exit(run_makedumpfile(list(args)))


@contextmanager
def _kept_dir(path: str):
    os.makedirs(path, exist_ok=True)
    yield path


if __name__ == "__main__":
    main()
