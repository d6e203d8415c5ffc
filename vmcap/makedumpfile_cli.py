"""makedumpfile's command line, for kdump scripts that call a collector by that name.

Fedora/RHEL kdump-utils runs ``core_collector`` from kdump.conf (default
``makedumpfile -l --message-level 7 -d 31``) as ``CMD /proc/vmcore
DIR/vmcore-incomplete`` or ``CMD -F /proc/vmcore | ssh ...``; Debian's
kdump-tools runs ``makedumpfile $MAKEDUMP_ARGS /proc/vmcore | compress`` with
``-F`` and then ``makedumpfile --dump-dmesg /proc/vmcore FILE``. This module
parses makedumpfile's spellings and runs vmcap's own save, dmesg and
reassembly with the same meaning, so every vmcap guarantee (fractional pages,
safe output creation, verify) holds for those scripts too.

Options vmcap does not implement are refused by name (exit code 8), never
ignored; tuning options that only bound makedumpfile's memory (vmcap's is
bounded anyway) are accepted and have no effect.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from . import __version__
from .kernel.dumplevel import DumpLevel

PROG = "vmcap-makedumpfile"

# makedumpfile options that change what is written and that vmcap does not do.
UNSUPPORTED = {
    "-g": "generating VMCOREINFO from a vmlinux is not supported",
    "--split": "--split output is not supported",
    "--reassemble": "--reassemble (of --split files) is not supported",
    "--config": "filter config files need a vmlinux; not supported",
    "--eppic": "eppic filter macros are not supported",
    "-e": "excluding vmemmap pages (-e) is not supported",
    "--xen-syms": "Xen dumps are not supported",
    "--xen-vmcoreinfo": "Xen dumps are not supported",
    "--xen_phys_start": "Xen dumps are not supported",
    "-X": "Xen dumps are not supported",
    "--diskset": "sadump disksets are not supported",
    "--mem-usage": "use `vmcap inspect --mem-usage` instead",
    "--vtop": "--vtop is not supported",
    "--dry-run": "--dry-run is not supported",
    "--partial-dmesg": "--partial-dmesg is not supported",
    "--dump-erase": "erase info is not supported",
}

MESSAGE_PROGRESS = 1
MESSAGE_COMMON = 2
MESSAGE_ERROR = 4
DEFAULT_MESSAGE_LEVEL = 7


class UsageProblem(Exception):
    """The command line is not one makedumpfile would accept."""


class UnsupportedOption(Exception):
    """A makedumpfile option vmcap does not implement."""


@dataclass(frozen=True)
class Request:
    """What a makedumpfile command line asks for."""

    action: str  # "dump", "flatten", "reassemble", "dmesg", "check", "version", "help"
    source: str | None = None
    output: str | None = None
    compress: str = "none"  # none, zlib, lzo, snappy, zstd
    elf: bool = False
    dump_levels: tuple[DumpLevel, ...] = (DumpLevel(0),)
    size_limit: int | None = None
    message_level: int = DEFAULT_MESSAGE_LEVEL
    threads: int | None = None
    allow_mmap: bool = True
    force: bool = False
    vmcoreinfo_path: str | None = None
    vmlinux: str | None = None  # -x: named, checked to exist, not read (see execute)


def _dump_levels(text: str) -> tuple[DumpLevel, ...]:
    try:
        return DumpLevel.parse_list(text)
    except ValueError as error:
        raise UsageProblem(f"-d {text}: {error}") from None


def _size(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageProblem(f"-L {text}: not a byte count")
    if value <= 0:
        raise UsageProblem(f"-L {text}: must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2 itself
        raise UsageProblem(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    compress = p.add_mutually_exclusive_group()
    for flag, name in (("-c", "zlib"), ("-l", "lzo"), ("-p", "snappy"), ("-z", "zstd")):
        compress.add_argument(flag, dest="compress", action="store_const", const=name)
    p.add_argument("-E", dest="elf", action="store_true")
    p.add_argument("-F", dest="flatten", action="store_true")
    p.add_argument("-R", dest="reassemble", action="store_true")
    p.add_argument("-d", dest="dump_level", default="0")
    p.add_argument("-L", dest="size_limit")
    p.add_argument("-i", dest="vmcoreinfo")
    p.add_argument("-x", dest="vmlinux")
    p.add_argument("-f", dest="force", action="store_true")
    p.add_argument("-h", "--help", dest="help", action="store_true")
    p.add_argument("-v", dest="version", action="store_true")
    p.add_argument("-D", dest="debug", action="store_true")
    p.add_argument("--message-level", dest="message_level", type=int,
                   default=DEFAULT_MESSAGE_LEVEL)
    p.add_argument("--num-threads", dest="threads", type=int)
    p.add_argument("--non-mmap", dest="non_mmap", action="store_true")
    p.add_argument("--dump-dmesg", dest="dump_dmesg", action="store_true")
    p.add_argument("--check-params", dest="check_params", action="store_true")
    p.add_argument("--show-stats", dest="show_stats", action="store_true")
    # Tuning of makedumpfile's own memory use: vmcap's is bounded without them.
    p.add_argument("--cyclic-buffer", dest="ignored_cyclic_buffer")
    p.add_argument("--splitblock-size", dest="ignored_splitblock")
    p.add_argument("--work-dir", dest="ignored_work_dir")
    p.add_argument("--non-cyclic", dest="ignored_non_cyclic", action="store_true")
    p.add_argument("-b", dest="ignored_cache_order")
    p.add_argument("args", nargs="*")
    return p


def _refuse_unsupported(argv: list[str]) -> None:
    for arg in argv:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name in UNSUPPORTED:
            raise UnsupportedOption(f"{name}: {UNSUPPORTED[name]}")
        # Clustered short options (-cx vmlinux): every letter is an option.
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            for letter in arg[1:]:
                if f"-{letter}" in UNSUPPORTED:
                    raise UnsupportedOption(f"-{letter}: {UNSUPPORTED['-' + letter]}")
                if letter in "dLibx":  # the rest of the word is this option's value
                    break


def parse(argv: list[str]) -> Request:
    """makedumpfile's command line -> Request; UsageProblem / UnsupportedOption if not."""
    _refuse_unsupported(argv)
    ns = _parser().parse_args(argv)
    if ns.help:
        return Request(action="help")
    if ns.version:
        return Request(action="version")
    if not 0 <= ns.message_level <= 31:
        raise UsageProblem(f"--message-level {ns.message_level}: not from 0 to 31")
    if ns.threads is not None and not 0 <= ns.threads <= 256:
        raise UsageProblem(f"--num-threads {ns.threads}: not from 0 to 256")
    message_level = ns.message_level | (31 if ns.debug else 0) | (16 if ns.show_stats else 0)
    common = dict(message_level=message_level, threads=ns.threads,
                  allow_mmap=not ns.non_mmap, force=ns.force, vmcoreinfo_path=ns.vmcoreinfo,
                  vmlinux=ns.vmlinux)
    args = ns.args
    if ns.reassemble:
        if ns.flatten or ns.dump_dmesg or len(args) != 1:
            raise UsageProblem("-R takes exactly one DUMPFILE and reads the flattened stream "
                               "from standard input")
        request = Request(action="reassemble", output=args[0], **common)
    elif ns.dump_dmesg:
        if len(args) != 2:
            raise UsageProblem("--dump-dmesg takes VMCORE LOGFILE")
        request = Request(action="dmesg", source=args[0], output=args[1], **common)
    else:
        if ns.elf and ns.compress:
            raise UsageProblem("-E cannot be combined with -c, -l, -p or -z (the ELF format "
                               "has no compressed pages)")
        if ns.flatten:
            if len(args) != 1:
                raise UsageProblem("-F takes VMCORE only and writes the stream to standard output")
            output = "-"
        else:
            if len(args) != 2:
                raise UsageProblem("expected VMCORE DUMPFILE")
            output = args[1]
        request = Request(action="flatten" if ns.flatten else "dump", source=args[0],
                          output=output, compress=ns.compress or "none", elf=ns.elf,
                          dump_levels=_dump_levels(ns.dump_level),
                          size_limit=_size(ns.size_limit) if ns.size_limit else None,
                          **common)
    for path in (request.source, request.output):
        if path is not None and path == "":
            raise UsageProblem("an empty path names no file")
    if ns.check_params:
        return Request(action="check", source=request.source, output=request.output)
    return request


