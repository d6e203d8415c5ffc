#!/usr/bin/env python3
"""vmcap against upstream makedumpfile inside a real capture kernel, on the live /proc/vmcore.

    python bench/capture_speed.py [--mem 1536] [--crashkernel 384] [--fill 800]
                                  [--runs "-z -d 31,-l -d 31"] [--repeat 2]
                                  [--bundle CPIO] [--json FILE]

Not run in CI: one QEMU boot under TCG (about 5-10 minutes with the defaults). The setup is
tests/capture/harness.py's: Debian's kernel, the capture kernel with kdump-utils' options
(nr_cpus=1 ...), memmap= holes that make fractional pages. Before it crashes, the 1st kernel
puts --fill MiB of memory to use, half page cache (a disk of /usr/lib files read to
/dev/null) and half anonymous memory (dd processes holding their buffers), so that -d 31
has pages to leave out and pages to keep. In the capture kernel each of --runs is run
--repeat times with each collector, alternating,

    vmcap-makedumpfile ARGS /proc/vmcore OUT    (vmcap's capture bundle)
    makedumpfile-upstream ARGS /proc/vmcore OUT (../shared/lab/build-makedumpfile-upstream.sh)

under busybox `time` (wall, user and system seconds, peak RSS); each output is deleted once
its size is noted. The table gives medians of CPU (user + system) and wall seconds.

What it shows and what it does not: the capture kernel's /proc/vmcore (read() copies each
page through a fresh kernel mapping of old memory; mmap maps it once) on one CPU, which no
file-based benchmark reaches. TCG emulates the CPU, so absolute times are 10-30 times a real
machine's and instruction costs are not a real CPU's; compare the two collectors, within one
boot.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT / "tests" / "capture"))
import harness  # noqa: E402

UPSTREAM = "makedumpfile-upstream"

# The 1st kernel, just before it crashes (busybox sh): page cache, then anonymous memory.
BEFORE_CRASH = r"""
log() { echo "<5>VMCAPTEST: $*" > /dev/kmsg; }
for d in /sys/block/vd*; do [ "$(cat "$d/serial" 2>/dev/null)" = fill ] && F=/dev/${d##*/}; done
dd if="$F" of=/dev/null bs=1M count=%(cache_mib)d 2>/dev/null
i=0
while [ $i -lt %(anon_parts)d ]; do
  dd if="$F" bs=64M count=1 skip=$i 2>/dev/null | sleep 100000 &
  i=$((i+1))
done
n=0
while [ $n -lt 120 ] && [ "$(awk '/AnonPages/{print $2}' /proc/meminfo)" -lt %(anon_kib)d ]; do
  sleep 1; n=$((n+1))
done
log "memory in use: $(grep -E '^(MemFree|Cached|AnonPages)' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
"""

JOB = r"""
cd /mnt/out
# vmcap's start-up alone: the bundle's Python importing numpy and what a kdump capture
# imports, nothing read (the wrapper with its last line's program replaced).
sed "s/-c 'import sys; from vmcap.entry import .*\$/-c '%(imports)s'/" /usr/bin/vmcap-makedumpfile \
  > /tmp/vmcap-imports
for rep in %(reps)s; do
  time -f "start|vmcap|%%e|%%U|%%S|%%M|%%x" -a -o /mnt/out/times.txt sh /tmp/vmcap-imports
  echo "start|vmcap|0" >> /mnt/out/sizes.txt
%(commands)s
done
"""
# What a kdump capture at -d 31 of an x86_64 dump imports (tests/test_startup.py).
STARTUP_IMPORTS = ("import numpy, zstandard, vmcap.entry, vmcap.makedumpfile_cli, vmcap.save, "
                   "vmcap.kdumpsave, vmcap.kernel.pageclass, vmcap.kernel.translate")

COMMAND = r"""  time -f "%(key)s|%(who)s|%%e|%%U|%%S|%%M|%%x" -a -o /mnt/out/times.txt \
    %(argv)s /proc/vmcore /mnt/out/o > /dev/null 2>> /mnt/out/errors.txt
  echo "%(key)s|%(who)s|$(stat -c %%s /mnt/out/o 2>/dev/null)" >> /mnt/out/sizes.txt
  rm -f /mnt/out/o; sync"""


def fill_image(path: Path, mib: int) -> Path:
    """mib MiB of real file contents (what a page cache and a heap hold), from /usr/lib."""
    files = subprocess.run(["find", "/usr/lib", "-type", "f", "-size", "+4k"], capture_output=True,
                           text=True).stdout.split()
    want = mib << 20
    with path.open("wb") as out:
        for name in sorted(files):
            try:
                data = Path(name).read_bytes()
            except OSError:
                continue
            out.write(data[:want - out.tell()])
            if out.tell() >= want:
                break
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", type=int, default=1536, help="1st kernel's memory, MiB")
    ap.add_argument("--crashkernel", type=int, default=384, help="MiB")
    ap.add_argument("--fill", type=int, default=800, help="MiB put to use before the crash (half "
                    "page cache, half anonymous memory)")
    ap.add_argument("--runs", default="-z -d 31,-l -d 31",
                    help="makedumpfile arguments, comma-separated; each runs with both collectors")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--bundle", help="a bundle cpio built by packaging/build-bundle.py (default: build one)")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    missing = harness.missing_prerequisites()
    upstream = shutil.which(UPSTREAM)
    if upstream is None:
        missing.append(f"{UPSTREAM} (../shared/lab/build-makedumpfile-upstream.sh)")
    if missing:
        print("capture_speed: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    kernel = harness.find_kernel()
    work = Path(tempfile.mkdtemp(prefix="vmcap-capture-speed-", dir="/var/tmp"))
    bundle = Path(args.bundle) if args.bundle else harness.build_bundle(work / "vmcap.cpio.gz")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    commands = []
    for index, run in enumerate(runs):
        for who, binary in (("vmcap", "vmcap-makedumpfile"), ("makedumpfile", f"/usr/bin/{UPSTREAM}")):
            commands.append(COMMAND % {"key": index, "who": who,
                                       "argv": f"{binary} {run} --message-level 4"})
    job = JOB % {"reps": " ".join(str(i) for i in range(args.repeat)), "commands": "\n".join(commands),
                 "imports": STARTUP_IMPORTS}
    capture = harness.capture_image(work, kernel, bundle, job, {"/usr/bin/": Path(upstream)})
    anon_mib = args.fill // 2
    before = BEFORE_CRASH % {"cache_mib": args.fill - anon_mib, "anon_parts": max(1, anon_mib // 64),
                             "anon_kib": int(anon_mib * 1024 * 0.9)}
    main_initrd = harness.main_image(work, kernel, capture, harness.CAPTURE_APPEND, ["bench"], before)
    fill = fill_image(work / "fill.img", args.fill)
    out = harness.make_ext4(work / "out.img", 2048)
    print(f"booting: {args.mem} MiB guest, crashkernel={args.crashkernel}M, {args.fill} MiB in use, "
          f"{len(runs)} x 2 collectors x {args.repeat}", flush=True)
    result = harness.run_qemu(work, kernel, main_initrd, crashkernel=f"{args.crashkernel}M",
                              mem_mib=args.mem, disks={"fill": fill, "out": out}, timeout=3600)
    (work / "console.log").write_text(result.console)
    files = harness.ext4_files(out)
    if "times.txt" not in files:
        print(f"capture_speed: no times (see {work}/console.log)", file=sys.stderr)
        return 1

    def text(name: str) -> str:
        if name not in files:
            return ""
        return harness.ext4_get(out, f"/{name}", work / name).read_text(errors="replace")

    in_use = [line.split("VMCAPTEST: ", 1)[1] for line in result.console.splitlines()
              if "memory in use" in line]
    rows = []
    for line in text("times.txt").splitlines():
        key, who, wall, user, system, rss, code = line.split("|")
        run = "start-up only" if key == "start" else runs[int(key)]
        rows.append(dict(run=run, collector=who, wall=float(wall), cpu=float(user) + float(system),
                         user=float(user), system=float(system), rss_kib=int(rss), exit=int(code)))
    sizes = {}
    for line in text("sizes.txt").splitlines():
        key, who, size = line.split("|")
        sizes["start-up only" if key == "start" else runs[int(key)], who] = int(size) if size else None
    print(f"\n{in_use[0] if in_use else ''}; {result.seconds:.0f} s in QEMU\n")
    print("| run | collector | CPU s (median) | wall s | peak RSS MiB | output MB | exit |")
    print("|---|---|---|---|---|---|---|")
    for run in ["start-up only", *runs]:
        for who in ("vmcap", "makedumpfile"):
            mine = [r for r in rows if r["run"] == run and r["collector"] == who]
            if not mine:
                continue
            size = sizes.get((run, who))
            print(f"| `{run}` | {who} | {statistics.median(r['cpu'] for r in mine):.2f} "
                  f"| {statistics.median(r['wall'] for r in mine):.2f} "
                  f"| {max(r['rss_kib'] for r in mine) / 1024:.1f} "
                  f"| {size / 1e6:.2f} | {','.join(sorted({str(r['exit']) for r in mine}))} |"
                  if size is not None else f"| `{run}` | {who} | failed | | | | |")
    errors = text("errors.txt").strip()
    if errors:
        print("\nstderr of the runs:\n" + errors[-2000:])
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mem_mib": args.mem, "crashkernel_mib": args.crashkernel, "fill_mib": args.fill,
            "memory_in_use": in_use, "qemu_seconds": round(result.seconds, 1), "rows": rows,
            "sizes": {f"{run}|{who}": size for (run, who), size in sizes.items()},
            "bundle": str(bundle), "commands": [shlex.split(c) for c in runs]}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
