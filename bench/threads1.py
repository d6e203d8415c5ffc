"""vmcap at --threads 1 (a capture kernel's nr_cpus=1) against upstream makedumpfile and zstd -T1.

Run by hand, never by the test-suite:

    python bench/threads1.py [--repeat 3] [--dir /var/tmp] [--synthetic 2G]
                             [--sparse 1G,64G,1T,16T] [--only real,zelf,sparse,classify]
                             [--source PATH] [--json PATH]

Sections (each a Markdown table on stdout):

source    (--source PATH, any ELF vmcore with program headers at offset 64,
          e.g. a lab dump of a bigger guest): vmcap kdump -d 1 and -d 31 with
          zstd level 1 and lzo against makedumpfile-upstream -z and -l, and
          zelf against zstd -T1 -3, where start-up is amortised.
real      the real dump in ../shared/vmcores, its program headers moved to
          offset 64 (makedumpfile reads them there): vmcap kdump at -d 1 and
          -d 31 with zstd (default level 5, and level 1 = makedumpfile -z's),
          zlib level 1 (= -c) and lzo (= -l), against makedumpfile-upstream
          -z, -c and -l; zelf -d 0 against zstd -T1 -3 on the same file.
zelf      a synthetic "mixed" source (bench/run.py's bench_spec): vmcap zelf
          against zstd -3 at 1 and 2 threads.
sparse    synthetic vmcores whose physical address space is 1 GiB .. 16 TiB
          but which hold only four 64 MiB RAM ranges spread over it (the file
          stays small): vmcap kdump -d 1, zelf and elf at --threads 1, and
          makedumpfile-upstream -z -d 1; seconds per TiB of address space.
classify  -d 31 page classification alone (vmcap.kernel.pageclass.classify_mem_map
          in a child process) over synthetic struct pages for the same
          sparse address spaces, with its result read back in 4 MiB pieces
          the way save/kdump do: the whole-process -d 31 run needs a kernel
          (VMCOREINFO, page tables, mem_section tree) that the sample
          builder cannot make for a 16 TiB space.

Every command runs --repeat times; the table shows the median wall time
(time.perf_counter around fork/exec/wait), the median CPU time (user +
system of every thread: steadier than wall time on a shared machine) and
the largest peak RSS (os.wait4's ru_maxrss). The page cache is warmed once before each source's
rows. makedumpfile-upstream is built by ../shared/lab/build-makedumpfile-upstream.sh;
rows for it say "not installed" when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import bench_spec, parse_size  # noqa: E402

from vmcap.sample import RamRange, SampleSpec, build_vmcore  # noqa: E402

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
MDF = "makedumpfile-upstream"
REAL_DUMP = Path(os.environ.get("VMCAP_VMCORES")
                 or REPO.parent / "shared" / "vmcores") / "qemu-6.1-panic.elf.zst"


@dataclass
class Row:
    section: str
    key: str
    command: str
    argv: list[str]
    output: str | None = None
    seconds: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # user + system, all threads
    output_bytes: int | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def rss_mib(self) -> float | None:
        return max(self.rss_kib) / 1024 if self.rss_kib else None


# The child is started by a small launcher process: ru_maxrss counts the memory
# of the process that forked it (fork copies the RSS counters, exec keeps the
# high-water mark), so forking from this 60 MiB benchmark would report 60 MiB
# for anything smaller. python -S has a few MiB of anonymous memory.
LAUNCHER = r"""
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(report, "w") as f:
    f.write(f"{seconds} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} "
            f"{usage.ru_utime + usage.ru_stime}")
"""


def run_once(argv: list[str]) -> tuple[float, int, int, str, float]:
    """(wall seconds, peak RSS KiB, exit status, stderr tail, CPU seconds) of one child."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
        os.sync()  # the previous run's writeback is not on this run's clock
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, report.name, *argv],
                       stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=child_env())
        seconds, rss, status, cpu = report.read().split()
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()
    return float(seconds), int(rss), int(status), (tail[-1] if tail else ""), float(cpu)


PYCACHE = Path(tempfile.gettempdir()) / "vmcap-bench-pycache"