HELP = f"""\
{PROG}: makedumpfile's command line, run by vmcap {__version__}

  {PROG} [-c|-l|-p|-z|-E] [-d DL[,DL...]] [-L SIZE] [-i VMCOREINFO] VMCORE DUMPFILE
  {PROG} -F [-c|-l|-p|-z|-E] [-d DL[,DL...]] [-i VMCOREINFO] VMCORE > STREAM
  {PROG} -R DUMPFILE < STREAM
  {PROG} --dump-dmesg [-i VMCOREINFO] VMCORE LOGFILE

  -c|-l|-p|-z  compress pages with zlib, lzo, snappy or zstd (kdump-compressed format;
               zlib and zstd at level 1, as makedumpfile)
  -E           write an ELF core instead
  -d DL,...    dump level(s); when the dump does not fit (disk full, -L), retry at the next
  -L SIZE      limit the output to SIZE bytes
  -F / -R      flattened stream to standard output / reassemble one from standard input
  -i FILE      VMCOREINFO from FILE (dumps without the note)
  -x VMLINUX   accepted with a warning: vmcap reads no vmlinux, only VMCOREINFO
  -f           overwrite DUMPFILE
  --message-level N  1 progress, 2 common messages, 4 errors (default 7)
  --num-threads N, --non-mmap, --check-params, -D, --show-stats, -v, -h
  --cyclic-buffer, --splitblock-size, --work-dir, --non-cyclic, -b: accepted, no effect
    (vmcap's memory is bounded without them)

Not supported (refused, exit code 8): {", ".join(sorted(UNSUPPORTED))}.
Exit codes are vmcap's (see `man vmcap`); 0 only when the dump is complete.
"""


