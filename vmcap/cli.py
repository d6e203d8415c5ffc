"""vmcap's command line: parse options, call the library, print, map errors to exit codes.

Exit codes (also in README.md and man/vmcap.1):
  0 success; 1 internal error; 2 usage error; 3 bad source; 4 source read error;
  5 output error; 6 corrupt vmcap output; 7 verify found a difference;
  8 unsupported request; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from contextlib import contextmanager

import click

from . import __version__
from .errors import (BadSource, CorruptOutput, OutputError, SourceIOError, Unsupported,
                     VerifyMismatch, VmcapError)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_SOURCE = 3
EXIT_SOURCE_IO = 4
EXIT_OUTPUT = 5
EXIT_CORRUPT = 6
EXIT_MISMATCH = 7
EXIT_UNSUPPORTED = 8
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    BadSource: EXIT_BAD_SOURCE,
    SourceIOError: EXIT_SOURCE_IO,
    OutputError: EXIT_OUTPUT,
    CorruptOutput: EXIT_CORRUPT,
    VerifyMismatch: EXIT_MISMATCH,
    Unsupported: EXIT_UNSUPPORTED,
}

DEFAULT_SOURCE = "/proc/vmcore"


class Interrupted(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Interrupted("terminated")


@contextmanager
def _errors_to_exit_codes():
    """The one place where exceptions become a message line and an exit code."""
    try:
        yield
    except VmcapError as error:
        click.echo(f"vmcap: error: {error}", err=True)
        sys.exit(EXIT_CODES.get(type(error), EXIT_INTERNAL))
    except (KeyboardInterrupt, Interrupted):
        click.echo("vmcap: interrupted; partial output removed", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not our failure to report.
        try:
            sys.stdout = None
        finally:
            sys.exit(EXIT_OUTPUT)
    except MemoryError:
        click.echo("vmcap: error: out of memory", err=True)
        sys.exit(EXIT_INTERNAL)
    except click.exceptions.Exit:
        raise
    except Exception as error:  # a bug: one line, traceback only on request
        if os.environ.get("VMCAP_DEBUG"):
            raise
        click.echo(f"vmcap: internal error: {type(error).__name__}: {error} "
                   "(set VMCAP_DEBUG=1 for a traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class ByteSize(click.ParamType):
    """A byte count: 4194304, 4M, 512K, 1G."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        number, suffix = (text[:-1], text[-1]) if text[-1:] in "KMG" else (text, "")
        try:
            result = int(number) * SIZE_SUFFIXES[suffix]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (examples: 4M, 512K, 1048576)", param, ctx)
        if result <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return result


def _page_size_option(f):
    return click.option("--page-size", type=int, default=None, metavar="BYTES",
                        help="Page size of the dumped kernel (default: VMCOREINFO PAGESIZE, "
                             "else the architecture's default).")(f)


# ---------------------------------------------------------------- rendering

def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _hex(value: int) -> str:
    return f"{value:#x}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
    error, 5 output error, 6 corrupt vmcap output, 7 verify mismatch,
    8 unsupported request, 130 interrupted.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)


@main.command()
@click.argument("src", required=False, default=DEFAULT_SOURCE)
@click.option("--segments", "show_segments", is_flag=True, help="List the PT_LOAD segments.")
@click.option("--fractional", "show_fractional", is_flag=True,
              help="List every fractional page and its RAM pieces.")
@click.option("--vmcoreinfo", "show_vmcoreinfo", is_flag=True, help="Print the VMCOREINFO text.")
@click.option("--mem-usage", "show_mem_usage", is_flag=True,
              help="Count pages per class (cache, user, free, kernel) like makedumpfile "
                   "--mem-usage; reads the kernel's struct pages (x86_64, arm64; needs VMCOREINFO).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (schema in README).")
@_page_size_option
def inspect(src, show_segments, show_fractional, show_vmcoreinfo, show_mem_usage, as_json,
            page_size):
    """Describe a vmcore: /proc/vmcore, a saved dump, or a vmcap output.

    SRC defaults to /proc/vmcore.
    """
    from .inspect import describe

    with _errors_to_exit_codes():
        report = describe(src, page_size=page_size, mem_usage=show_mem_usage)
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
        ("RAM", f"{_human(totals['memory'])} ({totals['memory']} bytes)"),
        ("fractional pages", str(len(report["fractional_pages"]))),
        ("planned via mmap", f"{_human(totals['mapped_bytes'])} ({totals['mapped_bytes']} bytes)"),
        ("planned via pread", f"{totals['buffered_bytes']} bytes"),
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