def child_env() -> dict:
    """vmcap from this tree, with its bytecode cached: an installed vmcap has .pyc files,
    and PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def compile_vmcap() -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "vmcap")],
                   env=child_env(), check=True, stdout=subprocess.DEVNULL)


def measure(row: Row, repeat: int) -> Row:
    if shutil.which(row.argv[0]) is None and row.argv[0] != sys.executable:
        row.error = f"{row.argv[0]} not installed"
        return row
    for _ in range(repeat):
        if row.output:
            Path(row.output).unlink(missing_ok=True)
        seconds, rss, status, tail, cpu = run_once(row.argv)
        if status != 0:
            row.error = f"failed ({status}): {tail}"
            return row
        row.seconds.append(seconds)
        row.cpu_seconds.append(cpu)
        row.rss_kib.append(rss)
        row.extra["stderr"] = tail
    if row.output and Path(row.output).exists():
        row.output_bytes = Path(row.output).stat().st_size
        Path(row.output).unlink()
    print(f"  {row.key}: {row.median:.2f} s, CPU {row.cpu_median:.2f} s, {row.rss_mib:.1f} MiB",
          file=sys.stderr, flush=True)
    return row


def vmcap(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmcap", "save", "-q", "--force", *args]


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def move_phdrs_after_ehdr(core: Path) -> None:
    """makedumpfile reads program headers at offset 64: drop QEMU's section headers there."""
    with open(core, "r+b") as file:
        head = file.read(1 << 16)
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        phdrs = head[phoff:phoff + phentsize * phnum]
        first_data = min(struct.unpack_from("<Q", phdrs, i * phentsize + 8)[0] for i in range(phnum))
        if phoff == 64:
            return
        if 64 + len(phdrs) > first_data:
            raise SystemExit("no room for the program headers at offset 64")
        ehdr = bytearray(head[:64])
        struct.pack_into("<QQ", ehdr, 32, 64, 0)
        struct.pack_into("<HHH", ehdr, 58, 0, 0, 0)
        end = max(phoff + len(phdrs), 64 + len(phdrs))
        file.seek(0)
        file.write((bytes(ehdr) + phdrs).ljust(end, b"\0"))


# ---------------------------------------------------------------- sections


def kdump_rows(section: str, src: Path, out: Path, *, every_codec: bool) -> list[Row]:
    """vmcap kdump at --threads 1 against makedumpfile-upstream at -d 1 and -d 31, then zelf
    against zstd -T1 -3; ``every_codec`` adds vmcap's default level, zlib and two threads."""
    rows = []
    for d in (1, 31):
        o = lambda name: str(out / f"{name}-d{d}")  # noqa: E731
        kdump = lambda *opts, name: vmcap("--format", "kdump", *opts, "-d", str(d), str(src), o(name))  # noqa: E731
        if every_codec:
            rows.append(Row(section, f"vmcap-z5-d{d}", f"vmcap kdump -d {d} --threads 1 (zstd 5, default)",
                            kdump("--threads", "1", name="v5"), o("v5")))
        rows += [
            Row(section, f"vmcap-z1-d{d}", f"vmcap kdump -d {d} --threads 1 --level 1",
                kdump("--threads", "1", "--level", "1", name="v1"), o("v1")),
            Row(section, f"mdf-z-d{d}", f"makedumpfile-upstream -z -d {d} (zstd 1)",
                [MDF, "-z", "-d", str(d), str(src), o("mz")], o("mz")),
            Row(section, f"vmcap-lzo-d{d}", f"vmcap kdump -d {d} --threads 1 --compress lzo",
                kdump("--threads", "1", "--compress", "lzo", name="vl"), o("vl")),
            Row(section, f"mdf-l-d{d}", f"makedumpfile-upstream -l -d {d}",
                [MDF, "-l", "-d", str(d), str(src), o("ml")], o("ml")),
        ]
        if every_codec:
            rows += [
                Row(section, f"vmcap-zlib1-d{d}", f"vmcap kdump -d {d} --threads 1 --compress zlib --level 1",
                    kdump("--threads", "1", "--compress", "zlib", "--level", "1", name="vc"), o("vc")),
                Row(section, f"mdf-c-d{d}", f"makedumpfile-upstream -c -d {d} (zlib 1)",
                    [MDF, "-c", "-d", str(d), str(src), o("mc")], o("mc")),
                Row(section, f"vmcap-z5-d{d}-t2", f"vmcap kdump -d {d} --threads 2 (zstd 5)",
                    kdump("--threads", "2", name="v5t2"), o("v5t2")),
            ]
    rows += [
        Row(section, "vmcap-zelf-t1", "vmcap zelf -d 0 --threads 1",
            vmcap("--threads", "1", str(src), str(out / "v.zelf")), str(out / "v.zelf")),
        Row(section, "zstd-T1-3", "zstd -T1 -3",
            ["zstd", "-T1", "-3", "-q", "-f", str(src), "-o", str(out / "z.zst")], str(out / "z.zst")),
    ]
    return rows


def real_rows(src: Path, out: Path) -> list[Row]:
    return kdump_rows("real", src, out, every_codec=True)


def source_rows(src: Path, out: Path) -> list[Row]:
    """--source: a bigger dump where start-up is amortised; makedumpfile -z / -l and zstd -T1 -3."""
    return kdump_rows("source", src, out, every_codec=False)