def _say(request: Request, bit: int, text: str) -> None:
    """A message of one of makedumpfile's message types, if the level lets it through.

    Everything goes to stderr: with -F, stdout is the dump.
    """
    if request.message_level & bit:
        print(text, file=sys.stderr, flush=True)


# The compression level makedumpfile uses for each page codec that has levels.
MAKEDUMPFILE_LEVELS = {"zstd": 1, "zlib": 1}


def save_options(request: Request):
    """The vmcap save options that mean what the makedumpfile request means."""
    from .save import SaveOptions

    if request.elf:
        output_format = "elf"
    else:
        output_format = "kdump-flat" if request.action == "flatten" else "kdump"
    return SaveOptions(output_format=output_format, compress=request.compress,
                       # makedumpfile compresses each page at zstd level 1 and zlib's
                       # Z_BEST_SPEED: -z and -c cost and weigh what they do there
                       # (vmcap save's kdump defaults, 5 and 3, trade speed for size).
                       level=MAKEDUMPFILE_LEVELS.get(request.compress),
                       dump_level=request.dump_levels[0], retry_levels=request.dump_levels[1:],
                       size_limit=request.size_limit,
                       threads=request.threads if request.threads is not None else 0,
                       allow_mmap=request.allow_mmap, force=request.force,
                       vmcoreinfo_path=request.vmcoreinfo_path,
                       # Re-filtering a dump, makedumpfile adds the bits it was saved with.
                       inherit_level=True)


def execute(request: Request, *, stderr_is_terminal: bool) -> int:
    """Carry a parsed request out; vmcap's exceptions propagate to the caller."""
    if request.vmlinux is not None and request.action in ("dump", "flatten", "dmesg"):
        # makedumpfile takes struct layouts from vmlinux's debug info with -x;
        # vmcap takes them from VMCOREINFO only. Say so rather than ignore it:
        # where VMCOREINFO lacks a key, the dump level falls back (a warning).
        import os

        if not os.path.isfile(request.vmlinux):
            from .errors import BadSource

            raise BadSource(f"-x {request.vmlinux}: no such file")
        _say(request, MESSAGE_COMMON,
             f"warning: -x {request.vmlinux}: vmcap reads no vmlinux; page filtering and the "
             "log use the dump's VMCOREINFO" + (" and -i" if request.vmcoreinfo_path else ""))
    if request.action == "help":
        sys.stdout.write(HELP)
        return 0
    if request.action == "version":
        sys.stdout.write(f"{PROG} (vmcap {__version__}): makedumpfile's command line\n")
        return 0
    if request.action == "check":
        return 0
    if request.action == "reassemble":
        from .formats.flattened import reassemble

        size = reassemble(sys.stdin.buffer, request.output, force=request.force)
        _say(request, MESSAGE_COMMON, f"The dumpfile is saved to {request.output} "
                                      f"({size} bytes).")
        return 0
    if request.action == "dmesg":
        count = write_kernel_log(request.source, request.output, force=request.force,
                                 vmcoreinfo_path=request.vmcoreinfo_path)
        _say(request, MESSAGE_COMMON, f"The dmesg log is saved to {request.output} "
                                      f"({count} records).")
        return 0
    if request.elf and request.action == "flatten":
        raise UnsupportedOption("-E with -F: a flattened ELF stream is not supported; use the "
                                "kdump-compressed format (-c, -l, -p, -z) with -F")
    from .progress import progress_reporter
    from .save import save

    options = save_options(request)
    mode = "auto" if request.message_level & MESSAGE_PROGRESS else "none"
    with progress_reporter(mode, sys.stderr, stderr_is_terminal) as progress:
        summary = save(request.source, request.output, options, progress=progress)
    for warning in summary.warnings:
        _say(request, MESSAGE_COMMON, f"warning: {warning}")
    if request.output != "-":
        _say(request, MESSAGE_COMMON, f"The dumpfile is saved to {request.output}.")
    _say(request, MESSAGE_COMMON, f"{PROG} Completed.")
    return 0


def write_kernel_log(source_path: str, log_path: str, *, force: bool = False,
                     vmcoreinfo_path: str | None = None) -> int:
    """`--dump-dmesg VMCORE LOGFILE`: the log as makedumpfile writes it; returns the record count."""
    from .fileio.output import check_output_target, refuse_same_files, write_whole_file
    from .kernel.dmesg import format_makedumpfile
    from .kernel.vmcoreinfo import read_vmcoreinfo_file
    from .source.dump import kernel_log, open_dump

    inputs = [("VMCORE", source_path)]
    if vmcoreinfo_path:
        inputs.append(("-i VMCOREINFO", vmcoreinfo_path))
    refuse_same_files(inputs, [("LOGFILE", log_path)])
    check_output_target(log_path, force)
    vmcoreinfo = read_vmcoreinfo_file(vmcoreinfo_path) if vmcoreinfo_path else None
    with open_dump(source_path, vmcoreinfo=vmcoreinfo) as dump:
        records = kernel_log(dump)
    write_whole_file(log_path, format_makedumpfile(records).encode("utf-8", "surrogateescape"),
                     force=force)
    return len(records)
