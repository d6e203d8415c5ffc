#!/usr/bin/env python3
"""Interleaved CPU-time comparison of vmcap trees against makedumpfile-upstream (or zstd).

    python bench/pairs.py SRC [--runs 5] [--tree new=.] [--tree base=/path/to/old/checkout]
                          [--collector] [--only TEXT] [--out DIR]

For each kind of work (kdump -d 1 and -d 31 with zstd level 1 and with lzo, zelf -d 0),
every round runs each vmcap tree and then the reference tool once, on the same file:
`makedumpfile-upstream -z|-l -d N` (../shared/lab/build-makedumpfile-upstream.sh) or
`zstd -T1 -3`. Rounds interleave the commands, so a machine whose speed drifts over
minutes (a shared VM) slows them alike. Prints the median CPU seconds (user + system of
every thread, from os.wait4), the largest peak RSS and the output size of each.

Each tree is a directory holding a `vmcap` package (a checkout, or `git archive REV vmcap |
tar -x -C DIR`); it runs as `python -m vmcap` with PYTHONPATH=tree and its bytecode cached
in a temporary PYTHONPYCACHEPREFIX. vmcap runs `save --threads 1 --format kdump --level 1`
(or `--compress lzo`), or with --collector `makedumpfile --num-threads 1 ...` with
makedumpfile's own arguments, as kdump scripts run it. SRC must have its program headers at
offset 64 for makedumpfile (see threads1.py's move_phdrs_after_ehdr). Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MDF = "makedumpfile-upstream"

# (name, vmcap save arguments, makedumpfile arguments or None for zstd -T1 -3)
WORK = (
    ("kdump -d 1 zstd 1", ["--format", "kdump", "--level", "1", "-d", "1"], ["-z", "-d", "1"]),
    ("kdump -d 31 zstd 1", ["--format", "kdump", "--level", "1", "-d", "31"], ["-z", "-d", "31"]),
    ("kdump -d 1 lzo", ["--format", "kdump", "--compress", "lzo", "-d", "1"], ["-l", "-d", "1"]),
    ("kdump -d 31 lzo", ["--format", "kdump", "--compress", "lzo", "-d", "31"], ["-l", "-d", "31"]),
    ("zelf -d 0", ["-d", "0"], None),
)

# Runs argv with its output discarded; prints its CPU seconds, peak RSS (KiB) and exit code.
# A launcher of its own: ru_maxrss would otherwise count this script's memory.
LAUNCHER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    fd = os.open('/dev/null', os.O_WRONLY); os.dup2(fd, 1); os.dup2(fd, 2)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_once(argv: list[str], env: dict, out: Path) -> tuple[float, int, int]:
    if out.exists():
        out.unlink()
    # cwd: `python -m` puts it first on sys.path, before the tree's PYTHONPATH.
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], capture_output=True, text=True, env=env,
                          cwd=env["PYTHONPYCACHEPREFIX"])
    cpu, rss, code = done.stdout.split()
    if code != "0":
        raise SystemExit(f"pairs: {' '.join(argv)} failed (exit {code})")
    return float(cpu), int(rss), out.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", action="append", metavar="NAME=DIR",
                    help="a vmcap tree to measure (repeatable; default: new=this checkout)")
    ap.add_argument("--collector", action="store_true",
                    help="run vmcap as `vmcap makedumpfile` with makedumpfile's arguments (kdump rows only)")
    ap.add_argument("--only", help="only the kinds of work whose name contains this")
    ap.add_argument("--out", default="/var/tmp", help="directory for the output file (one at a time)")
    args = ap.parse_args()
    trees = {name: os.path.abspath(path) for name, path in (t.split("=", 1) for t in (args.tree or [f"new={REPO}"]))}
    if shutil.which(MDF) is None:
        print(f"pairs: {MDF} is not installed (../shared/lab/build-makedumpfile-upstream.sh)", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="vmcap-pairs-pyc-")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    out = Path(args.out).resolve() / f"vmcap-pairs-{os.getpid()}.out"
    src = os.path.abspath(args.source)
    try:
        for name, vmcap_args, mdf_args in WORK:
            if args.only and args.only not in name or args.collector and mdf_args is None:
                continue
            results: dict[str, list[tuple[float, int, int]]] = {}
            for round_ in range(args.runs + 1):  # round 0 compiles the trees' bytecode, not counted
                for tree, path in trees.items():
                    if args.collector:
                        argv = [sys.executable, "-m", "vmcap", "makedumpfile", "--num-threads", "1",
                                "--message-level", "0", *mdf_args, src, str(out)]
                    else:
                        argv = [sys.executable, "-m", "vmcap", "save", "-q", "--force", "--threads", "1",
                                *vmcap_args, src, str(out)]
                    measured = run_once(argv, dict(env, PYTHONPATH=path), out)
                    if round_:
                        results.setdefault(tree, []).append(measured)
                if not round_:
                    continue
                if mdf_args is not None:
                    results["makedumpfile"] = results.get("makedumpfile", []) + [
                        run_once([MDF, *mdf_args, src, str(out)], env, out)]
                else:
                    results["zstd -T1 -3"] = results.get("zstd -T1 -3", []) + [
                        run_once(["zstd", "-T1", "-3", "-q", "-f", src, "-o", str(out)], env, out)]
            cells = [f"{key} {statistics.median(c for c, _, _ in rows):.3f} s, "
                     f"{max(r for _, r, _ in rows) / 1024:.1f} MiB, {rows[0][2] / 1e6:.2f} MB"
                     for key, rows in results.items()]
            print(f"{name}: " + " | ".join(cells), flush=True)
    finally:
        if out.exists():
            out.unlink()
        shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
