"""The real ppc64le and s390x dumps of tests/data (made by regen-ppc64-s390x.sh), for the arch tests.

Each dump NAME has NAME.elf.zst (QEMU's ELF), NAME.vmcoreinfo (the kernel's
VMCOREINFO, taken from its memory: QEMU wrote no note), NAME.dmesg.txt
(makedumpfile --dump-dmesg) and NAME.dN-pfns.txt (the pfns makedumpfile -d N
keeps, as "start end" ranges, for N in 31 2 4 8 16).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kept_pfns import kept_ranges  # noqa: E402  (tests/arch is not a package)

__all__ = ["RealDump", "real_dump", "kept_ranges", "run_vmcap", "expected_ranges"]


@dataclass(frozen=True)
class RealDump:
    name: str
    elf: Path  # decompressed
    vmcoreinfo: Path
    dmesg: bytes  # makedumpfile's --dump-dmesg
    d31_ranges: list[tuple[int, int]]  # what makedumpfile -d 31 keeps

    def kept_by_makedumpfile(self, level: int) -> list[tuple[int, int]]:
        """What makedumpfile -d level keeps; skips when that expectation was not made."""
        path = DATA / f"{self.name}.d{level}-pfns.txt"
        if not path.exists():
            pytest.skip(f"no makedumpfile -d {level} expectation for {self.name} ({path})")
        return expected_ranges(path)


def expected_ranges(path: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines() if line.strip()]


def real_dump(name: str, tmp_path_factory) -> RealDump:
    """NAME decompressed into a temporary directory; skips when the data is absent."""
    packed = DATA / f"{name}.elf.zst"
    if not packed.exists():
        pytest.skip(f"real {name} dump not present ({packed})")
    out = tmp_path_factory.mktemp(name) / f"{name}.elf"
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-d", "-q", "-f", "--long=27", str(packed), "-o", str(out)], check=True)
    else:
        import zstandard

        with open(packed, "rb") as src, open(out, "wb") as dst:
            zstandard.ZstdDecompressor(max_window_size=1 << 27).copy_stream(src, dst)
    return RealDump(name, out, DATA / f"{name}.vmcoreinfo", (DATA / f"{name}.dmesg.txt").read_bytes(),
                    expected_ranges(DATA / f"{name}.d31-pfns.txt"))


def run_vmcap(*args, check: bool = True) -> subprocess.CompletedProcess:
    """vmcap as a user runs it (the checkout's package: tests run from the repository root)."""
    done = subprocess.run([sys.executable, "-m", "vmcap", *map(str, args)], capture_output=True)
    if check and done.returncode != 0:
        raise AssertionError(f"vmcap {' '.join(map(str, args))} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')}")
    return done


def foreign_makedumpfile(debian_arch: str) -> list[str]:
    """The command running Debian's makedumpfile for debian_arch (ppc64el, s390x) under qemu-user,
    from the root regen-ppc64-s390x.sh unpacks in $WORK (default /var/tmp/vmcap-arch-ps); skips
    where that is not here."""
    import os

    root = Path(os.environ.get("WORK", "/var/tmp/vmcap-arch-ps")) / f"root-{debian_arch}"
    qemu = {"ppc64el": "qemu-ppc64le-static", "s390x": "qemu-s390x-static"}[debian_arch]
    if not (root / "usr/bin/makedumpfile").exists() or not shutil.which(qemu):
        pytest.skip(f"no {debian_arch} makedumpfile under {qemu} (run tests/arch/regen-ppc64-s390x.sh)")
    return [qemu, "-L", str(root), str(root / "usr/bin/makedumpfile")]