def zelf_rows(src: Path, out: Path) -> list[Row]:
    rows = []
    for t in (1, 2):
        rows += [
            Row("zelf", f"vmcap-zelf-t{t}", f"vmcap zelf --threads {t} --level 3",
                vmcap("--threads", str(t), "--level", "3", str(src), str(out / "v.zelf")), str(out / "v.zelf")),
            Row("zelf", f"zstd-T{t}-3", f"zstd -T{t} -3",
                ["zstd", f"-T{t}", "-3", "-q", "-f", str(src), "-o", str(out / "z.zst")], str(out / "z.zst")),
        ]
    return rows


SPARSE_RAM = 64 * MiB
SPARSE_RANGES = 4


def sparse_spec(space: int) -> SampleSpec:
    """Four 64 MiB RAM ranges spread over [0, space): the rest is a hole."""
    step = space // SPARSE_RANGES
    ranges = [RamRange(0x100000, SPARSE_RAM)]
    ranges += [RamRange(i * step, SPARSE_RAM) for i in range(1, SPARSE_RANGES - 1)]
    ranges.append(RamRange(space - SPARSE_RAM, SPARSE_RAM))
    return SampleSpec(ranges=tuple(ranges), cpus=1, content="mixed", seed=7, vmcoreinfo={})


def sparse_rows(space: int, src: Path, out: Path) -> list[Row]:
    name = fmt(space)
    rows = [
        Row("sparse", f"vmcap-kdump-d1-{name}", f"vmcap kdump -d 1 --threads 1 ({name})",
            vmcap("--format", "kdump", "--threads", "1", "-d", "1", str(src), str(out / "s.kdump")),
            str(out / "s.kdump")),
        Row("sparse", f"vmcap-zelf-{name}", f"vmcap zelf --threads 1 ({name})",
            vmcap("--threads", "1", str(src), str(out / "s.zelf")), str(out / "s.zelf")),
        Row("sparse", f"vmcap-elf-{name}", f"vmcap elf --threads 1 ({name})",
            vmcap("--format", "elf", "--threads", "1", str(src), str(out / "s.elf")), str(out / "s.elf")),
        Row("sparse", f"mdf-z-d1-{name}", f"makedumpfile-upstream -z -d 1 ({name})",
            [MDF, "-z", "-d", "1", str(src), str(out / "m.kdump")], str(out / "m.kdump")),
    ]
    for r in rows:
        r.extra["space"] = space
    return rows


CLASSIFY_CHILD = r"""
import sys, time, numpy as np
sys.path.insert(0, {repo!r})
from vmcap.kernel.pageclass import MemMapRun, classify_mem_map, page_rules
INFO_6_1 = {info!r}
space_pfns, ram_pfns = {space_pfns}, {ram_pfns}
STRUCT, VMEMMAP = 64, 0xFFFF_EA00_0000_0000
rules = page_rules(INFO_6_1, 31)
dtype = np.dtype({{"names": ["private", "mapcount"], "formats": ["<u8", "<u4"],
                  "offsets": [40, 48], "itemsize": STRUCT}})
buddy = int(INFO_6_1["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"]) & 0xFFFFFFFF
def read_virtual(vaddr, size):
    first = (vaddr - VMEMMAP) // STRUCT
    count = size // STRUCT
    pfns = np.arange(first, first + count, dtype=np.int64)
    pages = np.zeros(count, dtype=dtype)
    pages["mapcount"] = 0xFFFFFFFF
    free = (pfns % 64) < 32          # half of RAM free, in order-5 buddy blocks
    heads = free & (pfns % 32 == 0)
    pages["mapcount"][heads] = buddy
    pages["private"][heads] = 5
    return pages.tobytes()
starts = [0x100] + [i * (space_pfns // 4) for i in (1, 2)] + [space_pfns - ram_pfns]
ram = [(s, s + ram_pfns) for s in starts]
runs = [MemMapRun(s, e, VMEMMAP + s * STRUCT) for s, e in ram]
t = time.perf_counter()
result = classify_mem_map(read_virtual, runs, rules, max_pfn=space_pfns, ram_pfn_ranges=ram)
classified = time.perf_counter() - t
t = time.perf_counter()
seen = 0
for s, e in ram:                      # the consumers: 4 MiB of pfns at a time, in order
    for lo in range(s, e, 1024):
        seen += int(result.excluded[lo:min(lo + 1024, e)].sum())
count = result.excluded.count()
assert seen == count == result.counts["free"], (seen, count, result.counts)
vm_peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmPeak")][0]
print(f"walk {{classified:.2f}} s, read back {{time.perf_counter() - t:.2f}} s, VmPeak {{int(vm_peak) >> 10}} MiB",
      file=sys.stderr)
"""