@contextmanager
def _progress_reporter(enabled: bool):
    """A rich progress bar on stderr, or nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    progress = Progress(TextColumn("saving"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    task = None

    def advance(n: int, total: int) -> None:
        # The total grows when a dump level adds a scan pass before the copy.
        nonlocal task
        if task is None:
            task = progress.add_task("save", total=total)
        progress.update(task, total=total, advance=n)

    with progress:
        yield advance


@main.command()
@click.argument("paths", nargs=-1, metavar="[SRC] OUT")
@click.option("--format", "output_format", type=click.Choice(["zelf", "elf", "kdump"]),
              default="zelf", show_default=True,
              help="zelf: ELF compressed in the zstd seekable format; elf: plain sparse ELF; "
                   "kdump: makedumpfile's kdump-compressed format.")
@click.option("--level", type=click.IntRange(-7, 22), default=None,
              help="Compression level (default: 3 for zelf, 5 for kdump zstd, 3 for kdump "
                   "zlib; zlib takes 1-9).")
@click.option("--threads", type=click.IntRange(0, 256), default=0,
              help="Compression threads (default 0: all cores).")
@click.option("--frame-size", type=ByteSize(), default="8M", show_default=True,
              help="Uncompressed bytes per zstd frame (zelf).")
@click.option("--window", type=ByteSize(), default="4M", show_default=True,
              help="mmap window size.")
@click.option("--no-mmap", is_flag=True, help="Read everything with pread (never mmap).")
@click.option("--on-error", type=click.Choice(["fail", "zero"]), default="fail",
              show_default=True,
              help="On a source read error: fail, or zero-fill the range, record it and go on.")
@click.option("-d", "--dump-level", type=click.IntRange(0, 31), default=0, show_default=True,
              help="makedumpfile dump level (bit 1: exclude zero pages).")
@click.option("--compress", type=click.Choice(["zstd", "zlib", "none"]), default="zstd",
              show_default=True, help="Page compression for --format kdump.")
@click.option("--zero-pages", type=click.Choice(["shared", "exclude"]), default="shared",
              show_default=True,
              help="kdump with -d 1: keep zero pages readable as one shared stored page "
                   "(like makedumpfile), or clear them from the 2nd bitmap (readers then "
                   "fault on them; crash needs --zero_excluded).")
@click.option("--dmesg", "dmesg_path", default=None, metavar="FILE",
              help="Also write the crashed kernel's log to FILE (before copying memory).")
@click.option("--force", is_flag=True, help="Overwrite OUT (and FILE) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (schema in README).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_page_size_option
def save(paths, output_format, level, threads, frame_size, window, no_mmap, on_error,
         dump_level, compress, zero_pages, dmesg_path, force, as_json, quiet, page_size):
    """Save a vmcore: vmcap save [SRC] OUT.

    SRC defaults to /proc/vmcore. OUT "-" writes the stream to stdout
    (zelf or elf). The output is written to OUT.part, synced, then renamed.
    """
    from .save import SaveOptions, save as run_save

    if len(paths) == 1:
        src, out = DEFAULT_SOURCE, paths[0]
    elif len(paths) == 2:
        src, out = paths
    else:
        raise click.UsageError("expected [SRC] OUT")
    options = SaveOptions(output_format=output_format, level=level, threads=threads,
                          frame_bytes=frame_size, window_bytes=window, on_error=on_error,
                          force=force, page_size=page_size, allow_mmap=not no_mmap,
                          dump_level=dump_level, compress=compress, zero_pages=zero_pages,
                          dmesg_path=dmesg_path)
    show_progress = not quiet and _is_terminal(sys.stderr)
    with _errors_to_exit_codes():
        with _progress_reporter(show_progress) as progress:
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
        ("read", f"{_human(s.bytes_read)} in {s.seconds:.2f} s ({s.mb_per_s} MB/s)"),
        ("written", f"{_human(s.bytes_written)} (ratio {s.ratio})"),
        ("mmap / pread", f"{s.mapped_bytes} / {s.buffered_bytes} bytes"),
        ("fractional pages", f"{s.fractional_pages} (RAM bytes kept, never mapped)"),
    ]
    if s.mmap_fallbacks:
        pairs.append(("mmap fallbacks", f"{s.mmap_fallbacks} window(s) read with pread"))
    if s.pages_excluded:
        pairs.append(("pages excluded", ", ".join(f"{k}: {v}" for k, v in
                                                  s.pages_excluded.items())))
    if s.dmesg:
        pairs.append(("kernel log", f"{s.dmesg_records} records -> {s.dmesg}"))
    if s.error_ranges:
        pairs.append(("read errors", f"{len(s.error_ranges)} range(s) zero-filled"))
    _print_fields(pairs, err=err)
    for e in s.error_ranges:
        click.echo(f"  zero-filled {e['paddr']:#x}-{e['paddr'] + e['length']:#x}: "
                   f"{e['reason']}", err=err)


@main.command()
@click.argument("dump")
@click.option("--source", "source_path", default=None, metavar="SRC",
              help="Also compare every segment byte with this source vmcore.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def verify(dump, source_path, as_json, quiet):
    """Check a vmcap output: seek table and every frame; with --source, every byte."""
    from .verify import verify as run_verify

    with _errors_to_exit_codes():
        result = run_verify(dump, source_path)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        elif not quiet:
            _print_fields([(k, str(v)) for k, v in result.items()])


@main.command()
@click.argument("dump")
@click.argument("plain")
@click.option("--force", is_flag=True, help="Overwrite PLAIN if it exists.")
def decompress(dump, plain, force):
    """Write the plain (sparse) ELF of a zelf output; equal to `zstd -d`."""
    from .verify import decompress as run_decompress

    with _errors_to_exit_codes():
        run_decompress(dump, plain, force=force)


@main.command()
@click.argument("src", required=False, default=DEFAULT_SOURCE)
@click.option("--json", "as_json", is_flag=True,
              help="Print the records as JSON (seq, ts_nsec, level, facility, caller, text).")
@click.option("--caller-id", is_flag=True,
              help="Add the [T<pid>]/[C<cpu>] caller column, as makedumpfile 1.7.5+ prints it.")
@_page_size_option
def dmesg(src, as_json, caller_id, page_size):
    """Print the crashed kernel's log (like makedumpfile --dump-dmesg).

    Works on /proc/vmcore, saved ELF dumps, zelf and kdump files; needs
    VMCOREINFO and an x86_64 or arm64 dump. SRC defaults to /proc/vmcore.
    """
    from .dmesg import format_makedumpfile
    from .dumpfile import kernel_log, open_dump

    with _errors_to_exit_codes():
        with open_dump(src, page_size=page_size) as dump:
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
    from .inspect import describe
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


@contextmanager
def _kept_dir(path: str):
    os.makedirs(path, exist_ok=True)
    yield path


if __name__ == "__main__":
    main()
