"""Reads through `vmcap mount` on the real dump, against the plain file (issue 12).

Run by hand, never by the test-suite (needs /dev/fuse and mfusepy):

    python bench/mount_read.py [--reads 2000] [--seed 1] [--json PATH]

The real dump (../shared/vmcores/qemu-6.1-panic.elf.zst) is decompressed to
a plain ELF, saved as zelf (default 8 MiB frames, and 1 MiB frames) and as an
lzo kdump, in a temporary directory. For each, a fresh `vmcap mount` is started and measured:

- mount: seconds from starting `vmcap mount` until DIR is in /proc/mounts;
- first byte: open DIR/vmcore and read 4 KiB at a data page in the middle of
  the dump, on the fresh mount (nothing decompressed or cached yet);
- random 4 KiB: ``--reads`` page-aligned reads at random pages of the
  PT_LOADs' stored data (same seed for every row: same pages, whole-page
  reads, each page once), reads/s;
- sequential: the whole file read in 1 MiB chunks, MiB/s;
- peak RSS of the mount process (VmHWM) after all that.

The "plain" row reads the plain file itself, with its pages dropped from the
page cache first (posix_fadvise DONTNEED) so that its first byte is a disk
read, like a mount's. The mounts use the kernel page cache (kernel_cache), so
each page is read once per row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from elftools.elf.elffile import ELFFile

ROOT = Path(__file__).resolve().parents[1]
REAL_DUMP = Path(os.environ.get("VMCAP_VMCORES")
                 or ROOT.parent / "shared" / "vmcores") / "qemu-6.1-panic.elf.zst"
PAGE = 4096
MIB = 1 << 20


def vmcap(*args) -> None:
    subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], cwd=ROOT, check=True)


def is_mounted(directory: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(directory) for line in mounts)


def data_pages(path: Path) -> list[int]:
    """File offsets of the whole stored pages of every PT_LOAD."""
    offsets = []
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD" or not seg["p_filesz"]:
                continue
            first = -(-seg["p_offset"] // PAGE) * PAGE
            offsets.extend(range(first, seg["p_offset"] + seg["p_filesz"] - PAGE + 1, PAGE))
    return offsets


def measure_reads(path: Path, pages: list[int], reads: int, seed: int) -> dict:
    picked = random.Random(seed).sample(pages, min(reads, len(pages)))
    middle = pages[len(pages) // 2]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        os.pread(fd, PAGE, middle)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for offset in picked:
            os.pread(fd, PAGE, offset)
        random_seconds = time.perf_counter() - start
        size = os.fstat(fd).st_size
        start = time.perf_counter()
        done = 0
        while done < size:
            done += len(os.pread(fd, MIB, done)) or size
        sequential = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"first_byte_ms": round(first * 1000, 2),
            "random_4k_per_s": round(len(picked) / random_seconds),
            "random_4k_mib_per_s": round(len(picked) * PAGE / MIB / random_seconds, 1),
            "sequential_mib_per_s": round(size / MIB / sequential, 1)}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure_mount(dump: Path, where: Path, reads: int, seed: int) -> dict:
    directory = where / f"mnt-{dump.name}"
    directory.mkdir()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "vmcap", "mount", str(dump),
                                str(directory)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not is_mounted(directory):
            if process.poll() is not None:
                raise SystemExit(f"vmcap mount {dump} exited with {process.returncode}")
            time.sleep(0.005)
        mounted = time.perf_counter() - start
        core = directory / "vmcore"
        row = {"mount_s": round(mounted, 3), **measure_reads(core, data_pages(core), reads, seed)}
        row["peak_rss_mib"] = peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not REAL_DUMP.exists():
        raise SystemExit(f"{REAL_DUMP}: not found")
    where = Path(tempfile.mkdtemp(prefix="vmcap-mount-bench-"))
    try:
        plain = where / "real.elf"
        subprocess.run(["zstd", "-d", "-q", "-f", str(REAL_DUMP), "-o", str(plain)], check=True)
        zelf, zelf_1m, kdump = where / "real.zelf", where / "real-1M.zelf", where / "real.lzo.kdump"
        vmcap("save", "-q", plain, zelf)
        vmcap("save", "-q", "--frame-size", "1M", plain, zelf_1m)
        vmcap("save", "-q", "--format", "kdump", "--compress", "lzo", plain, kdump)
        fd = os.open(plain, os.O_RDONLY)
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        results = {"plain": {"mount_s": None, **measure_reads(plain, data_pages(plain),
                                                               args.reads, args.seed)}}
        for name, dump in (("zelf", zelf), ("zelf-1M", zelf_1m), ("kdump-lzo", kdump)):
            results[name] = measure_mount(dump, where, args.reads, args.seed)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    columns = ["mount_s", "first_byte_ms", "random_4k_per_s", "random_4k_mib_per_s",
               "sequential_mib_per_s", "peak_rss_mib"]
    print(f"{'':10}" + "".join(f"{c:>22}" for c in columns))
    for name, row in results.items():
        print(f"{name:10}" + "".join(f"{str(row.get(c, '-')):>22}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