def info_6_1() -> dict:
    """tests/test_pageclass.py's VMCOREINFO of Debian's 6.1 kernel (read, not imported: no pytest)."""
    import ast
    tree = ast.parse((REPO / "tests" / "test_pageclass.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "INFO_6_1":
            return ast.literal_eval(node.value)
    raise SystemExit("INFO_6_1 not found in tests/test_pageclass.py")


def classify_row(space: int) -> Row:
    code = CLASSIFY_CHILD.format(repo=str(REPO), info=info_6_1(),
                                 space_pfns=space // 4096, ram_pfns=SPARSE_RAM // 4096)
    row = Row("classify", f"classify-d31-{fmt(space)}", f"classify -d 31, 4 x 64 MiB RAM in {fmt(space)}",
              [sys.executable, "-c", code])
    row.extra["space"] = space
    return row


# ---------------------------------------------------------------- report


def fmt(size: int) -> str:
    for unit, scale in (("T", TiB), ("G", GiB), ("M", MiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def table(rows: list[Row], per_tib: bool = False) -> str:
    head = ("| command | median s | runs s | CPU s | output MB | peak RSS MiB |"
            + (" s per TiB of space |" if per_tib else ""))
    rule = "|---|---:|---|---:|---:|---:|" + ("---:|" if per_tib else "")
    if rows and rows[0].section == "classify":
        head, rule = head + " child's own timing |", rule + "---|"
    lines = [head, rule]
    for r in rows:
        if r.error:
            lines.append(f"| `{r.command}` | {r.error} | | | | |" + (" |" if per_tib else ""))
            continue
        size = f"{r.output_bytes / MB:.2f}" if r.output_bytes is not None else "–"
        runs = ", ".join(f"{s:.2f}" for s in r.seconds)
        line = f"| `{r.command}` | {r.median:.2f} | {runs} | {r.cpu_median:.2f} | {size} | {r.rss_mib:.1f} |"
        if per_tib:
            line += f" {r.median / (r.extra['space'] / TiB):.3f} |"
        if r.section == "classify":
            line += f" {r.extra.get('stderr', '')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--synthetic", default="2G")
    parser.add_argument("--sparse", default="1G,64G,1T,16T")
    parser.add_argument("--only", default="real,zelf,sparse,classify")
    parser.add_argument("--source", type=Path, default=None,
                        help="an ELF vmcore with its program headers at offset 64 (makedumpfile "
                             "needs them there), e.g. a lab dump of a bigger guest: the 'source' "
                             "section, run whenever this is given")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    only = set(args.only.split(","))
    results: dict[str, list[Row]] = {}
    print(f"load average at start: {os.getloadavg()[0]:.2f}; nproc {os.cpu_count()}; "
          f"{MDF}: {shutil.which(MDF) or 'not installed'}", file=sys.stderr)
    compile_vmcap()
    with tempfile.TemporaryDirectory(prefix="vmcap-t1-", dir=args.dir) as tmp:
        work = Path(tmp)
        if "real" in only:
            if not REAL_DUMP.exists():
                print(f"{REAL_DUMP} is not here: no real rows", file=sys.stderr)
            else:
                src = work / "real.elf"
                subprocess.run(["zstd", "-d", "-q", str(REAL_DUMP), "-o", str(src)], check=True)
                src.chmod(0o644)
                move_phdrs_after_ehdr(src)
                warm(src)
                results["real"] = [measure(r, args.repeat) for r in real_rows(src, work)]
                src.unlink()
        if "zelf" in only:
            src = work / "synthetic.elf"
            build_vmcore(src, bench_spec(parse_size(args.synthetic)))
            warm(src)
            results["zelf"] = [measure(r, args.repeat) for r in zelf_rows(src, work)]
            src.unlink()
        if args.source:
            warm(args.source)
            results["source"] = [measure(r, args.repeat) for r in source_rows(args.source, work)]
        spaces = [parse_size(s) for s in args.sparse.split(",") if s]
        if "sparse" in only:
            results["sparse"] = []
            for space in spaces:
                src = work / f"sparse-{fmt(space)}.elf"
                build_vmcore(src, sparse_spec(space))
                warm(src)
                results["sparse"] += [measure(r, args.repeat) for r in sparse_rows(space, src, work)]
                src.unlink()
        if "classify" in only:
            results["classify"] = [measure(classify_row(s), args.repeat) for s in spaces]
    print(f"load average at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for section, rows in results.items():
        print(f"\n### {section} (median of {args.repeat}; peak RSS: largest run)\n")
        print(table(rows, per_tib=section in ("sparse", "classify")))
    if args.json:
        Path(args.json).write_text(json.dumps({k: [asdict(r) for r in v] for k, v in results.items()},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
