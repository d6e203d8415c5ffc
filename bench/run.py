"""vmcap benchmark: throughput, output size and peak RSS against zstd, cat and makedumpfile.

Run by hand, never by the test-suite:

    python bench/run.py [--size 4G] [--dir /tmp/vmcap-bench] [--keep]
                        [--scaling 1G,8G] [--json results.json]

It builds a source laid out like /proc/vmcore with vmcap's own sample builder
("mixed" content: about half zero pages, then text-like, random and sparse
pages; a few RAM ranges including fractional ones, like demo_spec() scaled
up), runs each command once under ``/usr/bin/time -v`` and prints a Markdown
table plus the issue's targets as PASS/FAIL lines. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmcap.sample import KERNEL_TEXT_VADDR, RamRange, SampleSpec, build_vmcore  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # throughput and output sizes are decimal, RSS is MiB
PAGE_SIZE = 4096
TIME = "/usr/bin/time"

# The issue's targets.
MIN_SPEED_VS_ZSTD = 0.8
MAX_SIZE_VS_ZSTD = 1.03
MAX_RSS_MIB = 150
# "RSS not growing with source size": a few MiB of noise (interpreter, page
# cache pages of the mapped window counted as RSS) is not growth.
RSS_GROWTH_TOLERANCE = 0.10
RSS_GROWTH_SLACK_MIB = 8

PLANNER_SEGMENTS = 100_000


# ---------------------------------------------------------------- the source


def bench_spec(total_bytes: int, *, with_vmcoreinfo: bool = False, seed: int = 2024) -> SampleSpec:
    """An x86_64 /proc/vmcore of about total_bytes: demo_spec()'s e820 map, scaled up.

    Every fractional-page situation of demo_spec() is kept (a range ending
    mid-page, one starting mid-page after a 1 KiB ACPI table, a sub-page range,
    two ranges sharing a page, the kernel-text PT_LOAD overlapping main RAM);
    the bulk is main RAM below the 3 GiB PCI hole and RAM above 4 GiB.

    No VMCOREINFO note by default: makedumpfile 1.7.2 treats a VMCOREINFO note
    as "debug information available" and then insists on reading init_uts_ns
    from the dump's memory (check_release: "Can't get the symbol of
    system_utsname"), which a synthetic source does not have. Without the
    note it falls back to what -d 1 needs: the ELF program headers only.
    """
    if total_bytes < 256 * MiB:
        raise ValueError(f"size {total_bytes} is below the 256 MiB this layout needs")
    text_bytes = 32 * MiB
    lowmem = RamRange(0x1000, 0x9FC00 - 0x1000)  # ends mid-page: EBDA is reserved after it
    acpi_bytes = 0x400
    after_acpi_bytes = 64 * MiB - acpi_bytes
    subpage_bytes = 0x800
    pair_bytes = 2 * MiB
    fixed = text_bytes + lowmem.size + after_acpi_bytes + subpage_bytes + pair_bytes
    budget = total_bytes - fixed
    # Below 4 GiB, RAM stops at the PCI hole (0xc0000000 on most e820 maps).
    main_cap = 0xC0000000 - 0x100000 - 80 * MiB
    main_bytes = min(budget // 2, main_cap) // (2 * MiB) * (2 * MiB)
    high_bytes = (budget - main_bytes) // PAGE_SIZE * PAGE_SIZE
    main_end = 0x100000 + main_bytes
    after_acpi = main_end + acpi_bytes
    subpage = main_end + 64 * MiB + 0x100100
    pair = main_end + 64 * MiB + 0x200000
    ranges = (
        # crash_prepare_elf64_headers(): kernel text first, overlapping main RAM
        RamRange(KERNEL_TEXT_VADDR - 0xFFFFFFFF80000000, text_bytes, vaddr=KERNEL_TEXT_VADDR),
        lowmem,
        RamRange(0x100000, main_bytes),
        RamRange(after_acpi, after_acpi_bytes),
        RamRange(subpage, subpage_bytes),
        RamRange(pair, 0x20800),
        RamRange(pair + 0x20800, pair_bytes - 0x20800),
        RamRange(0x100000000, high_bytes),
    )
    return SampleSpec(ranges=ranges, cpus=4, content="mixed", seed=seed,
                      vmcoreinfo=None if with_vmcoreinfo else {})


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    """One command, run once."""

    key: str
    command: str  # as shown in the table
    argv: list[str]
    seconds: float | None = None  # /usr/bin/time "Elapsed (wall clock)"
    user_seconds: float | None = None
    system_seconds: float | None = None
    max_rss_kib: int | None = None
    exit_status: int | None = None
    output_bytes: int | None = None  # apparent size
    output_allocated_bytes: int | None = None  # st_blocks * 512 (sparse ELF)
    error: str | None = None  # "failed: <first line of stderr>"
    skipped: str | None = None  # tool missing
    summary: dict | None = None  # vmcap save --json
    runs_seconds: list = field(default_factory=list)  # every run, with --repeat
    # perf_counter around /usr/bin/time: finer than its 10 ms "Elapsed", plus fork/exec
    outer_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.seconds is not None

    @property
    def rss_mib(self) -> float | None:
        return None if self.max_rss_kib is None else self.max_rss_kib / 1024


def _elapsed_seconds(text: str) -> float:
    """GNU time's "h:mm:ss" or "m:ss.ss" as seconds."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_v(report: str) -> dict:
    """The fields of a `/usr/bin/time -v` report that the benchmark uses."""
    fields = {}
    for line in report.splitlines():
        key, sep, value = line.strip().rpartition(": ")
        if not sep:
            continue
        if key.startswith("Elapsed (wall clock) time"):
            fields["seconds"] = _elapsed_seconds(value)
        elif key == "Maximum resident set size (kbytes)":
            fields["max_rss_kib"] = int(value)
        elif key == "User time (seconds)":
            fields["user_seconds"] = float(value)
        elif key == "System time (seconds)":
            fields["system_seconds"] = float(value)
        elif key == "Exit status":
            fields["exit_status"] = int(value)
    return fields


