#!/usr/bin/env python3
"""The smallest crashkernel= at which a real kdump of a 1 GiB guest succeeds, per collector.

    python bench/capture_memory.py [--collectors vmcap,makedumpfile] [--low 64] [--high 320]
                                   [--step 16] [--json FILE]

Not run in CI: each probe is a QEMU boot under TCG (1.5-2.5 minutes). Same setup for
both collectors (tests/capture/harness.py): Debian's kernel, 1 GiB guest, the capture
kernel with RHEL's options (nr_cpus=1 ...), a busybox initramfs plus either vmcap's
bundle (packaging/build-bundle.py) or Debian's makedumpfile with its shared libraries,
and the command kdump-utils runs by default:

    COLLECTOR -l --message-level 7 -d 31 /proc/vmcore /mnt/out/vmcore-incomplete

(COLLECTOR = vmcap-makedumpfile or makedumpfile). A probe succeeds when the collector
exits 0 and `vmcap verify` accepts its output on the host. The search bisects on
multiples of --step MiB between --low and --high, assuming success is monotonic in
crashkernel=. Each probe also reports the collector's peak memory sampled in the
capture kernel (tests/capture/measure.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT / "tests" / "capture"))
import harness  # noqa: E402

JOB = r"""
cd /mnt/out
%(measure)s
measure collector %(collector)s -l --message-level 7 -d 31 /proc/vmcore /mnt/out/vmcore-incomplete
[ "$(cat collector.rc)" = 0 ] && mv vmcore-incomplete vmcore
"""


def probe(work: Path, kernel, collector: str, bundle: Path, crashkernel_mib: int,
          append_extra: str = "") -> dict:
    work.mkdir(parents=True, exist_ok=True)
    measure = (PROJECT / "tests" / "capture" / "measure.sh").read_text()
    if collector == "vmcap":
        capture = harness.capture_image(work, kernel, bundle,
                                        JOB % {"measure": measure, "collector": "vmcap-makedumpfile"})
    else:
        capture = harness.capture_image(work, kernel, None,
                                        JOB % {"measure": measure, "collector": "makedumpfile"},
                                        {"/usr/bin/": Path("/usr/bin/makedumpfile")})
    main = harness.main_image(work, kernel, capture, f"{harness.CAPTURE_APPEND} {append_extra}".strip(),
                              ["bench"])
    out = harness.make_ext4(work / "out.img", 1024)
    run = harness.run_qemu(work, kernel, main, crashkernel=f"{crashkernel_mib}M",
                           disks={"out": out}, timeout=600)
    (work / "console.log").write_text(run.console)
    result = {"collector": collector, "crashkernel_mib": crashkernel_mib, "append_extra": append_extra,
              "capture_image_bytes": capture.stat().st_size, "seconds": round(run.seconds, 1)}
    files = harness.ext4_files(out)
    if "job.rc" not in files:
        lines = run.console.splitlines()
        reason = next((line for line in lines if "kexec -p failed" in line or "Out of memory" in line
                       or "Initramfs unpacking failed" in line
                       or "Kernel panic" in line and "sysrq" not in line), None)
        result.update(ok=False, reason=(reason or "no result: " + (lines[-1] if lines else "no console")))
        return result

    def text(name: str) -> str:
        try:
            return harness.ext4_get(out, f"/{name}", work / name).read_text(errors="replace").strip()
        except (FileNotFoundError, subprocess.CalledProcessError):
            return ""

    result["rc"] = text("collector.rc")
    result["memory_kb"] = dict(kv.split("=") for kv in text("collector.mem").split())
    meminfo = text("meminfo-capture.txt")
    result["capture_memtotal_kb"] = next((int(line.split()[1]) for line in meminfo.splitlines()
                                          if line.startswith("MemTotal:")), None)
    ok = result["rc"] == "0" and "vmcore" in files
    if ok:
        dump = harness.ext4_get(out, "/vmcore", work / "vmcore")
        verify = subprocess.run([sys.executable, "-m", "vmcap", "verify", "-q", str(dump)],
                                env=dict(os.environ, PYTHONPATH=str(PROJECT)), capture_output=True,
                                text=True)
        ok = verify.returncode == 0
        if not ok:
            result["reason"] = "verify: " + verify.stderr.strip()
        dump.unlink()
    else:
        unpack = [line for line in run.console.splitlines() if "Initramfs unpacking failed" in line]
        result["reason"] = (unpack[0] if unpack else "") or text("collector.err")[-300:] \
            or text("job.log")[-300:]
    result["ok"] = ok
    return result


def search(work: Path, kernel, collector: str, bundle: Path, low: int, high: int, step: int,
           results: list, append_extra: str = "") -> int | None:
    """Smallest multiple of `step` in [low, high] that succeeds (None if `high` fails)."""
    def attempt(mib: int) -> bool:
        r = probe(work / f"{collector}-{mib}M", kernel, collector, bundle, mib, append_extra)
        results.append(r)
        print(json.dumps(r), flush=True)
        return r["ok"]

    if not attempt(high):
        return None
    lo, hi = low // step, high // step  # invariant: hi succeeds; lo is unknown or fails
    if attempt(lo * step):
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid * step):
            hi = mid
        else:
            lo = mid
    return hi * step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collectors", default="vmcap,makedumpfile")
    ap.add_argument("--low", type=int, default=64, help="MiB")
    ap.add_argument("--high", type=int, default=256, help="MiB")
    ap.add_argument("--step", type=int, default=16, help="MiB")
    ap.add_argument("--json", help="write every probe and the answer here")
    ap.add_argument("--bundle", help="a bundle cpio already built by packaging/build-bundle.py")
    ap.add_argument("--append-extra", default="",
                    help="more capture-kernel options, e.g. root=/dev/ram0: with any root= the "
                         "kernel unpacks the initramfs into ramfs, not a tmpfs capped at half of RAM")
    args = ap.parse_args()
    missing = harness.missing_prerequisites()
    if missing:
        print("capture_memory: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    kernel = harness.find_kernel()
    work = Path(tempfile.mkdtemp(prefix="vmcap-capture-memory-", dir="/var/tmp"))
    bundle = (Path(args.bundle) if args.bundle
              else harness.build_bundle(work / "vmcap.cpio.gz", work / "bundle.json"))
    results: list = []
    answer = {}
    for collector in args.collectors.split(","):
        answer[collector] = search(work, kernel, collector, bundle, args.low, args.high,
                                   args.step, results, args.append_extra)
        print(f"{collector}: smallest crashkernel= that worked: {answer[collector]}M", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"smallest_mib": answer, "probes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
