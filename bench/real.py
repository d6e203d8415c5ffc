"""vmcap vs makedumpfile on the real dump in ../shared/vmcores (issues 4 and 5).

Run by hand, never by the test-suite:

    python bench/real.py [--repeat 3] [--json PATH]

makedumpfile 1.7.2 refuses the QEMU dump itself (its program headers are
not at offset 64), so both tools read vmcap's plain ELF copy of it. Debian's
makedumpfile is built without zstd, so it is compared with -c (zlib) and -l
(lzo). Each row is the fastest of --repeat runs; peak RSS is the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import MB, Result, run_repeated  # noqa: E402

REAL_DUMP = Path(os.environ.get("VMCAP_VMCORES")
                 or Path(__file__).resolve().parents[2] / "shared" / "vmcores") / "qemu-6.1-panic.elf.zst"


def vmcap(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmcap", "save", "--json", "--force", *args]


def rows(src: Path, out: Path) -> list[tuple[str, str, list[str], Path]]:
    """(key, command as shown, argv, output) for every run."""
    table = []
    for level in (1, 31):
        table += [
            (f"vmcap-kdump-d{level}", f"vmcap save --format kdump -d {level}",
             vmcap("--format", "kdump", "-d", str(level), str(src), str(out / f"v{level}.kdump")),
             out / f"v{level}.kdump"),
            (f"vmcap-kdump-zlib-d{level}", f"vmcap save --format kdump --compress zlib -d {level}",
             vmcap("--format", "kdump", "--compress", "zlib", "-d", str(level), str(src),
                   str(out / f"vz{level}.kdump")), out / f"vz{level}.kdump"),
            (f"mdf-c-d{level}", f"makedumpfile -c -d {level}",
             ["makedumpfile", "-c", "-d", str(level), str(src), str(out / f"m{level}.kdump")],
             out / f"m{level}.kdump"),
            (f"mdf-l-d{level}", f"makedumpfile -l -d {level}",
             ["makedumpfile", "-l", "-d", str(level), str(src), str(out / f"l{level}.kdump")],
             out / f"l{level}.kdump"),
        ]
    table += [
        ("vmcap-zelf-d31", "vmcap save -d 31 (zelf)",
         vmcap("-d", "31", str(src), str(out / "v31.zelf")), out / "v31.zelf"),
        ("vmcap-elf-d31", "vmcap save --format elf -d 31",
         vmcap("--format", "elf", "-d", "31", str(src), str(out / "v31.elf")), out / "v31.elf"),
        ("mdf-E-d31", "makedumpfile -E -d 31",
         ["makedumpfile", "-E", "-d", "31", str(src), str(out / "m31.elf")], out / "m31.elf"),
        ("vmcap-zelf-d0", "vmcap save (zelf, -d 0)",
         vmcap(str(src), str(out / "v0.zelf")), out / "v0.zelf"),
        ("zstd-T2-3", "zstd -T2 -3 (plain ELF)",
         ["zstd", "-T2", "-3", "-q", "-f", str(src), "-o", str(out / "z.zst")], out / "z.zst"),
    ]
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    if not REAL_DUMP.exists():
        print(f"{REAL_DUMP} is not here", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vmcap-real-") as tmp:
        work = Path(tmp)
        original = work / "qemu.elf"
        subprocess.run(["zstd", "-d", "-q", str(REAL_DUMP), "-o", str(original)], check=True)
        src = work / "src.elf"
        subprocess.run([sys.executable, "-m", "vmcap", "save", "-q", "--format", "elf",
                        str(original), str(src)], check=True)
        src_bytes = src.stat().st_size
        results = []
        for key, shown, argv, output in rows(src, work):
            result = Result(key, shown, argv)
            if argv[0] != sys.executable and shutil.which(argv[0]) is None:
                result.skipped = f"{argv[0]} not installed"
            else:
                run_repeated(result, work, args.repeat, output=output)
            results.append(result)
            if output.exists():
                output.unlink()
    print(f"source: vmcap's plain ELF of {REAL_DUMP.name} ({src_bytes} bytes), "
          f"fastest of {args.repeat} runs\n")
    print("| command | seconds | output MB | peak RSS MiB | pages excluded |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        if not r.ok:
            print(f"| `{r.command}` | {r.error or r.skipped} | | | |")
            continue
        excluded = ""
        if r.summary:
            excluded = ", ".join(f"{k} {v}" for k, v in r.summary.get("pages_excluded", {}).items())
        print(f"| `{r.command}` | {r.seconds:.2f} | {r.output_bytes / MB:.2f} | "
              f"{r.rss_mib:.0f} | {excluded} |")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