def _first_line(*texts: str) -> str:
    # makedumpfile draws progress with \r and starts with a blank line.
    for text in texts:
        for line in re.split(r"[\r\n]+", text):
            if line.strip():
                return line.strip()
    return ""


def run_measured(result: Result, workdir: Path, *, stdout_path: str | None = None,
                 output: Path | None = None) -> Result:
    """Run result.argv once under /usr/bin/time -v; fill in the numbers or the error.

    stdout_path: where the command's stdout goes (a file, or os.devnull).
    output: the file the command writes, removed first and measured after.
    """
    if output is not None and output.exists():
        output.unlink()
    # Dirty pages of the previous run must not be written back on this run's clock.
    os.sync()
    time_report = workdir / f".time-{result.key}"
    stderr_path = workdir / f".stderr-{result.key}"
    stdout_file = stdout_path or str(workdir / f".stdout-{result.key}")
    started = time.perf_counter()
    with open(stdout_file, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.run([TIME, "-v", "-o", str(time_report), *result.argv],
                              stdout=out, stderr=err, env=_child_env())
    result.outer_seconds = time.perf_counter() - started
    fields = parse_time_v(time_report.read_text(errors="replace") if time_report.exists() else "")
    for name, value in fields.items():
        setattr(result, name, value)
    stderr = stderr_path.read_text(errors="replace")
    stdout = "" if stdout_path else Path(stdout_file).read_text(errors="replace")
    if proc.returncode != 0:
        line = _first_line(stderr, stdout) or f"exit status {proc.returncode}"
        result.error = f"failed: {line}"
    elif output is not None and not output.exists():
        result.error = f"failed: no output file {output.name}"
    if output is not None and output.exists():
        st = output.stat()
        result.output_bytes = st.st_size
        result.output_allocated_bytes = st.st_blocks * 512
    if result.key.startswith("vmcap") and stdout.lstrip().startswith("{"):
        try:
            result.summary = json.loads(stdout)
        except ValueError:
            pass
    for path in (time_report, stderr_path):
        path.unlink(missing_ok=True)
    if not stdout_path:
        Path(stdout_file).unlink(missing_ok=True)
    return result


def run_repeated(result: Result, workdir: Path, repeat: int, **keywords) -> Result:
    """run_measured repeat times; keep the fastest run, but the largest peak RSS of all."""
    runs = []
    for _ in range(repeat):
        runs.append(run_measured(replace(result), workdir, **keywords))
        if not runs[-1].ok:
            break
    best = min(runs, key=lambda r: (not r.ok, r.seconds or 0.0))
    for name, value in asdict(best).items():
        setattr(result, name, value)
    rss = [r.max_rss_kib for r in runs if r.max_rss_kib is not None]
    result.max_rss_kib = max(rss) if rss else None
    result.runs_seconds = [r.seconds for r in runs]
    return result


def _child_env() -> dict:
    # `python -m vmcap` must run this working tree's vmcap, wherever we are started from.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------- the planner


def planner_segments(count: int, seed: int = 1) -> list:
    """count PT_LOADs as a fragmented EFI memory map gives them, laid out like /proc/vmcore.

    Runs of 1..64 pages with 0..3 page gaps; one range in eight starts or
    ends mid-page, so the planner also finds fractional pages.
    """
    from vmcap.formats.elf import Segment

    rng = random.Random(seed)
    segments = []
    paddr = 0x100000
    file_offset = 2 * PAGE_SIZE  # ELF header page, notes page
    for index in range(count):
        paddr += rng.randrange(0, 4) * PAGE_SIZE
        start = paddr + (0x400 if rng.random() < 1 / 16 else 0)
        end = paddr + rng.randrange(1, 65) * PAGE_SIZE - (0x800 if rng.random() < 1 / 16 else 0)
        chunk_start = start // PAGE_SIZE * PAGE_SIZE
        chunk_end = -(-end // PAGE_SIZE) * PAGE_SIZE
        segments.append(Segment(index=index, paddr=start, vaddr=0xFFFF888000000000 + start,
                                offset=file_offset + start - chunk_start,
                                filesz=end - start, memsz=end - start))
        file_offset += chunk_end - chunk_start
        paddr = chunk_end
    return segments


def time_planner(count: int, repeats: int = 3) -> dict:
    from vmcap.plan.copyplan import plan_copy

    segments = planner_segments(count)
    runs = []
    plan = None
    for _ in range(repeats):
        started = time.perf_counter()
        plan = plan_copy(segments, PAGE_SIZE)
        runs.append(time.perf_counter() - started)
    return {"segments": count, "seconds": min(runs), "runs": runs, "steps": len(plan.steps),
            "fractional_pages": len(plan.fractional_pages)}


# ---------------------------------------------------------------- sizes and disk


def parse_size(text: str) -> int:
    """4G, 512M, 1048576 (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4G, 512M)")
    value = int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match[2]]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n % GiB == 0 else f"{n / MiB:g} MiB"


def disk_needed(size: int, scaling: list[int], keep: bool) -> int:
    """A generous estimate of the disk the run needs at its peak.

    The ELF output is sparse (zero pages are holes): at most size. Compressed
    outputs of "mixed" content are about a quarter of it; count half.
    Without --keep each output is removed once measured and each extra scaling
    source once its run is done, so only one of each exists at a time.
    """
    extra_sources = [s for s in scaling if s != size]
    compressed_outputs = 6  # zelf, zst, kdump, kdump -d 1, makedumpfile -c, -l
    margin = 512 * MiB
    if keep:
        return (size + size + compressed_outputs * size // 2
                + sum(s + s // 2 for s in extra_sources) + margin)
    return size + max([size] + [s + s // 2 for s in extra_sources]) + margin


# ---------------------------------------------------------------- the runs


def vmcap_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmcap", *args]


def main_runs(src: Path, workdir: Path, threads: int, level: int) -> list[tuple[Result, dict]]:
    """(Result, run_measured keywords) for each row of the table, in run order."""
    s = str(src)

    def out(name: str) -> Path:
        return workdir / name

    rows = [
        (Result("cat", "cat SRC > /dev/null", ["cat", s]), dict(stdout_path=os.devnull)),
        (Result("zstd", f"zstd -T{threads} -{level} -c SRC > OUT.zst",
                ["zstd", f"-T{threads}", f"-{level}", "-c", s]),
         dict(stdout_path=str(out("out.zst")), output=out("out.zst"))),
        (Result("vmcap-zelf", f"vmcap save --threads {threads} --level {level} SRC OUT.zelf",
                vmcap_argv("save", "--json", "--threads", str(threads), "--level", str(level),
                           s, str(out("out.zelf")))),
         dict(output=out("out.zelf"))),
        (Result("vmcap-elf", "vmcap save --format elf SRC OUT.elf",
                vmcap_argv("save", "--json", "--format", "elf", s, str(out("out.elf")))),
         dict(output=out("out.elf"))),
        (Result("vmcap-kdump", "vmcap save --format kdump SRC OUT.kdump",
                vmcap_argv("save", "--json", "--format", "kdump", s, str(out("out.kdump")))),
         dict(output=out("out.kdump"))),
        (Result("vmcap-kdump-d1", "vmcap save --format kdump -d 1 SRC OUT.kdump",
                vmcap_argv("save", "--json", "--format", "kdump", "-d", "1", s,
                           str(out("out-d1.kdump")))),
         dict(output=out("out-d1.kdump"))),
        (Result("makedumpfile-c-d1", "makedumpfile -c -d 1 SRC OUT",
                ["makedumpfile", "-c", "-d", "1", s, str(out("out.mdf-c"))]),
         dict(output=out("out.mdf-c"))),
        (Result("makedumpfile-l-d1", "makedumpfile -l -d 1 SRC OUT",
                ["makedumpfile", "-l", "-d", "1", s, str(out("out.mdf-l"))]),
         dict(output=out("out.mdf-l"))),
    ]
    for result, _ in rows:
        tool = result.argv[0]
        if tool != sys.executable and shutil.which(tool) is None:
            result.skipped = f"{tool} not installed"
    return rows


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(args) -> dict:
    # A directory of our own inside --dir: others may keep files in /tmp/vmcap-bench.
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    threads = args.threads or os.cpu_count() or 1
    level = args.level
    results: list[Result] = []

    def drop(path: Path) -> None:
        if not args.keep:
            path.unlink(missing_ok=True)

    load_start = os.getloadavg()
    try:
        src = workdir / f"vmcore-{fmt_size(args.size).replace(' ', '')}"
        note(f"building a {fmt_size(args.size)} source laid out like /proc/vmcore: {src}")
        started = time.perf_counter()
        info = build_vmcore(src, bench_spec(args.size, with_vmcoreinfo=args.vmcoreinfo))
        build_seconds = time.perf_counter() - started
        source_bytes = info.file_size

        # The source was just written, so it is probably in the page cache
        # already; one unmeasured read makes sure every row starts warm.
        note("warm-up: cat SRC > /dev/null (not measured)")
        warmup = run_measured(Result("cat-warmup", "cat SRC > /dev/null (warm-up)",
                                     ["cat", str(src)]), workdir, stdout_path=os.devnull)

        for result, keywords in main_runs(src, workdir, threads, level):
            results.append(result)
            if result.skipped:
                note(f"skip: {result.command} ({result.skipped})")
                continue
            note(f"run: {result.command}")
            run_repeated(result, workdir, args.repeat, **keywords)
            note(f"     {_brief(result)}")
            if "output" in keywords:
                drop(keywords["output"])

        scaling = []
        zelf = next(r for r in results if r.key == "vmcap-zelf")
        for size in args.scaling:
            if size == args.size:
                scaling.append({"source_size": args.size, "source_bytes": source_bytes,
                                "result": zelf})
                continue
            scaling_src = workdir / f"vmcore-{fmt_size(size).replace(' ', '')}"
            note(f"building a {fmt_size(size)} source for the RSS scaling run: {scaling_src}")
            scaling_info = build_vmcore(scaling_src,
                                        bench_spec(size, with_vmcoreinfo=args.vmcoreinfo))
            output = workdir / f"scaling-{size}.zelf"
            result = Result(f"vmcap-zelf-{size}",
                            f"vmcap save --threads {threads} --level {level} "
                            f"SRC({fmt_size(size)}) OUT.zelf",
                            vmcap_argv("save", "--json", "--threads", str(threads), "--level",
                                       str(level), str(scaling_src), str(output)))
            note(f"run: {result.command}")
            run_repeated(result, workdir, args.repeat, output=output)
            note(f"     {_brief(result)}")
            drop(output)
            drop(scaling_src)
            scaling.append({"source_size": size, "source_bytes": scaling_info.file_size,
                            "result": result})
        scaling.sort(key=lambda s: s["source_size"])

        note(f"timing vmcap.plan.copyplan.plan_copy on {PLANNER_SEGMENTS:,} segments")
        planner = time_planner(PLANNER_SEGMENTS)
    finally:
        if not args.keep:
            # Our own mkdtemp directory: also takes an interrupted run's leftovers.
            shutil.rmtree(workdir, ignore_errors=True)

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "repeat": args.repeat,
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "threads": threads,
        "level": level,
        "source": {"path": str(src), "size": args.size, "bytes": source_bytes,
                   "segments": len(info.segments), "vmcoreinfo_note": args.vmcoreinfo,
                   "build_seconds": build_seconds},
        "warmup": warmup,
        "results": results,
        "scaling": scaling,
        "planner": planner,
    }


def _brief(r: Result) -> str:
    if not r.ok:
        return r.error or r.skipped or "no result"
    out = "" if r.output_bytes is None else f", {r.output_bytes / MB:.1f} MB out"
    return f"{r.seconds:.2f} s, {r.rss_mib:.1f} MiB peak RSS{out}"


def _command_output(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    return _first_line(proc.stdout, proc.stderr) or "not available"


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
    except (OSError, TypeError):
        pass
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": None if mem_kib is None else round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zstd": _command_output(["zstd", "--version"]),
        "makedumpfile": _command_output(["makedumpfile", "-v"]),
        "vmcap_git": git.stdout.strip() or "unknown",
    }


# ---------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _f(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    source_bytes = report["source"]["bytes"]
    results: list[Result] = report["results"]
    by_key = {r.key: r for r in results}
    zstd = by_key.get("zstd")
    zstd_ok = zstd is not None and zstd.ok
    zstd_speed = source_bytes / MB / zstd.seconds if zstd_ok and zstd.seconds else None
    zstd_size = zstd.output_bytes if zstd_ok else None

    lines = [
        f"Source: {fmt_size(report['source']['size'])} ({source_bytes:,} bytes, "
        f"{report['source']['segments']} PT_LOADs, \"mixed\" pages, "
        f"{'with' if report['source']['vmcoreinfo_note'] else 'no'} VMCOREINFO note); "
        f"threads {report['threads']}, level {report['level']}; page cache warm "
        f"(one unmeasured `cat` first); "
        + (f"best of {report['repeat']} runs" if report["repeat"] > 1 else "each command run once")
        + f"; load average {report['load_average']['start'][0]:.2f} at start, "
        f"{report['load_average']['end'][0]:.2f} at end.",
        "",
        "| command | seconds | MB/s | output MB | speed × zstd | size × zstd | peak RSS MiB "
        "| CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    for r in results:
        if r.skipped:
            skipped.append(f"{r.command}: skipped ({r.skipped})")
            continue
        if not r.ok:
            lines.append(f"| `{r.command}` | {_md_escape(r.error)} | – | – | – | – | "
                         f"{_f(r.rss_mib, '.1f')} | – |")
            continue
        speed = source_bytes / MB / r.seconds if r.seconds else None
        output = "–"
        if r.output_bytes is not None:
            output = f"{r.output_bytes / MB:.1f}"
            # Sparse outputs: the plain ELF's zero pages, unused kdump descriptor slots.
            if r.output_allocated_bytes is not None and \
                    r.output_allocated_bytes < r.output_bytes * 0.99:
                output += f" ({r.output_allocated_bytes / MB:.1f} on disk)"
        compressed = r.output_bytes is not None and r.key != "vmcap-elf"
        size_ratio = _ratio(r.output_bytes, zstd_size) if compressed else None
        lines.append(f"| `{r.command}` | {r.seconds:.2f} | {_f(speed, '.0f')} | {output} | "
                     f"{_f(_ratio(speed, zstd_speed), '.2f')} | {_f(size_ratio, '.3f')} | "
                     f"{r.rss_mib:.1f} | {r.user_seconds + r.system_seconds:.2f} |")
    lines.append("")
    if skipped:
        lines += [f"- {line}" for line in skipped] + [""]

    if report["scaling"]:
        lines += ["Peak RSS vs source size (vmcap save, zelf):", "",
                  "| source | seconds | peak RSS MiB |", "|---|---:|---:|"]
        for entry in report["scaling"]:
            r = entry["result"]
            lines.append(f"| {fmt_size(entry['source_size'])} | "
                         f"{_f(r.seconds if r.ok else None, '.2f')} | "
                         f"{_f(r.rss_mib, '.1f') if r.ok else _md_escape(r.error or '–')} |")
        lines.append("")
    p = report["planner"]
    lines.append(f"Planner: `vmcap.plan.copyplan.plan_copy` on {p['segments']:,} segments: "
                 f"{p['seconds']:.3f} s (best of {len(p['runs'])}; {p['steps']:,} steps, "
                 f"{p['fractional_pages']:,} fractional pages).")
    lines.append("")
    lines.append("Targets:")
    lines.append("")
    for verdict, text in targets(report):
        lines.append(f"- **{verdict}** {text}")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def targets(report: dict) -> list[tuple[str, str]]:
    """The issue's targets as (PASS | FAIL | n/a, explanation)."""
    source_bytes = report["source"]["bytes"]
    by_key = {r.key: r for r in report["results"]}
    checks = []

    def ok(key: str) -> Result | None:
        r = by_key.get(key)
        return r if r is not None and r.ok else None

    def why_missing(*keys: str) -> str:
        reasons = []
        for key in keys:
            r = by_key.get(key)
            if r is None or not r.ok:
                reasons.append(f"{key}: {(r.error or r.skipped) if r else 'not run'}")
        return "; ".join(reasons)

    zstd, zelf = ok("zstd"), ok("vmcap-zelf")
    if zstd and zelf:
        ratio = zstd.seconds / zelf.seconds
        checks.append((_verdict(ratio >= MIN_SPEED_VS_ZSTD),
                       f"zelf throughput ≥ {MIN_SPEED_VS_ZSTD}× zstd CLI: "
                       f"{source_bytes / zelf.seconds / MB:.0f} vs "
                       f"{source_bytes / zstd.seconds / MB:.0f} MB/s ({ratio:.2f}×)"))
        ratio = zelf.output_bytes / zstd.output_bytes
        checks.append((_verdict(ratio <= MAX_SIZE_VS_ZSTD),
                       f"zelf output within {MAX_SIZE_VS_ZSTD - 1:.0%} of zstd's: "
                       f"{zelf.output_bytes / MB:.1f} vs {zstd.output_bytes / MB:.1f} MB "
                       f"({ratio:.3f}×)"))
    else:
        text = why_missing("zstd", "vmcap-zelf")
        checks.append(("n/a", f"zelf throughput ≥ {MIN_SPEED_VS_ZSTD}× zstd CLI ({text})"))
        checks.append(("n/a", f"zelf output within 3% of zstd's ({text})"))

    vmcap_rows = [r for r in report["results"] if r.key.startswith("vmcap") and r.ok]
    vmcap_rows += [e["result"] for e in report["scaling"]
                   if e["result"].ok and e["result"] not in vmcap_rows]
    if vmcap_rows:
        worst = max(vmcap_rows, key=lambda r: r.max_rss_kib)
        checks.append((_verdict(worst.rss_mib < MAX_RSS_MIB),
                       f"peak RSS < {MAX_RSS_MIB} MiB for every vmcap run: largest "
                       f"{worst.rss_mib:.1f} MiB (`{worst.command}`)"))
    else:
        checks.append(("n/a", f"peak RSS < {MAX_RSS_MIB} MiB (no vmcap run succeeded)"))

    scaling = [e for e in report["scaling"] if e["result"].ok]
    if len(scaling) >= 2:
        small, large = scaling[0], scaling[-1]
        a, b = small["result"].rss_mib, large["result"].rss_mib
        allowed = max(a * RSS_GROWTH_TOLERANCE, RSS_GROWTH_SLACK_MIB)
        checks.append((_verdict(b - a <= allowed),
                       f"peak RSS not growing with source size: "
                       f"{fmt_size(small['source_size'])} {a:.1f} MiB → "
                       f"{fmt_size(large['source_size'])} {b:.1f} MiB "
                       f"(allowed growth {allowed:.1f} MiB)"))
    else:
        checks.append(("n/a", "peak RSS not growing with source size (needs two successful "
                              "--scaling runs)"))

    kdump, mdf = ok("vmcap-kdump-d1"), ok("makedumpfile-c-d1")
    if kdump and mdf:
        faster = kdump.seconds <= mdf.seconds
        smaller = kdump.output_bytes <= mdf.output_bytes
        # Judged on the apparent size (what ls shows and what a copy off the
        # machine moves); the on-disk size is shown too because unused kdump
        # descriptor slots would be a hole.
        checks.append((_verdict(faster and smaller),
                       f"kdump (zstd, -d 1) at least as fast and no bigger than makedumpfile "
                       f"-c -d 1: {kdump.seconds:.2f} vs {mdf.seconds:.2f} s, "
                       f"{kdump.output_bytes / MB:.2f} vs {mdf.output_bytes / MB:.2f} MB "
                       f"({kdump.output_bytes / mdf.output_bytes:.4f}×; on disk "
                       f"{kdump.output_allocated_bytes / MB:.2f} vs "
                       f"{mdf.output_allocated_bytes / MB:.2f} MB)"))
    else:
        checks.append(("n/a", "kdump (zstd, -d 1) vs makedumpfile -c -d 1 ("
                              + why_missing("vmcap-kdump-d1", "makedumpfile-c-d1") + ")"))
    return checks


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def to_json(report: dict) -> dict:
    out = dict(report)
    out["warmup"] = asdict(report["warmup"])
    out["results"] = [asdict(r) for r in report["results"]]
    out["scaling"] = [dict(e, result=asdict(e["result"])) for e in report["scaling"]]
    out["targets"] = [{"verdict": v, "text": t} for v, t in targets(report)]
    return out


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark vmcap save against zstd, cat and makedumpfile on a synthetic "
                    "/proc/vmcore-like source.")
    parser.add_argument("--size", type=parse_size, default=parse_size("4G"),
                        help="source size (default 4G)")
    parser.add_argument("--dir", default="/tmp/vmcap-bench",
                        help="where the source and outputs go (default /tmp/vmcap-bench)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the source and every output (default: remove them)")
    parser.add_argument("--scaling", default=None, metavar="SIZES",
                        help="source sizes for the peak-RSS scaling runs, comma-separated "
                             "(default 1G,SIZE; 'none' to skip)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for vmcap and zstd (default: all cores)")
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each command N times and keep the fastest run (peak RSS: "
                             "the largest of all); default 1")
    parser.add_argument("--vmcoreinfo", action="store_true",
                        help="give the source a VMCOREINFO note (makedumpfile then fails on "
                             "it: see bench/README.md)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the raw numbers as JSON to PATH ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.scaling is None:
        args.scaling = sorted({GiB, args.size})
    elif args.scaling.strip().lower() == "none":
        args.scaling = []
    else:
        try:
            args.scaling = sorted({parse_size(s) for s in args.scaling.split(",") if s.strip()})
        except argparse.ArgumentTypeError as error:
            parser.error(f"--scaling: {error}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for size in [args.size, *args.scaling]:
        if size < 256 * MiB:
            parser.error(f"size {fmt_size(size)} is below the 256 MiB the source layout needs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(TIME, os.X_OK):
        note(f"bench: {TIME} is missing; install it (apt-get install -y time)")
        return 1
    workdir = Path(args.dir)
    made_dir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    needed = disk_needed(args.size, args.scaling, args.keep)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        note(f"bench: not enough room in {workdir}: about {needed / GiB:.1f} GiB needed "
             f"for the source and outputs, {free / GiB:.1f} GiB free. Try a smaller --size, "
             f"another --dir, or drop --keep.")
        if made_dir:
            workdir.rmdir()
        return 1
    try:
        report = run_all(args)
    finally:
        if made_dir and not args.keep:
            try:
                workdir.rmdir()
            except OSError:
                pass  # something else left files there: not ours to remove
    print(markdown(report))
    if args.json:
        text = json.dumps(to_json(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
