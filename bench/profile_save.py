"""Where vmcap save's time goes: py-spy samples of whole runs, added up by kind of work.

Run by hand, never by the test-suite (needs `pip install py-spy`):

    python bench/profile_save.py [--rate 250] SRC -- [save options ...]
    python bench/profile_save.py --raw FILE.spy          # categorise an earlier recording
    python bench/profile_save.py --cpu SRC -- [save options ...]

--cpu: CPU time instead (cProfile with time.process_time, in this process,
the second of two runs, imports timed apart): on a shared machine wall-clock
samples pile up wherever the process happened to be descheduled, CPU time
does not. Builtins (numpy reductions, memcpy) are charged to their caller.

Records `python -m vmcap save -q --force --threads 1 OPTIONS SRC OUT` with
`py-spy record --idle` (every thread, waiting included) in py-spy's raw
(collapsed stack) format, then puts each sample in the first category
whose rule matches its stack (rules in CATEGORIES, innermost frames
first) and prints a Markdown table: seconds (samples / rate) and share.
py-spy slows the process a little; shares matter more than seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (category, test on the stack's frames "function (file:line)"), checked in order.
CATEGORIES = [
    ("interpreter start-up (no Python frame yet)", lambda s: not s.strip()),
    ("start-up: imports", lambda s: "_find_and_load" in s or "_call_with_frames_removed" in s
     or "<module> (vmcap/__main__.py" in s and "run (vmcap/entry.py" not in s),
    ("hashing (XXH64 digests)", lambda s: "digest.py" in s or "xxh" in s.lower()),
    ("classification (struct pages, -d 2..16)", lambda s: "kernel/pageclass.py" in s or "classify_dump" in s
     or "kernel/translate.py" in s),
    ("compression", lambda s: "_ZstdPages.compress" in s or "_RowPages" in s
     or "_compress (vmcap/formats/seekable.py" in s
     or "SeekableWriter._compress" in s),
    ("zero detection", lambda s: "_store_batch (vmcap/formats/kdump.py:653" in s or "page_flags_of_chunk" in s
     or "_any" in s.rsplit(";", 1)[-1]),
    ("descriptors and bitmaps", lambda s: "_set_bits" in s or "_StreamedBitmap" in s or "mark_present" in s
     or "descriptors" in s.rsplit(";", 1)[-1] or "_store_batch (vmcap/formats/kdump.py:66" in s),
    ("writes, fsync, rename", lambda s: "_pwrite_all" in s or "OutputFile" in s or "fsync" in s
     or "_write_out" in s or "SparseSink" in s),
    ("reading the source (mmap faults, pread, staging copies)", lambda s: "fileio/mmapio.py" in s
     or "plan/copier.py" in s
     or "_stage (vmcap/formats/kdump.py" in s or "SeekableWriter.write" in s or "_write_view" in s
     or "scan_excluded_runs" in s),
    ("per-page bookkeeping (encode_pages, batches)", lambda s: "encode_pages" in s or "kdump.py" in s),
    ("layout, planning, notes", lambda s: "layout.py" in s or "plan/copyplan.py" in s or "elfwriter.py" in s
     or "vmcoreinfo.py" in s or "dmesg.py" in s),
    ("click, exit, other", lambda s: True),
]


def categorise(raw: Path, rate: int) -> list[tuple[str, float, float]]:
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack = stack.replace(str(REPO) + "/", "")
        for name, rule in CATEGORIES:
            if rule(stack):
                totals[name] += int(count)
                break
    all_samples = sum(totals.values()) or 1
    return [(name, totals[name] / rate, totals[name] / all_samples) for name, _ in CATEGORIES if totals[name]]


CPU_RULES = [
    ("compression", r"multi_compress_to_buffer|ZstdCompressor' objects>|zlib\.compress|compress_raw|LZOCompressor"
     r"|lzokay|_ZstdPages|_RowPages|seekable\.py.*\(_compress\)"),
    ("classification (struct pages, -d 2..16)", r"pageclass\.py|kernel\.py|dump\.py.*classify"),
    ("hashing (XXH64 digests)", r"digest\.py|xxh"),
    ("zero detection", r"page_flags_of_chunk|kdump\.py.*_store_batch|exclude\.py|_methods\.py.*\(_any\)"),
    ("descriptors and bitmaps", r"_set_bits|_StreamedBitmap|mark_present|_iter_runs"),
    ("writes, fsync, rename", r"pwrite|fsync|posix\.write|output\.py|rename"),
    ("reading the source (mmap faults, pread, staging and frame copies)",
     r"mmapio\.py|copy\.py|_stage|seekable\.py.*\(write\)|_write_view|mmap"),
    ("per-page bookkeeping (encode_pages, batches, page streams)",
     r"encode_pages|kdumpsave\.py|kdump\.py|seekable\.py|save\.py"),
]
OTHER = "layout, planning, click, numpy glue"


def cpu_profile(argv: list[str]) -> list[tuple[str, float, float]]:
    import cProfile
    import pstats
    import re
    import time

    sys.path.insert(0, str(REPO))
    # As vmcap's entry point does before numpy loads (vmcap.entry.quiet_blas_threads).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    started = time.process_time()
    import vmcap.formats.kdump
    import vmcap.formats.seekable
    import vmcap.kdumpsave
    import vmcap.kernel.pageclass
    import vmcap.plan.exclude
    import vmcap.save  # noqa: E401,F401
    import vmcap.source.dump  # noqa: E401,F401
    from vmcap.commands import main
    imports = time.process_time() - started
    main(argv, standalone_mode=False)  # numpy's lazy submodules, the page cache
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    main(argv, standalone_mode=False)
    profiler.disable()

    def category(func) -> str | None:
        name = f"{func[0]}:{func[1]}({func[2]})"
        return next((c for c, rule in CPU_RULES if re.search(rule, name)), None)

    totals: collections.Counter = collections.Counter()
    for func, (_, _, own, _, callers) in pstats.Stats(profiler).stats.items():
        mine = category(func)
        if mine or not callers:
            totals[mine or OTHER] += own
            continue
        for caller, (_, _, share, _) in callers.items():  # a builtin: charged to whoever called it
            totals[category(caller) or OTHER] += share
    run = sum(totals.values()) or 1
    rows = [("start-up: imports (before the run)", imports, imports / run)]
    rows += [(name, seconds, seconds / run) for name, seconds in totals.most_common()]
    return rows


def markdown(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| where | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.2f} | {share:.0%} |" for name, seconds, share in rows]
    lines.append(f"| **total (sampled)** | {sum(r[1] for r in rows):.2f} | 100% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--raw", type=Path, help="categorise this py-spy raw file instead of recording")
    parser.add_argument("--cpu", action="store_true", help="CPU time by cProfile, in this process")
    parser.add_argument("src", nargs="?")
    parser.add_argument("options", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.raw:
        print(markdown(categorise(args.raw, args.rate)))
        return 0
    if not args.src:
        parser.error("SRC is needed unless --raw is given")
    options = [o for o in args.options if o != "--"]
    if args.cpu:
        with tempfile.TemporaryDirectory(prefix="vmcap-profile-") as tmp:
            rows = cpu_profile(["save", "-q", "--force", "--threads", "1", *options, args.src,
                                str(Path(tmp) / "out")])
        print("| where | CPU seconds | share of the run |\n|---|---:|---:|")
        print("\n".join(f"| {name} | {seconds:.3f} | {share:.0%} |" for name, seconds, share in rows))
        print(f"| **the run (imports not included)** | {sum(r[1] for r in rows[1:]):.3f} | 100% |")
        return 0
    with tempfile.TemporaryDirectory(prefix="vmcap-profile-") as tmp:
        raw = Path(tmp) / "save.spy"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(["py-spy", "record", "--idle", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
                        sys.executable, "-m", "vmcap", "save", "-q", "--force", "--threads", "1", *options,
                        args.src, str(Path(tmp) / "out")], check=True, env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(markdown(categorise(raw, args.rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
